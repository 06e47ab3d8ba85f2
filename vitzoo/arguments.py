"""Command-line value types that refuse nonsense at parse time, before any model or data is built.

``--batch-size 0`` or ``--steps -5`` would otherwise surface minutes later as a ZeroDivisionError or a
run that silently does nothing; as argparse types they end the command at once with the usage line and
what was expected.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from vitzoo.inputs import available_device


def _bounded(kind: type, low: float, inclusive: bool, expected: str) -> Callable[[str], int | float]:
    """An argparse type: ``kind(text)``, finite and above ``low`` (or equal to it when ``inclusive``)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


positive_int = _bounded(int, 1, True, "a whole number >= 1")
non_negative_int = _bounded(int, 0, True, "a whole number >= 0")
positive_float = _bounded(float, 0.0, False, "a number > 0")
non_negative_float = _bounded(float, 0.0, True, "a number >= 0")


def device(text: str) -> str:
    """An argparse type for ``--device``: a device torch knows and this machine has (see
    :func:`vitzoo.inputs.available_device`, which the commands without argparse types call)."""
    try:
        available_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device ")) from None
    return text
