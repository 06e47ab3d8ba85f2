"""Reading and writing weight files safely: safetensors, or ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, unsafe, or for another architecture."""


def _run_folder_hint(folder: Path) -> str:
    """What to load instead, where ``folder`` is a training run's folder (its weights are in its checkpoints)."""
    named = {"best": "the best by validation", "latest": "the latest"}
    found: dict[Path, str] = {}
    for name, what in named.items():
        pointer = folder / "checkpoints" / name
        if pointer.is_file():
            found.setdefault(folder / "checkpoints" / pointer.read_text().strip(), what)
    if (folder / "merged").is_dir():
        found[folder / "merged"] = "the adapters folded in at the end"
    if not found:
        return ""
    return "; it is a training run's folder: load " + " or ".join(f"{path} ({what})" for path, what in found.items())


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Tensors of a ``.safetensors``, ``.npz`` or pickled checkpoint, never running code from the file.

    Pickles are read with ``weights_only=True``; a checkpoint that wraps its weights in
    ``{"state_dict": ...}``, ``{"model": ...}`` or ``{"encoder": ...}`` (I-JEPA's, as timm reads it) is
    unwrapped, and the ``module.`` prefix a DistributedDataParallel model gives every key is dropped.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise WeightsError(f"{path} holds none of {', '.join(WEIGHT_FILES)}{_run_folder_hint(path)}")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".npz":  # JAX/Flax checkpoints: plain arrays, never pickles
        import zipfile

        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as arrays:
                return {key: torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)) for key in arrays.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # EOFError: an empty file
            raise WeightsError(f"{path} is not a readable .npz file ({error_line(err)}); re-download it") from None
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise WeightsError(
                f"{path} is not a readable safetensors file ({err}); re-download or re-export it"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise WeightsError(
            f"{path} could not be loaded safely ({error_line(err)}); "
            "it is truncated, corrupted, or contains code: vitzoo only reads plain tensors"
        ) from None
    for key in ("state_dict", "model", "module", "encoder"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    if obj and all(key.startswith("module.") for key in obj):
        obj = {key.removeprefix("module."): tensor for key, tensor in obj.items()}
    return obj


def error_line(err: BaseException) -> str:
    """An exception as one short line for a message; some (an empty file's EOFError) have no text."""
    text = str(err).strip().partition("\n")[0][:200]
    return f"{type(err).__name__}: {text}" if text else f"{type(err).__name__}, the file is empty or cut short"


@contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file in ``path``'s folder that replaces ``path`` when the block succeeds and is
    removed when it fails, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_state_dict(state_dict: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors atomically: to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with _replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (JSON configs, results) the same way: temporary file, then rename."""
    path = Path(path)
    with _replacing(path) as tmp:
        Path(tmp).write_text(text)
    return path
