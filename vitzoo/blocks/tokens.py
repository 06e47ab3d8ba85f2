"""Prefix tokens: class token (ViT), distillation token (DeiT) and register tokens (Darcet et al.
2024, "Vision Transformers Need Registers"). They are parameters of the model itself, named as in
timm (``cls_token``, ``dist_token``, ``reg_token``), and always sit in that order at the front."""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

# torch.fx symbolic tracing keeps the einops call as a graph node: einops needs real tensors and shapes
torch.fx.wrap("repeat")

PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")


def make_prefix_tokens(
    dim: int, class_token: bool, dist_token: bool, reg_tokens: int
) -> dict[str, nn.Parameter | None]:
    """One parameter per kind of prefix token, or None where the model has none of that kind."""
    counts = {"cls_token": int(class_token), "dist_token": int(dist_token), "reg_token": reg_tokens}
    std = {"cls_token": 1e-6, "dist_token": 0.02, "reg_token": 1e-6}
    return {
        name: nn.Parameter(nn.init.normal_(torch.empty(1, n, dim), std=std[name])) if n else None
        for name, n in counts.items()
    }


def drop_patch_tokens(x: torch.Tensor, num_prefix: int, rate: float) -> torch.Tensor:
    """Keep a random ``1 - rate`` of the patch tokens per image, all prefix tokens, order preserved.

    FLIP (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): training on a subset
    of patches cuts compute roughly in proportion, as a regulariser that costs no accuracy.
    """
    patches = x.shape[1] - num_prefix
    keep = max(1, int(patches * (1.0 - rate)))
    order = torch.rand((x.shape[0], patches), device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values
    return keep_patch_tokens(x, num_prefix, order)


def keep_patch_tokens(x: torch.Tensor, num_prefix: int, keep: torch.Tensor) -> torch.Tensor:
    """The prefix tokens and, per image, the patch tokens ``keep`` ``(b, k)`` names (indices among the patches,
    in the order given): ``(b, num_prefix + k, d)``."""
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    kept = patches.gather(1, repeat(keep, "b k -> b k d", d=patches.shape[-1]))
    return torch.cat([prefix, kept], dim=1)


def prepend_tokens(x: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
    """Put the prefix tokens (each ``(1, k, d)``) in front of the patch tokens ``(b, n, d)``."""
    if not tokens:
        return x
    return torch.cat([repeat(t, "1 k d -> b k d", b=x.shape[0]) for t in tokens] + [x], dim=1)
