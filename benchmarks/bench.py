"""Side-by-side speed and memory of vitzoo and timm; see BENCHMARKS.md for results and options.

    python benchmarks/bench.py vit_small_patch16_224 --rounds 5 --compile both --out report.md

Equivalent to ``vitzoo bench``; the logic lives in :mod:`vitzoo.bench`.
"""

import sys

from vitzoo.bench import main

if __name__ == "__main__":
    sys.exit(main())
