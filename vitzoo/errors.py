"""Error messages a person can act on: every unknown name comes back with the closest valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, options: Iterable[str], limit: int = 5) -> str:
    """Return a sentence naming the options closest to ``name`` (or all options when few)."""
    options = sorted(set(options))
    close = difflib.get_close_matches(name, options, n=limit, cutoff=0.5)
    if close:
        return "closest: " + ", ".join(close)
    if len(options) <= 12:
        return "valid: " + ", ".join(options)
    return f"{len(options)} valid names; list them with vitzoo.list_models() or `vitzoo list`"
