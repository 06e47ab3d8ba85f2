"""``python -m vitzoo.train MODEL ...`` (the form ``torchrun`` launches): the fine-tuning entry point."""

import sys

from vitzoo.train.finetune import main

sys.exit(main())
