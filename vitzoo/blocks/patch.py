"""Patch-embedding slot.

Contract: ``factory(patch_size: int, in_chans: int, dim: int, norm: NormFactory, *, options) -> nn.Module``
mapping images ``(b, c, H, W) -> (b, h, w, dim)`` with ``h = H / patch_size``; ``norm`` is the model's
norm factory. The grid stays explicit in the output so the position block can resample for any input
size. The entries store the projection as timm does: ``proj.weight`` of shape ``(dim, c, p, p)``
(hybrids: ``(dim, cnn_channels, k, k)``; ``pixel_linear``, NaFlexViT's: ``(dim, p * p * c)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable, like_module
from vitzoo.fields import described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")


# names a patch embedding cannot be stored under: the model's other parts (see VisionTransformer.state_dict)
STORED_ELSEWHERE = ("blocks", "norm", "head", "position", "pos_embed", "cls_token", "fc_norm", "embeds")


@dataclass(frozen=True)
class ProjectionOptions(BlockOptions):
    """Options of every patch-embedding entry."""

    bias: bool = described(True, "bias on the patch projection (CLIP has none)")
    embeds: bool = described(
        False, "the state_dict keeps this embedding, the prefix tokens and the position tables under embeds., as "
               "timm's NaFlexVit does (embeds.proj.weight, embeds.cls_token, embeds.pos_embed)")
    stored_as: str = described(
        "patch_embed", "the name the state_dict keeps this embedding under: patch_embed (timm's ViT), stem (timm's "
                       "MlpMixer, ResMLP, gMLP: stem.proj.weight)")

    def check(self, spec: Any) -> None:
        if not self.stored_as.isidentifier() or self.stored_as in STORED_ELSEWHERE:
            raise ValueError(f"{type(self).__name__}.stored_as: {self.stored_as!r} is not a free module name; use an "
                             f"identifier such as 'patch_embed' or 'stem', not one of {', '.join(STORED_ELSEWHERE)}")
        if self.embeds and self.stored_as != "patch_embed":
            raise ValueError("embeds=True already stores this embedding as timm's NaFlexVit does (under embeds.); "
                             "leave stored_as='patch_embed'")


@dataclass(frozen=True)
class PatchOptions(ProjectionOptions):
    """Options of the patch embeddings whose norm on the patch tokens is optional."""

    norm: bool = described(
        False, "norm on the patch tokens, stored as patch_embed.norm (AIMv2; timm's embed_norm_layer)")
    pad: bool = described(
        False, "zero-pad images on the right and bottom to whole patches instead of refusing (timm's "
               "dynamic_img_pad)")


def pad_to_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """Zeros on the right and bottom of ``(b, c, H, W)`` images up to multiples of ``p`` (pixels keep their place):
    timm's ``dynamic_img_pad``, and ViTDet's padding before a detection or segmentation trunk."""
    return F.pad(images, (0, -images.shape[-1] % p, 0, -images.shape[-2] % p))


def patchify(images: torch.Tensor, p: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(b, c, H, W) -> (b, h, w, c*p*p)``: each row one patch, channels outermost as in a conv kernel.

    Cutting needs one copy; with ``dtype`` the copy is also the cast, so an fp32 image becomes bf16
    patches without an fp32 patch tensor in between.
    """
    grid = rearrange(images, "b c (h p1) (w p2) -> b h w c p1 p2", p1=p, p2=p)  # a view: nothing copied yet
    grid = grid.to(dtype or images.dtype, memory_format=torch.contiguous_format)
    return rearrange(grid, "b h w c p1 p2 -> b h w (c p1 p2)")


# Device types that autocast knows, found once: dynamo cannot trace ``torch.amp.is_autocast_available``
# (torch 2.11 breaks the compiled graph there), while a lookup in a constant set compiles away.
_DEVICE_KINDS = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "ipu")
AUTOCAST_DEVICES = frozenset(
    kind for kind in (*_DEVICE_KINDS, torch._C._get_privateuse1_backend_name()) if torch.amp.is_autocast_available(kind)
)


