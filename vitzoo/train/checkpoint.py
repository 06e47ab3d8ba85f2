"""Training checkpoints that are never half-written and resume a run exactly.

A checkpoint is a folder ``step_NNNNNNNN/`` holding the weights (``model.safetensors``, and
``ema.safetensors`` when averaging) and ``trainer.pt`` (optimizer state unsharded and keyed by
parameter name, schedule, RNG, position in the data order, curves so far; plain tensors and numbers,
read with ``weights_only=True``). The folder is written under a temporary name and renamed into
place, then the ``latest`` pointer is replaced atomically: a crash at any moment leaves the previous
checkpoint intact and pointed to. Rotation keeps the newest ``keep`` checkpoints and the one the
``best`` pointer names (the best validation accuracy so far), however old. The weights file is
timm's layout, so ``create_model(name, pretrained="<run>/checkpoints/step_.../")`` loads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from vitzoo.weights import WeightsError, read_state_dict, write_state_dict
from vitzoo.weights.files import write_text_atomic

LATEST = "latest"
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
    """The checkpoint ``latest`` points to in ``folder`` (a run's ``checkpoints/``), or None."""
    pointer = Path(folder) / LATEST
    return Path(folder) / pointer.read_text().strip() if pointer.is_file() else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, Any], dict | None]:
    """(weights, trainer state, EMA weights or None) of one checkpoint folder, read safely."""
    path = Path(path)
    if not (path / "trainer.pt").is_file():
        raise WeightsError(f"{path} is not a training checkpoint (no trainer.pt); pass a run's checkpoint folder, "
                           f"e.g. <out>/checkpoints/step_00000100, or the run folder itself with --resume")
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    ema = read_state_dict(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    return read_state_dict(path / "model.safetensors"), trainer, ema
