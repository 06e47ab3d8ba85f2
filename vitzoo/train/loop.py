"""The training loop shared by fine-tuning and ablations: deterministic, measured, small."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vitzoo.train.recipe import build_optimizer, warmup_cosine
from vitzoo.vit import VisionTransformer


@dataclass
class TrainConfig:
    """How to train; everything that affects the result is here, so runs are reproducible."""

    steps: int = 300  # optimizer steps
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    layer_decay: float | None = None  # layer-wise lr decay factor, None = off
    optimizer: str = "adamw"  # adamw | adam
    warmup_steps: int = 30
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm, None = off
    eval_every: int = 100  # steps between validation passes (and one at the end)
    seed: int = 0  # model init is the caller's; this seeds data order and dropout
    device: str = "cpu"


@dataclass
class TrainResult:
    """Curves and final figures of one run."""

    losses: list[float] = field(default_factory=list)  # training loss per step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss", "val_acc"}
    images_per_s: float = 0.0
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, Any]:
        tail = self.losses[-20:]
        return {"train_loss": sum(tail) / max(1, len(tail)), **(self.evals[-1] if self.evals else {}),
                "images_per_s": self.images_per_s, "seconds": self.seconds}


@torch.no_grad()
def evaluate(
    model: VisionTransformer, dataset: Dataset, batch_size: int = 256, device: str = "cpu"
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over ``dataset``."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return {"val_loss": loss_sum / total, "val_acc": correct / total}


def fit(
    model: VisionTransformer, train_data: Dataset, val_data: Dataset | None, config: TrainConfig,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps; the data order depends only on ``config.seed``."""
    torch.manual_seed(config.seed)
    model.to(config.device).train()
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.layer_decay, config.optimizer)
    schedule = warmup_cosine(optimizer, config.warmup_steps, config.steps)
    loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(config.seed))
    result, seen, start = TrainResult(), 0, time.perf_counter()
    bar = tqdm(total=config.steps, disable=not progress, unit="step")
    while len(result.losses) < config.steps:
        for images, labels in loader:
            images, labels = images.to(config.device), labels.to(config.device)
            loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            result.losses.append(loss.item())
            seen += len(labels)
            step = len(result.losses)
            if val_data is not None and (step % config.eval_every == 0 or step == config.steps):
                result.evals.append({"step": step, **evaluate(model, val_data, device=config.device)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            if step == config.steps:
                break
    bar.close()
    result.seconds = time.perf_counter() - start
    result.images_per_s = seen / result.seconds
    return result
