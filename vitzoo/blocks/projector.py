"""Readouts of the vision towers of vision-language models (pool slot): the projector ("merger", "aligner") that
turns the patch grid into the tokens a language model reads, and the classifier readout timm puts on these
towers (mean of the tokens, then a norm without parameters).

A projector concatenates the tokens of each ``k x k`` cell of the patch grid (a pixel unshuffle) and maps them
with a two-layer MLP to the language model's width ``out_features``. With ``readout="none"`` the model's output
is those tokens ``(b, cells, out_features)`` (timm's ``*_enc`` names); with ``readout="avg_norm"`` their mean,
normalized, goes to the classifier (timm's ``*_merge`` / ``*_align`` names). ``out_dim`` tells the model the
width its head reads. The module is stored under timm's name for it (``state_name``), not ``attn_pool``, and
``checkpoint_prefix`` names the rest of the model as timm's classifier wrappers do (``encoder.``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import GridOptions
from vitzoo.blocks.pooling import POOLS, MlpFactory, PoolOptions, _Readout, masked_mean, token_grid
from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, described

torch.fx.wrap("rearrange")
torch.fx.wrap("token_grid")
READOUTS = ("none", "avg_norm")


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
    checkpoint_prefix: str = _checkpoint_prefix()
    std_buffers: bool = described(
        False, "hold the tower's std_bias / std_scale buffers, which only its own readout applies (timm's Gemma 4 "
               "26B/31B classifier stores them unused)")


class AvgNormPool(_Readout):
    """Mean of the patch tokens, then a parameter-free norm of the model's kind: the classifier readout timm puts
    on VLM vision towers whose own output is not normalized for classification (Qwen3-VL, DeepSeek-V4, Gemma 4).
    Its buffers, if any, are stored at the model's top level."""

    state_name = ""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: AvgNormOptions,
    ) -> None:
        super().__init__(dim, num_heads, mlp_ratio, norm, mlp, num_prefix, options=options)
        self.norm = parameter_free(norm(dim)) if options.norm else nn.Identity()
        if options.std_buffers:
            self.register_buffer("std_bias", torch.zeros(dim))
            self.register_buffer("std_scale", torch.ones(dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(masked_mean(*self._read(x, valid)))


@dataclass(frozen=True)
class ProjectorOptions(GridOptions):
    """Options of the VLM projectors."""

    cell: int = described(2, "side of the k x k cell of patch tokens merged into one (Qwen 2, DeepSeek 3)",
                          AT_LEAST_ONE)
    out_features: int = described(0, "output width, the language model's; 0: k*k*dim (the merger: no fc2)",
                                  NON_NEGATIVE)
    readout: str = described("avg_norm", "after projecting: avg_norm (mean, parameter-free norm, for a classifier "
                             "head) | none (the tokens are the output: a VLM's image tokens)")
    checkpoint_prefix: str = _checkpoint_prefix()

    def check(self, spec) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"ProjectorOptions.readout: {self.readout!r} is not one of {', '.join(READOUTS)}")
        if spec.num_prefix_tokens:
            raise ValueError("a projector merges cells of the patch grid; use class_token=False and reg_tokens=0")


class _Projector(nn.Module):
    """Shared by the projectors: the cell grid, the output width and the optional classifier readout."""

    state_name = "attn_pool"
    reads_grid = True  # the patch grid comes from the token count (pooling.token_grid)

    def __init__(self, dim: int, norm: NormFactory, options: ProjectorOptions) -> None:
        super().__init__()
        self.grid, self.cell = options.grid, options.cell
        self.out_dim = options.out_features or dim * options.cell**2
        self.readout = parameter_free(norm(self.out_dim)) if options.readout == "avg_norm" else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = self.project(x)
        return x if self.readout is None else self.readout(masked_mean(x, None))


class PatchMerger(_Projector):
    """Qwen2-VL / Qwen3-VL "merger": LayerNorm, the tokens of each ``k x k`` cell concatenated row-major
    ``(kh kw d)``, fc1 + GELU at that width, fc2 to the language model's width (Wang et al. 2024, Qwen2-VL;
    timm's ``Qwen3VitPatchMerger``). ``out_features=0`` leaves out fc2."""

    state_name = "merger"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: ProjectorOptions = ProjectorOptions(),
    ) -> None:
        super().__init__(dim, norm, options)
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
        grid = token_grid(x, self.grid, self.cell, "pool='merger'")
        x = rearrange(self.norm(x), "b (h kh w kw) d -> b (h w) (kh kw d)",
                      h=grid[0] // self.cell, kh=self.cell, kw=self.cell)
        return self.fc2(self.act(self.fc1(x)))


class PatchAligner(_Projector):
    """DeepSeek-V4 "aligner": the patch grid zero-padded at the bottom/right to whole ``k x k`` cells, each cell's
    tokens concatenated channel-major ``(d kh kw)`` (as ``F.unfold`` orders them), fc1 to the language model's
    width, GELU, fc2 (DeepSeek-V4 vision; timm's ``DeepseekVitAligner``)."""

    state_name = "aligner"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: ProjectorOptions = ProjectorOptions(),
    ) -> None:
        super().__init__(dim, norm, options)
        self.fc1 = nn.Linear(dim * self.cell**2, self.out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.out_dim, self.out_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        grid = token_grid(x, self.grid, 1, "pool='aligner'")
        pad_h, pad_w = -grid[0] % self.cell, -grid[1] % self.cell
        x = F.pad(rearrange(x, "b (h w) d -> b d h w", h=grid[0]), (0, pad_w, 0, pad_h))
        x = rearrange(x, "b d (h kh) (w kw) -> b (h w) (d kh kw)", kh=self.cell, kw=self.cell)
        return self.fc2(self.act(self.fc1(x)))


POOLS.register("avg_norm", AvgNormPool, options=AvgNormOptions)
POOLS.register("merger", PatchMerger, options=ProjectorOptions)
POOLS.register("aligner", PatchAligner, options=ProjectorOptions)
PROJECTORS = tuple(cls.state_name for cls in (PatchMerger, PatchAligner))  # their state_dict names
