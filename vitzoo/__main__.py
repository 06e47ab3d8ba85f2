"""``python -m vitzoo``: the ``vitzoo`` command."""

import sys

from vitzoo.cli import main

sys.exit(main())
