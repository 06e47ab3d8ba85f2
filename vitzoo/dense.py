"""Dense features for detection and segmentation, read from a ViT's ``forward_intermediates``.

:func:`detection_backbone` is ViTDet (Li, Mao, Girshick, He 2022): a plain ViT, one neck from the
``neck`` table (the simple feature pyramid by default) and torchvision's extra pooled level, in the form
torchvision's ``FasterRCNN``/``MaskRCNN`` take as a backbone. :class:`LinearSegmenter` is DINOv2's linear
segmentation (several blocks' patch maps, one 1x1 conv, bilinear upsampling; SETR-naive with one block).

Both hold the model as ``trunk`` and train all of it: the parts the dense path never runs (the
classifier, attention pooling, a norm of the pooled vector, blocks after the last one read) are removed
from it, so every parameter left gets a gradient. The last map read goes through the model's final norm
(``norm=True``), so a checkpoint's trained final norm is used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.neck import NECKS
from vitzoo.blocks.options import option_names
from vitzoo.blocks.patch import pad_to_patches
from vitzoo.blocks.table import like_module
from vitzoo.inputs import block_indices
from vitzoo.registry import create_model
from vitzoo.vit import VisionTransformer


def dense_trunk(model: str | VisionTransformer, last_block: int, **create_model_kwargs: Any) -> VisionTransformer:
    """The model a dense head reads, with what that head never runs taken out (so no parameter idles).

    A name is built with ``num_classes=0, dynamic_img_size=True`` and ``create_model_kwargs``; a model is
    taken as it is and pruned in place (:meth:`VisionTransformer.prune_intermediate_layers`): the classifier,
    pooling and a pooled-feature norm go, and so do the blocks after ``last_block``; the spec follows.
    """
    if isinstance(model, str):
        model = create_model(model, **{"num_classes": 0, "dynamic_img_size": True, **create_model_kwargs})
    elif create_model_kwargs:
        raise TypeError(f"create_model keywords {sorted(create_model_kwargs)} apply to a model name only; "
                        f"build the model with them, or pass its name")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a model name or a vitzoo VisionTransformer, got {type(model).__name__}")
    if not model.dynamic_img_size:
        raise ValueError("a dense head takes images of any size (a detector resizes them), so the model needs "
                         "dynamic_img_size=True: create_model(name, dynamic_img_size=True), or pass the name")
    model.prune_intermediate_layers([last_block])
    return model


class DetectionBackbone(nn.Module):
    """A ViT and a neck as a torchvision detection backbone: ``forward(images)`` gives an ``OrderedDict`` of
    maps ``"0"``, ``"1"``, ... (the neck's, finest first) and ``"pool"`` (the coarsest, max-pooled with
    stride 2, torchvision's ``LastLevelMaxPool``), each with ``out_channels`` channels.

    With the default simple pyramid and patch size p the strides are p/4, p/2, p, 2p and 4p (4, 8, 16, 32,
    64 for p=16), the five levels torchvision's default anchor generator (sizes 32..512) and RoI pooler
    (``featmap_names=["0", "1", "2", "3"]``) expect. Images are padded to multiples of ``size_divisible``
    (2p with those levels); give the same value to the detector
    (``FasterRCNN(..., size_divisible=backbone.size_divisible)``) so that it pads first and computes exact
    strides (torchvision's default of 32 is already that for p=16).
    """

    def __init__(self, trunk: VisionTransformer, neck: nn.Module) -> None:
        """``neck`` reads the map of the trunk's last block (:func:`detection_backbone` removes later ones)."""
        super().__init__()
        self.trunk, self.neck = trunk, neck
        self.out_channels: int = neck.out_channels
        self.strides: tuple[float, ...] = (*neck.strides, 2 * neck.strides[-1])
        patch = trunk.spec.patch_size
        self.size_divisible: int = round(max(patch, *neck.strides))

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        (x,) = self.trunk.forward_intermediates(
            pad_to_patches(images, self.size_divisible), indices=[-1], norm=True, stop_early=True,
            output_fmt="NCHW", intermediates_only=True)
        maps = self.neck(x)
        out = OrderedDict((str(i), m) for i, m in enumerate(maps))
        out["pool"] = F.max_pool2d(maps[-1], kernel_size=1, stride=2)
        return out


def detection_backbone(
    model: str | VisionTransformer, neck: str | Mapping[str, Any] = "simple_pyramid", out_channels: int = 256,
    layer: int = -1, **create_model_kwargs: Any,
) -> DetectionBackbone:
    """A torchvision detection backbone (ViTDet) from a model name or model; see :class:`DetectionBackbone`.

    ``neck``: an entry of the ``neck`` table, or ``{"name": ..., **options}`` (``{"name": "simple_pyramid",
    "scales": [2, 1, 0.5]}``); ``out_channels`` sets the neck's option of that name. ``layer``: the block whose
    map the neck reads (the last one, as in ViTDet); later blocks are removed. A name is built with
    ``create_model(name, num_classes=0, dynamic_img_size=True, **create_model_kwargs)``
    (``pretrained=True`` loads timm's weights); a model passed in must have ``dynamic_img_size=True`` and
    becomes the backbone's ``trunk`` (see :func:`dense_trunk`).
    """
    trunk = dense_trunk(model, layer, **create_model_kwargs)
    given = {"name": neck} if isinstance(neck, str) else dict(neck)
    name = given.pop("name", "simple_pyramid")
    declared = NECKS.options_class(name)
    if declared is not None and "out_channels" in option_names(declared):
        given.setdefault("out_channels", out_channels)
    if declared is None and given:
        raise ValueError(f"neck {name!r} takes no options, got {sorted(given)}; pass neck={name!r}")
    options = declared(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}) if declared else None
    neck = NECKS.build(name, trunk.embed_dim, trunk.spec.patch_size, options=options)
    return DetectionBackbone(trunk, neck.to(**like_module(trunk)))


class LinearSegmenter(nn.Module):
    """DINOv2's linear segmentation (Oquab et al. 2023): the patch maps of several blocks, concatenated,
    batch-normed and classified per patch by one 1x1 conv, then upsampled bilinearly to the image. With
    ``blocks=1`` it is SETR-naive's readout without its hidden layer (Zheng et al. 2021).

    ``forward(images)`` gives logits ``(b, num_classes, H, W)`` for images of any size (padded to whole
    patches inside, the logits cropped back). ``blocks``: the last n blocks if an int, else those indices. A
    name is built as :func:`detection_backbone` builds it; a model passed in becomes ``trunk`` (:func:`dense_trunk`).
    """

    def __init__(
        self, model: str | VisionTransformer, num_classes: int, blocks: int | Sequence[int] = 4,
        **create_model_kwargs: Any,
    ) -> None:
        super().__init__()
        trunk = dense_trunk(model, -1, **create_model_kwargs)  # built and checked; blocks kept until known
        self.indices = block_indices(len(trunk.blocks), blocks)
        self.trunk = dense_trunk(trunk, max(self.indices))
        width, like = len(self.indices) * self.trunk.embed_dim, like_module(self.trunk)
        self.norm = nn.BatchNorm2d(width, **like)
        self.classifier = nn.Conv2d(width, num_classes, 1, **like)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patch = self.trunk.spec.patch_size
        padded = pad_to_patches(images, patch)
        maps = self.trunk.forward_intermediates(padded, indices=self.indices, norm=True, stop_early=True,
                                                output_fmt="NCHW", intermediates_only=True)
        logits = self.classifier(self.norm(rearrange(maps, "n b d h w -> b (n d) h w")))
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., : images.shape[-2], : images.shape[-1]]
