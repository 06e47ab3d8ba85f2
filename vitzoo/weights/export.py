"""Writing models out: a self-describing folder vitzoo rebuilds without code, and timm's own layout.

``save_pretrained(model, folder)`` writes ``model.safetensors`` and ``config.json`` (the spec and
the preprocessing config), the way HF transformers folders describe themselves; ``from_pretrained``
reads it back. ``export_timm`` writes the weights alone, for
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``: vitzoo's
layout is timm's, so nothing is renamed. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vitzoo.spec import ViTSpec
from vitzoo.vit import VisionTransformer
from vitzoo.weights.files import WeightsError, read_state_dict, write_state_dict, write_text_atomic
from vitzoo.weights.load import load_weights

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def save_pretrained(model: VisionTransformer, folder: str | os.PathLike) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_state_dict(model.state_dict(), folder / WEIGHTS, metadata={"format": "pt"})
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "file"}
    config: dict[str, Any] = {"architecture": cfg.get("architecture"), "spec": model.spec.to_dict(),
                              "pretrained_cfg": cfg}
    write_text_atomic(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pretrained`."""
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def from_pretrained(folder: str | os.PathLike) -> VisionTransformer:
    """The model a :func:`save_pretrained` folder describes, weights loaded strictly."""
    folder = Path(folder)
    if not is_pretrained_folder(folder):
        raise WeightsError(f"{folder} is not a save_pretrained folder (it needs {CONFIG} and {WEIGHTS}); "
                           f"for a bare weights file use create_model(name, pretrained=PATH)")
    config = json.loads((folder / CONFIG).read_text())
    model = VisionTransformer(ViTSpec.from_dict(config["spec"]), pretrained_cfg=config.get("pretrained_cfg"))
    load_weights(model, read_state_dict(folder / WEIGHTS), adapt=False)
    model.pretrained_cfg["file"] = str(folder / WEIGHTS)
    return model


def export_timm(model: VisionTransformer, path: str | os.PathLike) -> Path:
    """Weights for timm's model of the same name: a safetensors file in timm's (= vitzoo's) layout."""
    return write_state_dict(model.state_dict(), path, metadata={"format": "pt"})
