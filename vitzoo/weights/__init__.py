"""Weights in timm's layout: files, the Hugging Face hub, foreign formats, loading with adaptation."""

from __future__ import annotations

from vitzoo.vit import VisionTransformer
from vitzoo.weights.export import export_timm, from_pretrained, save_pretrained
from vitzoo.weights.files import WeightsError, read_state_dict, write_state_dict
from vitzoo.weights.formats import FORMATS, detect_format, spec_hints, to_timm_layout
from vitzoo.weights.hub import resolve_weights
from vitzoo.weights.load import LoadReport, adapt_state_dict, load_weights, load_weights_partial


def load_pretrained(model: VisionTransformer, pretrained: bool | str, partial: bool = False) -> LoadReport:
    """Load the weights ``pretrained`` names into ``model`` (see ``create_model``).

    Checkpoints of torchvision, HF transformers, JAX ``.npz`` or vit-pytorch are converted to timm's
    layout first (:mod:`vitzoo.weights.formats`). ``partial`` loads only the tensors that still fit a
    model whose blocks were swapped, and reports the rest as new or dropped; otherwise a mismatch is
    refused and the model left unchanged.
    """
    path = resolve_weights(model.pretrained_cfg, pretrained)
    state_dict, source, dropped = to_timm_layout(read_state_dict(path))
    report = (load_weights_partial if partial else load_weights)(model, state_dict)
    if source != "timm":
        report.adapted.insert(0, f"converted from the {FORMATS[source].name} layout"
                                 + (f"; dropped {', '.join(dropped)}" if dropped else ""))
    model.pretrained_cfg["file"] = str(path)
    return report


__all__ = [
    "FORMATS", "LoadReport", "WeightsError", "adapt_state_dict", "detect_format", "export_timm", "from_pretrained",
    "load_pretrained", "load_weights", "load_weights_partial", "read_state_dict", "resolve_weights",
    "save_pretrained", "spec_hints", "to_timm_layout", "write_state_dict",
]
