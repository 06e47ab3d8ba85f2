"""Exponential moving average of the weights (Polyak averaging), evaluated next to the raw model."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class ModelEma(nn.Module):
    """A frozen copy whose parameters and buffers track ``decay * ema + (1 - decay) * model``.

    Averaged weights generalise better late in fine-tuning (timm's ``ModelEmaV3``; Polyak & Juditsky
    1992). The copy has the model's own state_dict layout, so it saves and loads like the model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}; typical values are 0.999 to 0.9999")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step; under FSDP both are sharded alike and each rank averages its own shard."""
        ema = [_local(t) for t in self.module.state_dict().values()]
        current = [_local(t) for t in model.state_dict().values()]
        floats = [(e, c) for e, c in zip(ema, current, strict=True) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [c.detach() for _, c in floats], 1.0 - self.decay)
        for e, c in zip(ema, current, strict=True):
            if not e.is_floating_point():
                e.copy_(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (FSDP) tensor, sharing its storage; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
