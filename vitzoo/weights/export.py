"""Writing models out: a self-describing folder vitzoo rebuilds without code, and timm's own layout.

``save_pretrained(model, folder)`` writes ``model.safetensors`` and ``config.json`` (the spec and
the preprocessing config), the way HF transformers folders describe themselves; ``from_pretrained``
reads it back. ``export_timm`` writes the weights alone, for
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``: vitzoo's
layout is timm's, so nothing is renamed. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vitzoo.blocks.pooling import with_global_pool
from vitzoo.migrate import spec_from_saved
from vitzoo.size import MAX_PARAMS
from vitzoo.spec import ViTSpec
from vitzoo.vit import VisionTransformer
from vitzoo.weights.files import StateDict, WeightsError, read_state_dict, write_state_dict, write_text_atomic
from vitzoo.weights.load import load_weights, load_weights_partial

logger = logging.getLogger("vitzoo")

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def save_pretrained(model: VisionTransformer, folder: str | os.PathLike, state_dict: StateDict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the folder. ``state_dict``: the
    weights to write instead of the model's own (full weights gathered under FSDP, adapters merged in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_state_dict(model.state_dict() if state_dict is None else state_dict, folder / WEIGHTS,
                     metadata={"format": "pt"})
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "file"}
    config: dict[str, Any] = {"architecture": cfg.get("architecture"), "spec": model.spec.to_dict(),
                              "pretrained_cfg": cfg}
    write_text_atomic(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pretrained`."""
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def read_config(folder: str | os.PathLike) -> tuple[ViTSpec, dict[str, Any]]:
    """The spec and preprocessing config in a :func:`save_pretrained` folder's ``config.json``; a file that
    is not such a config is refused with its path and what is wrong with it."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON ({err}); write it again with save_pretrained") from None
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        raise WeightsError(f"{path} holds no \"spec\" object (the ViTSpec fields save_pretrained writes); "
                           f"write it again with save_pretrained")
    cfg = config.get("pretrained_cfg") or {}
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: \"pretrained_cfg\" must be an object, got {type(cfg).__name__}")
    try:
        return spec_from_saved(config["spec"]), cfg
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from None


def is_folder_path(name: str | os.PathLike) -> bool:
    """Whether ``create_model``'s name is a folder path rather than a registry name (which has no ``/``)."""
    return not isinstance(name, str) or "/" in name or os.sep in name or is_pretrained_folder(name)


def from_pretrained(
    folder: str | os.PathLike, *, max_params: int | None = MAX_PARAMS, global_pool: str | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """The model a :func:`save_pretrained` folder describes, with its weights.

    Without ``overrides`` the weights load strictly. With ``num_classes`` or ``img_size`` they are
    adapted (a new head, a resampled position table); with other spec fields, or timm's ``global_pool``
    (read as the model's pooling reads it), the tensors that still fit load and the rest stay freshly
    initialised, as in ``create_model``. Each adaptation is logged.
    """
    folder = Path(folder)
    if not is_pretrained_folder(folder):
        raise WeightsError(f"{folder} is not a save_pretrained folder (it needs {CONFIG} and {WEIGHTS}); "
                           f"for a bare weights file use create_model(name, pretrained=PATH)")
    spec, cfg = read_config(folder)
    spec = with_global_pool(spec.replace(**overrides) if overrides else spec, global_pool)
    model = VisionTransformer(spec, cfg, max_params=max_params)
    state_dict = read_state_dict(folder / WEIGHTS)
    if global_pool is not None or set(overrides) - {"num_classes", "img_size"}:
        report = load_weights_partial(model, state_dict)
    else:
        report = load_weights(model, state_dict, adapt=bool(overrides))
    for line in report.adapted:
        logger.info("%s: %s", folder, line)
    model.pretrained_cfg["file"] = str(folder / WEIGHTS)
    return model


def export_timm(model: VisionTransformer, path: str | os.PathLike) -> Path:
    """Weights for timm's model of the same name: a safetensors file in timm's (= vitzoo's) layout."""
    return write_state_dict(model.state_dict(), path, metadata={"format": "pt"})
