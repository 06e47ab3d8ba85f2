"""Error messages a person can act on: every unknown name comes back with the closest valid ones."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable

# Raised on purpose for bad input, each with a message that says what to do: the command-line entry
# points print them without a traceback. Any other exception is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def did_you_mean(
    name: str, options: Iterable[str], limit: int = 5, listed: str = "vitzoo.list_models() or `vitzoo list`",
) -> str:
    """Return a sentence naming the options closest to ``name`` (or all options when few, else where
    ``listed`` they are)."""
    options = sorted(set(options))
    close = difflib.get_close_matches(name, options, n=limit, cutoff=0.5)
    if close:
        return "closest: " + ", ".join(close)
    if len(options) <= 12:
        return "valid: " + ", ".join(options)
    return f"{len(options)} valid names; see {listed}"


def user_message(err: BaseException) -> str:
    """An error's message for a person: a DataLoader worker's error re-raised in the main process carries
    the worker's traceback before the message (``Caught ValueError in DataLoader worker ...``); drop it."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        return text.strip().splitlines()[-1].partition(": ")[2]
    return text


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run a command-line entry point: its exit code, or 2 after printing a bad-input error's message."""
    try:
        return command()
    except BrokenPipeError:  # the reader went away (`vitzoo list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit fails no more
        return 0
    except USER_ERRORS as err:
        print(f"{prog}: {user_message(err)}", file=sys.stderr)
        return 2
