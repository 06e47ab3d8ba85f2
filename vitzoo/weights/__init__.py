"""Weights in timm's layout: files, the Hugging Face hub, foreign formats, loading with adaptation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitzoo.vit import VisionTransformer
from vitzoo.weights.export import export_timm, from_pretrained, save_pretrained
from vitzoo.weights.files import StateDict, WeightsError, read_state_dict, write_state_dict
from vitzoo.weights.formats import FORMATS, detect_format, spec_hints, to_timm_layout
from vitzoo.weights.hub import resolve_weights
from vitzoo.weights.load import LoadReport, adapt_state_dict, load_weights, load_weights_partial


@dataclass
class Checkpoint:
    """Pretrained weights read once and put in timm's layout, so the spec can follow what they imply
    (:meth:`hints`) before the model is built and loaded from them."""

    path: Path
    state_dict: StateDict
    source: str  # "timm" or a key of FORMATS
    dropped: list[str]  # source keys without a counterpart in timm's layout

    def hints(self) -> dict[str, object]:
        """Spec fields a foreign checkpoint implies (its tokens, qkv bias, epsilon); none for timm's own."""
        return {} if self.source == "timm" else spec_hints(self.source, self.state_dict)


def read_checkpoint(pretrained_cfg: dict, pretrained: bool | str) -> Checkpoint:
    """The weights ``pretrained`` names (see ``create_model``), read and converted to timm's layout."""
    path = resolve_weights(pretrained_cfg, pretrained)
    from vitzoo.lora import fold_run_checkpoint  # vitzoo.lora builds on this package

    return Checkpoint(path, *to_timm_layout(fold_run_checkpoint(read_state_dict(path), path)))


def load_pretrained(
    model: VisionTransformer, pretrained: bool | str | Checkpoint, partial: bool = False
) -> LoadReport:
    """Load the weights ``pretrained`` names, or an already read :class:`Checkpoint`, into ``model``.

    Checkpoints of torchvision, HF transformers, JAX ``.npz``, vit-pytorch, Meta's Sapiens2 or Segment Anything
    are converted to timm's layout first (:mod:`vitzoo.weights.formats`). ``partial`` loads only the
    tensors that still fit a model whose blocks were swapped, and reports the rest as new or
    dropped; otherwise a mismatch is refused and the model left unchanged.
    """
    ckpt = pretrained if isinstance(pretrained, Checkpoint) else read_checkpoint(model.pretrained_cfg, pretrained)
    report = (load_weights_partial if partial else load_weights)(model, ckpt.state_dict)
    if ckpt.source != "timm":
        dropped = ", ".join(ckpt.dropped[:8]) + (f" ... ({len(ckpt.dropped)} in all)" if len(ckpt.dropped) > 8 else "")
        report.adapted.insert(0, f"converted from the {FORMATS[ckpt.source].name} layout"
                                 + (f"; dropped {dropped}" if ckpt.dropped else ""))
    model.pretrained_cfg["file"] = str(ckpt.path)
    return report


__all__ = [
    "FORMATS", "Checkpoint", "LoadReport", "WeightsError", "adapt_state_dict", "detect_format", "export_timm",
    "from_pretrained", "load_pretrained", "load_weights", "load_weights_partial", "read_checkpoint",
    "read_state_dict", "resolve_weights", "save_pretrained", "spec_hints", "to_timm_layout", "write_state_dict",
]
