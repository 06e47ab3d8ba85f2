"""Training checkpoints that are never half-written and resume a run exactly.

A checkpoint is a folder ``step_NNNNNNNN/`` holding the weights (``model.safetensors``, and
``ema.safetensors`` when averaging) and ``trainer.pt`` (optimizer state unsharded and keyed by
parameter name, schedule, RNG, position in the data order, curves so far; plain tensors and numbers,
read with ``weights_only=True``). The folder is written under a temporary name and renamed into
place, then the ``latest`` pointer is replaced atomically: a crash at any moment leaves the previous
checkpoint intact and pointed to. Rotation keeps the newest ``keep`` checkpoints and the one the
``best`` pointer names (the best validation accuracy so far), however old. Damage from elsewhere (a
disk error, a file cut short by hand) is caught on resume: an unreadable newest checkpoint gives way
to the previous one, with a warning. The weights file is timm's layout, so ``create_model(name,
pretrained="<run>/checkpoints/step_.../")`` loads it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vitzoo.weights import WeightsError, read_state_dict, write_state_dict
from vitzoo.weights.files import error_line, write_text_atomic

logger = logging.getLogger("vitzoo.checkpoint")

LATEST = "latest"
STEP_NAME = re.compile(r"step_\d+")
BEST = "best"


def save_checkpoint(
    folder: str | os.PathLike, step: int, weights: dict[str, torch.Tensor], trainer: dict[str, Any],
    ema_weights: dict[str, torch.Tensor] | None = None, keep: int = 2, best_step: int | None = None,
) -> Path:
    """Write ``step_<step>/`` atomically, point ``latest`` at it (and ``best`` at ``step_<best_step>/``), keep
    the newest ``keep`` checkpoints and the best one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_state_dict(weights, tmp / "model.safetensors")
        if ema_weights is not None:
            write_state_dict(ema_weights, tmp / "ema.safetensors")
        torch.save(trainer, tmp / "trainer.pt")
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(folder / LATEST, final.name)
    best = f"step_{best_step:08d}" if best_step is not None else None
    if best:
        write_text_atomic(folder / BEST, best)
    for old in sorted(folder.glob("step_*"))[:-keep]:
        if old.name != best:
            shutil.rmtree(old)
    return final


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest readable checkpoint in ``folder`` (a run's ``checkpoints/``), or None when it has none.

    That is the one ``latest`` names, or when it cannot be read, the newest older one that can (with a
    warning), so a damaged file costs the steps since the previous checkpoint instead of the run.
    ``latest`` must name a ``step_N`` folder of ``folder`` itself, never a link: a resume reads no file
    outside the run folder.
    """
    folder = Path(folder)
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _own(folder, folder / name):
        raise WeightsError(f"{pointer} names {name!r}, which is not a checkpoint folder of {folder}; write the "
                           f"name of one of its step_NNNNNNNN folders into it")
    older = sorted((p for p in folder.glob("step_*") if _own(folder, p) and p.name < name), reverse=True)
    damaged = []
    for path in [folder / name, *older]:
        problem = _unreadable(path)
        if problem is None:
            if damaged:
                logger.warning("cannot read %s; resuming from %s instead", "; ".join(damaged), path.name)
            return path
        damaged.append(f"{path.name} ({problem})")
    raise WeightsError(f"no checkpoint in {folder} can be read: {'; '.join(damaged)}; start the run anew "
                       f"(--overwrite moves this one aside)")


def _own(folder: Path, path: Path) -> bool:
    """Whether ``path`` is a checkpoint's name directly in ``folder``, not a path or a link to somewhere else."""
    return path.parent == folder and STEP_NAME.fullmatch(path.name) is not None and not path.is_symlink()


def _unreadable(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be read, or None; reads its files' structure, not their tensors."""
    files = [path / "model.safetensors", path / "trainer.pt", *path.glob("ema.safetensors")]
    if any(p.is_symlink() for p in files):
        return "it holds links instead of files"
    for file in files:
        try:
            if not file.is_file():
                return f"{file.name} is missing"
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif not zipfile.is_zipfile(file):
                return f"{file.name}: not an archive written by torch.save"
            else:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # a missing file, a cut-short archive, a garbled pickle or safetensors header
            return f"{file.name}: {error_line(err)}"
    return None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, Any], dict | None]:
    """(weights, trainer state, EMA weights or None) of one checkpoint folder, read safely."""
    path = Path(path)
    trainer = read_trainer_state(path)
    ema = read_state_dict(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    return read_state_dict(path / "model.safetensors"), trainer, ema


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (``trainer.pt``: step, optimizer, settings, spec, ...) of one checkpoint folder, read
    safely, without its weights."""
    path = Path(path)
    if not (path / "trainer.pt").is_file():
        raise WeightsError(f"{path} is not a training checkpoint (no trainer.pt); pass a run's checkpoint folder, "
                           f"e.g. <out>/checkpoints/step_00000100, or the run folder itself with --resume")
    try:
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise WeightsError(f"{path / 'trainer.pt'} cannot be read ({error_line(err)}); resume from an older "
                           f"checkpoint of the run, or start it anew") from None
    return trainer
