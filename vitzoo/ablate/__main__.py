"""``python -m vitzoo.ablate --model NAME --grid FIELD=A,B ...``: the ablation runner."""

import sys

from vitzoo.ablate import main

sys.exit(main())