def autocast_casts(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device and casts it for matmuls (it leaves float64 alone)."""
    device = x.device.type
    return x.dtype != torch.float64 and device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs a matmul on ``x`` in: autocast's dtype where it is on, else ``x``'s own."""
    return torch.get_autocast_dtype(x.device.type) if autocast_casts(x) else x.dtype


class PatchLinear(torch.autograd.Function):
    """``F.linear(patchify(images), weight, bias)`` that keeps the image, not the patch copy, for backward.

    Autograd through ``rearrange`` + ``F.linear`` would save the patch copy (one image-sized tensor) until
    backward, although the image it was cut from is alive anyway: the weight gradient re-cuts the patches
    instead, which costs one copy of the image and nothing else. Under autocast the patches are cut
    straight into the autocast dtype (as ``F.linear`` would cast them); the backward computes in the
    gradient's dtype and returns each gradient in its input's dtype. A generated vmap rule keeps
    ``torch.func`` per-sample gradients (``vmap(grad(...))``) working. Forward-mode AD (``jvp``) is
    not offered: dynamo cannot trace a custom ``jvp`` without breaking the graph; use
    ``patch_embed="conv"`` for it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: int) -> torch.Tensor:
        return F.linear(patchify(images, p, matmul_dtype(images)), weight, bias)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        images, weight, bias, p = inputs
        ctx.save_for_backward(images, weight)
        ctx.p = p
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        images, weight = ctx.saved_tensors
        rows = rearrange(grad, "b h w d -> (b h w) d")
        grad_images = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_patches = grad @ weight.to(grad.dtype)
            grad_images = rearrange(grad_patches, "b h w (c p1 p2) -> b c (h p1) (w p2)", p1=ctx.p, p2=ctx.p)
            grad_images = grad_images.to(images.dtype)
        if ctx.needs_input_grad[1]:
            patches = rearrange(patchify(images, ctx.p, grad.dtype), "b h w k -> (b h w) k")
            grad_weight = (rows.t() @ patches).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0).to(ctx.bias_dtype)
        return grad_images, grad_weight, grad_bias, None


@torch.fx.wrap
def linear_patches(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: int) -> torch.Tensor:
    """``F.linear(patchify(images), weight, bias)``: :class:`PatchLinear`, or the plain autograd graph where a
    custom autograd function cannot be recorded (``torch.jit.trace`` would save a Python call that it
    cannot serialize). One opaque node of a ``torch.fx`` graph, where it runs :class:`PatchLinear` too."""
    if torch.jit.is_tracing():
        return F.linear(patchify(images, p), weight, bias)
    return PatchLinear.apply(images, weight, bias, p)


class LinearPatchEmbed(nn.Module):
    """Cut the image into p x p patches with einops and project each with one matmul (ViT)."""

    def __init__(
        self, patch_size: int, in_chans: int, dim: int, norm: NormFactory, *, options: PatchOptions = PatchOptions(),
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=options.bias)
        self.norm = norm(dim) if options.norm else nn.Identity()
        self.pad = options.pad

    def weight_matrix(self) -> torch.Tensor:
        """The conv-shaped ``proj.weight`` as the ``(dim, c*p*p)`` matrix that patch rows multiply (a view)."""
        return rearrange(self.proj.weight, "d c p1 p2 -> d (c p1 p2)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_patches(x, self.patch_size) if self.pad else x
        return self.norm(linear_patches(x, self.weight_matrix(), self.proj.bias, self.patch_size))


class NormedLinearPatchEmbed(LinearPatchEmbed):
    """Normalize each raw patch vector before the projection (lucidrains' vit-pytorch): patch
    statistics no longer depend on image contrast. The model's norm serves both the ``norm_in`` over
    ``c * p * p`` pixels and the ``norm`` over ``dim``, which is always on."""

    def __init__(
        self, patch_size: int, in_chans: int, dim: int, norm: NormFactory, *,
        options: ProjectionOptions = ProjectionOptions(),
    ) -> None:
        super().__init__(patch_size, in_chans, dim, norm, options=PatchOptions(bias=options.bias, norm=True))
        self.norm_in = norm(in_chans * patch_size * patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.norm_in(patchify(x, self.patch_size))
        return self.norm(F.linear(patches, self.weight_matrix(), self.proj.bias))


class PixelLinearPatchEmbed(LinearPatchEmbed):
    """The linear patch embedding with its weight stored as NaFlexViT stores it (timm's ``NaFlexEmbeds``): a
    ``proj`` linear layer of shape ``(dim, p * p * c)``, each patch flattened pixel by pixel with the channels of
    a pixel together, the layout of the patch sequences its data pipeline makes (:mod:`vitzoo.packing`)."""

    def __init__(
        self, patch_size: int, in_chans: int, dim: int, norm: NormFactory, *, options: PatchOptions = PatchOptions(),
    ) -> None:
        super().__init__(patch_size, in_chans, dim, norm, options=options)
        self.proj = nn.Linear(patch_size * patch_size * in_chans, dim, bias=options.bias)

    def weight_matrix(self) -> torch.Tensor:
        return rearrange(self.proj.weight, "d (p1 p2 c) -> d (c p1 p2)", p1=self.patch_size, p2=self.patch_size)


class ConvPatchEmbed(LinearPatchEmbed):
    """The same projection computed as a strided convolution (the original ViT code path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_patches(x, self.patch_size) if self.pad else x
        return self.norm(rearrange(self.proj(x), "b d h w -> b h w d"))


def resnetv2(in_chans: int, layers: tuple[int, ...]) -> nn.Module:
    """BiT ResNet-V2 (Kolesnikov et al. 2020) with weight-standardized "same" convs and no
    pre-activation, as in the ViT paper's hybrids; ``layers=()`` keeps only the stem (stride 4)."""
    from timm.layers import StdConv2dSame
    from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem

    conv = partial(StdConv2dSame, eps=1e-8)
    if not layers:
        return create_resnetv2_stem(in_chans, stem_type="same", preact=False, conv_layer=conv)
    return ResNetV2(layers=layers, num_classes=0, global_pool="", in_chans=in_chans, preact=False,
                    stem_type="same", conv_layer=conv)


def vitamin_stem(in_chans: int, widths: tuple[int, int, int], stem_width: int) -> nn.Module:
    """ViTamin's MobileConv stem (Chen et al. 2024): conv stem, two MBConv stages and a strided conv to the
    token width, stride 16 in all (timm's ``MbConvStages``, so ViTamin checkpoints load as they are)."""
    from timm.models.vitamin import MbConvStages, VitCfg, VitConvCfg

    conv_cfg = VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6)
    return MbConvStages(VitCfg(embed_dim=widths, depths=(2, 4, 1), stem_width=stem_width, conv_cfg=conv_cfg,
                               head_type="1d"), in_chans=in_chans)


def mobileclip_stem(in_chans: int, width: int) -> nn.Module:
    """MobileCLIP's ViT-B stem (Vasu et al. 2024): three non-overlapping GELU convs of strides 4, 2, 2
    (timm's ``ConvStem`` as ``vit_base_mci_224`` builds it)."""
    from timm.models.vision_transformer_hybrid import ConvStem

    return ConvStem(in_chans=in_chans, channels=(width // 4, width // 4, width), stride=(4, 2, 2),
                    kernel_size=(4, 2, 2), padding=0, act_layer=nn.GELU)


def timm_cnn_features(in_chans: int, name: str, stage: int) -> nn.Module:
    """One stage's feature map of a timm CNN (``features_only``), e.g. ResNet-D (He et al. 2019)."""
    import timm

    return timm.create_model(name, pretrained=False, in_chans=in_chans, features_only=True, out_indices=[stage])


class HybridPatchEmbed(nn.Module):
    """A CNN's feature map cut into patches and projected: the hybrid ViT (Dosovitskiy et al. 2021).

    ``patch_size`` is the total stride in pixels, so the patch grid is ``H / patch_size`` as for the
    other entries: the CNN reduces by ``reduction`` and ``proj`` covers ``patch_size / reduction``
    feature cells. ``backbone`` is timm's own CNN module, so timm's hybrid checkpoints load as they are.
    With ``proj=False`` the stem itself ends at the token width (ViTamin, MobileCLIP) and each feature
    cell is a token: ``proj`` is then an identity, as in timm's ``HybridEmbed(proj=False)``.
    """

    def __init__(
        self, patch_size: int, in_chans: int, dim: int, norm: NormFactory, *,
        backbone: Callable[[int], nn.Module], channels: int, reduction: int, proj: bool = True,
        options: PatchOptions = PatchOptions(),
    ) -> None:
        super().__init__()
        if patch_size % reduction:
            raise ValueError(f"this hybrid stem reduces images {reduction}x; patch_size={patch_size} must be a "
                             f"multiple of {reduction} (patch_size counts pixels, not feature cells)")
        if not proj and (channels != dim or patch_size != reduction):
            raise ValueError(f"this stem ends in {channels} channels at stride {reduction} with no projection; "
                             f"use embed_dim={channels} and patch_size={reduction}")
        self.backbone = backbone(in_chans)
        cells = patch_size // reduction
        self.proj = (nn.Conv2d(channels, dim, kernel_size=cells, stride=cells, bias=options.bias) if proj
                     else nn.Identity())
        self.norm = norm(dim) if options.norm else nn.Identity()
        self.patch_size, self.pad = patch_size, options.pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_patches(x, self.patch_size) if self.pad else x
        return self.norm(rearrange(self.proj(cnn_features(self.backbone, x)), "b d h w -> b h w d"))


@torch.fx.wrap
def cnn_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last feature map of a hybrid stem's CNN; timm's feature extractors return one map per stage.

    One opaque node of a ``torch.fx`` graph: timm's CNNs pad by Python arithmetic on shapes, which symbolic
    tracing cannot follow, and whether the CNN returns a list is only known by running it.
    """
    features = backbone(images)
    return features[-1] if isinstance(features, (list, tuple)) else features


def _patch_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A 2 x 3 patch image must come out as a (1, 2, 3, dim) grid of tokens."""
    patch_size, in_chans, dim = args[:3]
    return module(torch.randn(1, in_chans, 2 * patch_size, 3 * patch_size, **like_module(module))), (1, 2, 3, dim)


PATCH_EMBEDS: BlockTable = BlockTable(
    "patch_embed", "factory(patch_size, in_chans, dim, norm, *, options) -> module (b, c, H, W) -> (b, h, w, dim)",
    probe=_patch_probe,
)
PATCH_EMBEDS.register("linear", LinearPatchEmbed, options=PatchOptions)
PATCH_EMBEDS.register("conv", ConvPatchEmbed, options=PatchOptions)
PATCH_EMBEDS.register("pixel_linear", PixelLinearPatchEmbed, options=PatchOptions)
PATCH_EMBEDS.register("linear_prenorm", NormedLinearPatchEmbed, options=ProjectionOptions)
HYBRID_STEMS: dict[str, Callable] = {
    "hybrid_rstem": partial(HybridPatchEmbed, backbone=partial(resnetv2, layers=()), channels=64, reduction=4),
    "hybrid_r26": partial(HybridPatchEmbed, backbone=partial(resnetv2, layers=(2, 2, 2, 2)), channels=2048,
                          reduction=32),
    "hybrid_r50_s16": partial(HybridPatchEmbed, backbone=partial(resnetv2, layers=(3, 4, 9)), channels=1024,
                              reduction=16),
    "hybrid_r50": partial(HybridPatchEmbed, backbone=partial(resnetv2, layers=(3, 4, 6, 3)), channels=2048,
                          reduction=32),
    **{f"hybrid_{name}" + ("_s16" if reduction == 16 else ""): partial(
        HybridPatchEmbed, backbone=partial(timm_cnn_features, name=name, stage=stage), channels=channels,
        reduction=reduction,
    ) for name, stage, channels, reduction in (("resnet26d", 4, 2048, 32), ("resnet50d", 4, 2048, 32),
                                               ("resnet50d", 3, 1024, 16))},
    **{f"hybrid_vitamin_{size}": partial(
        HybridPatchEmbed, backbone=partial(vitamin_stem, widths=widths, stem_width=widths[0]), channels=widths[-1],
        reduction=16, proj=False,
    ) for size, widths in (("s", (64, 128, 384)), ("b", (128, 256, 768)), ("l", (160, 320, 1024)),
                           ("xl", (192, 384, 1152)))},
    "hybrid_mobileclip_b": partial(HybridPatchEmbed, backbone=partial(mobileclip_stem, width=768), channels=768,
                                   reduction=16, proj=False),
}
for _name, _stem in HYBRID_STEMS.items():
    PATCH_EMBEDS.register(_name, _stem, options=PatchOptions)
