"""Readouts of the vision towers of vision-language models (pool slot): the projector ("merger", "aligner") that
turns the patch grid into the tokens a language model reads, and the classifier readout timm puts on these
towers (mean of the tokens, then a norm without parameters).

A projector concatenates the tokens of each ``k x k`` cell of the patch grid (a pixel unshuffle) and maps them
with a two-layer MLP to the language model's width ``out_features``. With ``readout="none"`` the model's output
is those tokens ``(b, cells, out_features)`` (timm's ``*_enc`` names); with ``readout="avg_norm"`` their mean,
normalized, goes to the classifier (timm's ``*_merge`` / ``*_align`` names), with ``readout="norm"`` each token
normalized (those classifiers with timm's ``global_pool=''``). ``out_dim`` tells the model the
width its head reads. The module is stored under timm's name for it (``state_name``), not ``attn_pool``, and
``checkpoint_prefix`` names the rest of the model as timm's classifier wrappers do (``encoder.``).

These readouts also shape ``forward_features`` as timm's towers do (:meth:`_Projector.feature_stage`): the patch
tokens as a ``(b, h, w, dim)`` grid (``output_fmt`` NHWC), or, where the projector feeds a classifier, the
projector's tokens; the readout then reads that. The projectors read the grid from its shape, so any
image size, square or not, whose grid holds whole cells goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import GridOptions
from vitzoo.blocks.pooling import POOLS, MlpFactory, PoolOptions, _Readout, masked_mean, require_cells
from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, described

torch.fx.wrap("rearrange")
READOUTS = ("none", "avg_norm", "norm")


@torch.fx.wrap
def whole_cells(x: torch.Tensor, cell: int, reader: str) -> torch.Tensor:
    """The grid ``x`` ``(b, h, w, d)``, refused (:func:`~vitzoo.blocks.pooling.require_cells`) when it is not whole
    ``cell x cell`` cells; a graph node under ``torch.fx``, where the sides are known only when the graph runs."""
    require_cells((x.shape[1], x.shape[2]), cell, reader)
    return x


def parameter_free(norm: nn.Module) -> nn.Module:
    """``norm`` (a LayerNorm or RMSNorm from the model's norm factory) without its learned scale and bias: it
    normalizes only, and leaves no keys (timm's ``affine=False`` classifier norm of the VLM towers)."""
    for name in ("weight", "bias"):
        if getattr(norm, name, None) is not None:
            setattr(norm, name, None)
    return norm


def _checkpoint_prefix() -> str:
    return described("", "state_dict names of all but the head under this prefix (timm's VLM-tower classifiers "
                     "hold the tower as 'encoder.')")


@dataclass(frozen=True)
class AvgNormOptions(PoolOptions):
    """Options of the classifier readout of the VLM towers."""

    norm: bool = described(True, "the parameter-free norm after the mean (timm's final_norm)")
    mean: bool = described(True, "average the tokens, then norm them (timm's global_pool='avg'); False: each token "
                           "normed, (b, tokens, dim) out (timm's global_pool='')")
    checkpoint_prefix: str = _checkpoint_prefix()
    grid: bool = described(False, "forward_features returns the patch tokens as a (b, h, w, dim) grid (timm's NHWC "
                           "output of the Qwen3-VL and DeepSeek-V4 towers; Gemma 4's are tokens)")
    flatten: bool = described(True, "without mean, the tokens come out as (b, h*w, dim) (timm's classifiers' "
                              "global_pool=''); False: as the grid forward_features gives (its encoder towers')")
    std_buffers: bool = described(
        False, "hold the tower's std_bias / std_scale buffers, which only its own readout applies (timm's Gemma 4 "
               "26B/31B classifier stores them unused)")


TIMM_GLOBAL_POOLS = {"avg": True, "": False, "none": False}  # timm's global_pool of these towers: a mean or not


def encoder_readout(mean: bool) -> dict[str, Any]:
    """The pool entry of a Qwen3-VL / DeepSeek-V4 encoder tower without its projector (timm's ``global_pool``
    ``'avg'``: the plain mean of the grid; ``''``: the grid itself, ``(b, h, w, dim)``), forward_features still
    giving the grid."""
    return {"name": "avg_norm", "grid": True, "mean": mean, "norm": False, "flatten": False}


class AvgNormPool(_Readout):
    """Mean of the patch tokens, then a parameter-free norm of the model's kind: the classifier readout timm puts
    on VLM vision towers whose own output is not normalized for classification (Qwen3-VL, DeepSeek-V4, Gemma 4);
    without ``mean``, each token normalized (timm's ``global_pool=''`` there).
    With ``grid`` the model's forward_features gives the tokens as a ``(b, h, w, dim)`` grid, which it reads, and
    without ``mean`` nor ``flatten`` returns as it is (timm's encoder towers without their projector).
    Its buffers, if any, are stored at the model's top level."""

    state_name = ""
    pruned_pool = None  # prune_intermediate_layers(prune_head=True) keeps it, as timm's towers keep their pooling

    @staticmethod
    def timm_global_pools(options: AvgNormOptions) -> dict[str, dict[str, Any]]:
        """timm's ``global_pool`` names here: a mean or not (see :func:`vitzoo.blocks.pooling.global_pool_change`)."""
        return {name: {"mean": mean} for name, mean in TIMM_GLOBAL_POOLS.items()}

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: AvgNormOptions,
    ) -> None:
        super().__init__(dim, num_heads, mlp_ratio, norm, mlp, num_prefix, options=options)
        self.norm = parameter_free(norm(dim)) if options.norm else nn.Identity()
        self.mean, self.flatten = options.mean, options.flatten
        self.output_fmt = "NHWC" if options.grid else None
        if options.std_buffers:
            self.register_buffer("std_bias", torch.zeros(dim))
            self.register_buffer("std_scale", torch.ones(dim))

    def feature_stage(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The normed tokens ``(b, h*w, dim)`` as forward_features returns them: a ``(b, h, w, dim)`` grid with
        ``grid``, else unchanged."""
        return rearrange(x, "b (h w) d -> b h w d", h=grid[0]) if self.output_fmt else x

    @property
    def timm_global_pool(self) -> str:
        """The model's global_pool, timm's name: ``'avg'``, or ``''`` for tokens."""
        return "avg" if self.mean else ""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.output_fmt and valid is None:  # an image batch's grid; patch sequences come as tokens and valid
            if not (self.mean or self.flatten):  # timm's encoder towers give their grid as it is
                return self.norm(x)
            x = rearrange(x, "b h w d -> b (h w) d")
        x, valid = self._read(x, valid)
        return self.norm(masked_mean(x, valid) if self.mean else x)


@dataclass(frozen=True)
class ProjectorOptions(GridOptions):
    """Options of the VLM projectors."""

    cell: int = described(2, "side of the k x k cell of patch tokens merged into one (Qwen 2, DeepSeek 3)",
                          AT_LEAST_ONE)
    out_features: int = described(0, "output width, the language model's; 0: k*k*dim (the merger: no fc2)",
                                  NON_NEGATIVE)
    readout: str = described("avg_norm", "after projecting: avg_norm (mean, parameter-free norm, for a classifier "
                             "head) | norm (each token normed: timm's global_pool='') | none (the tokens are the "
                             "output: a VLM's image tokens)")
    checkpoint_prefix: str = _checkpoint_prefix()

    def check(self, spec) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"ProjectorOptions.readout: {self.readout!r} is not one of {', '.join(READOUTS)}")
        if spec.num_prefix_tokens:
            raise ValueError("a projector merges cells of the patch grid; use class_token=False and reg_tokens=0")


class _Projector(nn.Module):
    """Shared by the projectors: the cell grid, the output width, the optional classifier readout, and what
    forward_features returns: the grid ``(b, h, w, dim)`` the projector reads (``readout="none"``, timm's encoder
    towers), or the projector's tokens, which the classifier readout reads (timm's ``_merge`` / ``_align``)."""

    state_name = "attn_pool"

    def __init__(self, dim: int, norm: NormFactory, options: ProjectorOptions) -> None:
        super().__init__()
        self.grid, self.cell, self.checkpoint_prefix = options.grid, options.cell, options.checkpoint_prefix
        self.out_dim = options.out_features or dim * options.cell**2
        self.readout = parameter_free(norm(self.out_dim)) if options.readout != "none" else None
        self.mean = options.readout == "avg_norm"
        # timm declares NLC for the projected tokens, and its own test_model_default_cfgs then fails on those
        # names (it supports 2-D outputs only); vitzoo declares no format there, as for other token outputs
        self.output_fmt = "NHWC" if self.readout is None else None

    @classmethod
    def timm_global_pools(cls, options: ProjectorOptions) -> dict[str, dict[str, Any]]:
        """timm's ``global_pool`` names here (see :func:`vitzoo.blocks.pooling.global_pool_change`): on a classifier
        the readout after the projector; on an encoder tower its own name keeps the projector, and ``'avg'`` / ``''``
        go without it, as timm's tower builds them (:func:`encoder_readout`)."""
        if options.readout == "none":
            without = {name: encoder_readout(mean) for name, mean in TIMM_GLOBAL_POOLS.items()}
            return {cls.timm_encoder_pool: {}, **without}
        return {name: {"readout": "avg_norm" if mean else "norm"} for name, mean in TIMM_GLOBAL_POOLS.items()}

    @property
    def timm_global_pool(self) -> str:
        """The model's global_pool, timm's name: the classifier's ``'avg'`` or ``''``, or the encoder tower's own
        name for its projector (``'merge'``, ``'align'``)."""
        if self.readout is None:
            return self.timm_encoder_pool
        return "avg" if self.mean else ""

    @property
    def pruned_pool(self) -> dict[str, Any]:
        """What ``prune_intermediate_layers(prune_head=True)`` makes of this readout, as timm's towers prune theirs:
        the projector goes; a classifier keeps its mean (or not) and norm over the patch grid, an encoder tower
        gives the grid."""
        if self.readout is None:
            return encoder_readout(mean=False)
        return {"name": "avg_norm", "grid": True, "mean": self.mean, "checkpoint_prefix": self.checkpoint_prefix}

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The patch grid ``(b, h, w, dim)`` -> the projector's tokens ``(b, cells, out_dim)``."""
        raise NotImplementedError

    def feature_stage(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = rearrange(x, "b (h w) d -> b h w d", h=grid[0])
        return x if self.readout is None else self.project(x)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None:
            raise ValueError(f"pool='{self.state_name}' reads the cells of one image grid; feed image batches, not "
                             f"patch sequences")
        if self.readout is None:
            return self.project(x)
        return self.readout(masked_mean(x, None) if self.mean else x)


class PatchMerger(_Projector):
    """Qwen2-VL / Qwen3-VL "merger": LayerNorm, the tokens of each ``k x k`` cell concatenated row-major
    ``(kh kw d)``, fc1 + GELU at that width, fc2 to the language model's width (Wang et al. 2024, Qwen2-VL;
    timm's ``Qwen3VitPatchMerger``). ``out_features=0`` leaves out fc2."""

    state_name = "merger"
    timm_encoder_pool = "merge"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: ProjectorOptions = ProjectorOptions(),
    ) -> None:
        super().__init__(dim, norm, options)
        self.grid_multiple = self.cell  # the patch grid's sides must be whole cells (an export steps sizes by them)
        if any(side % self.cell for side in self.grid):
            raise ValueError(f"pool='merger' merges {self.cell}x{self.cell} cells, but the patch grid {self.grid} is "
                             f"not divisible by the cell; use an image size whose patch grid is a multiple of "
                             f"{self.cell}, or pool='aligner' (pads the grid)")
        hidden = dim * self.cell**2
        self.norm = norm(dim)
        self.fc1 = nn.Linear(hidden, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, options.out_features) if options.out_features else nn.Identity()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.norm(whole_cells(x, self.cell, "pool='merger'")), "b (h kh) (w kw) d -> b (h w) (kh kw d)",
                      kh=self.cell, kw=self.cell)
        return self.fc2(self.act(self.fc1(x)))


