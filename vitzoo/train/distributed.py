"""Multi-process training on PyTorch's own engine: DistributedDataParallel or FSDP (``fully_shard``).

``torchrun --nproc_per_node=N -m vitzoo.train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the
process group uses NCCL on GPUs and gloo on CPU. Without those variables everything here is a
no-op, so one code path serves one process and many.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0 logs, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: str) -> World:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), world_size, device)


def close_world(world: World) -> None:
    """Leave the process group together: a rank exiting with gloo still open can abort at shutdown."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, strategy: str) -> nn.Module:
    """The module the training step calls: the model itself, DDP around it, or the model sharded in place.

    ``fsdp`` shards every block and then the rest (FSDP2 ``fully_shard``), so each process holds
    ``1 / world_size`` of the parameters, gradients and optimizer state.
    """
    if not world.distributed:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[world.device] if "cuda" in world.device else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    raise ValueError(f"unknown strategy {strategy!r}; use 'ddp' or 'fsdp'")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (collective under FSDP: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor that may be a DTensor (collective then: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state unsharded on CPU, keyed by parameter name (collective under FSDP; the full
    state lands on rank 0). One layout for every strategy, so a checkpoint resumes under any of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load unsharded weights into a model (or its EMA copy); under FSDP every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load :func:`full_optimizer_state` into the optimizer of ``model``; under FSDP every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values)
    return values


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A short hash of every tensor's bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def gather_strings(value: str, world: World) -> list[str]:
    """``value`` from every rank, in rank order."""
    if not world.distributed:
        return [value]
    out: list[str] = [""] * world.world_size
    dist.all_gather_object(out, value)
    return out
