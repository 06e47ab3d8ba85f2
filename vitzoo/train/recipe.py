"""Optimizer recipe for ViTs: AdamW with decoupled weight decay that skips norms, biases and tokens,
optional layer-wise learning-rate decay (BEiT, Bao et al. 2022), and warmup + cosine schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from vitzoo.vit import VisionTransformer


def layer_id(name: str, depth: int) -> int:
    """0 for the embedding (patches, tokens, positions), i + 1 for block i, depth + 1 for the head."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre")):
        return 0
    return depth + 1


def param_groups(
    model: VisionTransformer, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """Parameter groups: no decay for 1-D tensors (norms, biases, LayerScale) and the model's
    ``no_weight_decay()`` names; with ``layer_decay``, block i learns at ``layer_decay ** (depth + 1 - i)``
    of the base rate so early, general layers move least when fine-tuning."""
    depth = len(model.blocks)
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in skip
        lid = layer_id(name, depth) if layer_decay is not None else depth + 1
        group = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid) if layer_decay is not None else 1.0,
        })
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(
    model: VisionTransformer, lr: float, weight_decay: float, layer_decay: float | None = None,
    name: str = "adamw", fused: bool = True,
) -> torch.optim.Optimizer:
    """AdamW (or plain Adam, as in the original ViT replication) over :func:`param_groups`.

    ``fused`` runs the update as one kernel per device (CPU and CUDA); sharded (FSDP) parameters
    use the multi-tensor ``foreach`` path instead.
    """
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    kernel = {"fused": True} if fused else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kernel)
    if name == "adam":
        return torch.optim.Adam([{**g, "weight_decay": 0.0} for g in groups], lr=lr, **kernel)
    raise ValueError(f"unknown optimizer {name!r}; use 'adamw' or 'adam'")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's rate, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_backbone(model: nn.Module) -> None:
    """Linear probing: train only the classifier head(s)."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(("head.", "head_dist."))
