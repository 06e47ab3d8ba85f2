"""A run folder belongs to one run: one process at a time, never mixed with another run's files.

:func:`claim_run_folder` is how fine-tuning, pretraining and ablations enter their ``--out``: it creates the folder,
takes an exclusive ``flock`` on ``.lock`` inside it (the kernel drops it when the process ends, crash
included, so a stale lock file never blocks), removes the temporaries a killed write left behind, and
then refuses to start over another run's files unless asked to move them aside. Nothing is deleted
except those temporaries.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("vitzoo.runfolder")

LOCK = ".lock"
# What a fine-tuning run (the first four) or an ablation (the last two) leaves in its folder.
RUN_FILES = ("run.json", "metrics.jsonl", "summary.json", "checkpoints", "runs", "results.json")
# Names of unfinished writes: checkpoint folders (``.tmp-step_...``) and atomic text files (``.name.XXXX.tmp``).
TEMPORARIES = (".tmp-*", ".*.tmp")


class RunFolderError(ValueError):
    """The run folder cannot be used: in use by another process, holding another run, or not writable."""


def run_files(folder: Path) -> list[str]:
    """The names in ``folder`` that belong to a run (see ``RUN_FILES``); empty for a new or unrelated folder."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def training_run_in(folder: Path, resume: bool) -> str | None:
    """The training run already in ``folder`` that a new one would mix with (none when resuming it): the
    ``other_run`` of :func:`claim_run_folder` for fine-tuning and pretraining."""
    found = [] if resume else run_files(folder)
    return f"another run ({', '.join(found)}); continue it with --resume" if found else None


@contextmanager
def claim_run_folder(folder: str | os.PathLike, other_run: Callable[[Path], str | None],
                     overwrite: bool = False) -> Iterator[Path]:
    """Hold ``folder`` exclusively for the block: create it, lock it, clean it, check it holds no other run.

    ``other_run(folder)`` describes another run found there (e.g. ``"another run (checkpoints); continue
    it with --resume"``) or returns None. It is asked only once the lock is held, so the answer cannot
    change underneath. With ``overwrite`` that run is moved to a sibling ``<folder>.old-<time>``.
    """
    folder = Path(folder)
    with _locked(folder):
        _remove_temporaries(folder)
        found = other_run(folder)
        if found and not overwrite:
            raise RunFolderError(f"{folder} holds {found}. To start anew, pass a new --out, or --overwrite to move "
                                 f"the old run aside to {folder}.old-<time>")
        if found:
            logger.warning("moved the run that was in %s to %s", folder, move_aside(folder))
        yield folder


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock`` holding this process's pid."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file; pass a folder (it is created when missing)")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunFolderError(f"cannot write to the run folder {folder} ({err.strerror}); "
                             f"pass a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderError(f"{folder} is in use by process {holder} (it holds {folder / LOCK}); wait for it "
                                 f"to finish, stop it, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    except BaseException:
        if created and [p.name for p in folder.iterdir()] == [LOCK]:  # a start that failed leaves no folder
            (folder / LOCK).unlink()
            folder.rmdir()
        raise
    finally:
        os.close(fd)  # drops the lock; a used folder keeps the file, as removing it could race with a new holder


def _remove_temporaries(folder: Path) -> None:
    """Delete what a write killed half-way left (only under the lock: no writer can be using them)."""
    parents = [folder, *(folder / name for name in RUN_FILES if (folder / name).is_dir())]
    stale = [path for parent in parents for pattern in TEMPORARIES for path in parent.glob(pattern)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if stale:
        logger.info("removed %d unfinished file(s) of a killed write: %s", len(stale),
                    ", ".join(str(p.relative_to(folder)) for p in stale))


def move_aside(folder: Path) -> Path:
    """Move everything in ``folder`` but its lock to a new sibling ``<folder>.old-<time>``; return that."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.resolve().with_name(f"{folder.resolve().name}.old-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{folder.resolve().name}.old-{stamp}-{suffix}")
    target.mkdir()
    for entry in folder.iterdir():
        if entry.name != LOCK:
            entry.rename(target / entry.name)
    return target
