"""Feature maps of chosen blocks: ``create_model(name, features_only=True)`` as timm gives it for ViTs.

timm wraps a ViT built with ``features_only=True`` in a module that calls the model's
``forward_intermediates`` (its ``feature_cls="getter"``) and describes the outputs with a
``feature_info`` (channels and stride of each). Detection and segmentation code written for timm
reads exactly these, so vitzoo returns the same: the same outputs, the same ``feature_info``, the
same ``model.``-prefixed state_dict, and the model pruned past the last block asked for.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitzoo.inputs import block_indices
from vitzoo.vit import VisionTransformer

OUTPUT_FORMATS = ("NCHW", "NLC")
# Keyword arguments of timm's create_model that configure the feature wrapper, not the model.
FEATURE_KEYWORDS = ("out_indices", "feature_cls", "feature_cfg", "output_fmt")
DEFAULT_OUT_INDICES = 3  # the last three blocks, as timm's ViTs default to
# Entries of the preprocessing config that describe the classifier, dropped as timm drops them for features.
CLASSIFIER_KEYS = ("num_classes", "classifier", "global_pool")


class FeatureInfo:
    """What each feature output is: ``channels()``, ``reduction()`` (stride in pixels) and ``module_name()``
    of the blocks in ``out_indices``, or of the blocks ``idx`` names; indexable like timm's ``FeatureInfo``."""

    def __init__(self, info: list[dict[str, Any]], out_indices: int | Sequence[int] | None) -> None:
        self.info = [{**item, "index": i} for i, item in enumerate(info)]
        self.out_indices = tuple(block_indices(len(info), out_indices))

    def from_other(self, out_indices: int | Sequence[int] | None) -> FeatureInfo:
        return FeatureInfo(copy.deepcopy(self.info), out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key`` of each output (``idx`` None), of one block (int) or of the blocks listed."""
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in (self.out_indices if idx is None else idx)]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        def pick(i: int) -> dict[str, Any]:
            return dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}

        return pick(idx) if isinstance(idx, int) else [pick(i) for i in (self.out_indices if idx is None else idx)]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class FeatureGetter(nn.Module):
    """A model whose forward returns the hidden states of the blocks ``out_indices`` names, as maps
    ``(b, dim, h, w)`` (``output_fmt="NCHW"``) or token sequences without prefix tokens (``"NLC"``).

    The blocks after the last one asked for, the head and pooling are pruned (as timm does), and so is the
    final norm unless ``norm=True`` applies it to every output.
    """

    def __init__(
        self, model: VisionTransformer, out_indices: int | Sequence[int] = DEFAULT_OUT_INDICES,
        output_fmt: str = "NCHW", norm: bool = False,
    ) -> None:
        super().__init__()
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt={output_fmt!r}: ViT features come as {' or '.join(OUTPUT_FORMATS)}")
        info = model.feature_info  # every block's, as timm describes a pruned model
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_norm=not norm))
        self.feature_info = FeatureInfo(info, self.out_indices)
        self.model = model
        self.output_fmt = output_fmt
        self.norm = norm
        self.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in CLASSIFIER_KEYS}

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            images, self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True,
        )


def features_model(model: VisionTransformer, options: dict[str, Any]) -> FeatureGetter:
    """``model`` wrapped as ``create_model(..., features_only=True, **options)`` asks, with timm's keywords:
    ``out_indices``, ``output_fmt``, ``feature_cls`` (only timm's ``"getter"``, its choice for ViTs) and
    ``feature_cfg`` (a dict of the same, plus ``norm``)."""
    cfg = {**(options.pop("feature_cfg", None) or {}), **options}
    feature_cls = cfg.pop("feature_cls", "getter")
    if feature_cls != "getter":
        raise ValueError(
            f"feature_cls={feature_cls!r}: vitzoo's features come from forward_intermediates (timm's 'getter', "
            f"what timm uses for ViTs); for other nodes use torchvision's create_feature_extractor(model, ...)")
    unknown = sorted(set(cfg) - {"out_indices", "output_fmt", "norm"})
    if unknown:
        raise ValueError(f"features_only: unknown feature option(s) {unknown}; "
                         f"valid: out_indices, output_fmt, feature_cls, norm")
    return FeatureGetter(model, **cfg)
