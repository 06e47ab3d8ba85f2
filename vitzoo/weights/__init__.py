"""Weights in timm's layout: files, the Hugging Face hub, and loading with adaptation."""

from __future__ import annotations

from vitzoo.vit import VisionTransformer
from vitzoo.weights.files import WeightsError, read_state_dict, write_state_dict
from vitzoo.weights.hub import resolve_weights
from vitzoo.weights.load import LoadReport, adapt_state_dict, load_weights


def load_pretrained(model: VisionTransformer, pretrained: bool | str) -> LoadReport:
    """Load the weights ``pretrained`` names into ``model`` (see ``create_model``)."""
    path = resolve_weights(model.pretrained_cfg, pretrained)
    report = load_weights(model, read_state_dict(path))
    model.pretrained_cfg["file"] = str(path)
    return report


__all__ = [
    "LoadReport", "WeightsError", "adapt_state_dict", "load_pretrained", "load_weights",
    "read_state_dict", "resolve_weights", "write_state_dict",
]