class PatchAligner(_Projector):
    """DeepSeek-V4 "aligner": the patch grid zero-padded at the bottom/right to whole ``k x k`` cells, each cell's
    tokens concatenated channel-major ``(d kh kw)`` (as ``F.unfold`` orders them), fc1 to the language model's
    width, GELU, fc2 (DeepSeek-V4 vision; timm's ``DeepseekVitAligner``)."""

    state_name = "aligner"
    timm_encoder_pool = "align"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: ProjectorOptions = ProjectorOptions(),
    ) -> None:
        super().__init__(dim, norm, options)
        self.fc1 = nn.Linear(dim * self.cell**2, self.out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.out_dim, self.out_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[1] % self.cell, -x.shape[2] % self.cell
        x = F.pad(rearrange(x, "b h w d -> b d h w"), (0, pad_w, 0, pad_h))
        x = rearrange(F.unfold(x, self.cell, stride=self.cell), "b f cells -> b cells f")  # f = (d kh kw)
        return self.fc2(self.act(self.fc1(x)))


POOLS.register("avg_norm", AvgNormPool, options=AvgNormOptions)
POOLS.register("merger", PatchMerger, options=ProjectorOptions)
POOLS.register("aligner", PatchAligner, options=ProjectorOptions)
PROJECTORS = tuple(cls.state_name for cls in (PatchMerger, PatchAligner))  # their state_dict names
