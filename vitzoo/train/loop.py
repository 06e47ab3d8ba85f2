"""The training loop shared by fine-tuning and ablations: deterministic, resumable, measured.

The data position is a function of the step alone (each epoch is a permutation seeded by
``(seed, epoch)``, the tail that does not fill a step is dropped), so a checkpoint only needs the
step, the weights, the optimizer and schedule state and the RNG state to continue a killed run
bit-for-bit. Batches are images, or with ``naflex`` patch sequences budgeted in tokens
(:mod:`vitzoo.train.naflex`). One process or many (``torchrun``): gradients are averaged by DDP or
FSDP, rank 0 writes the checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, RATE, check_fields, described
from vitzoo.memory import reuse_freed_host_memory
from vitzoo.packing import is_sequence
from vitzoo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vitzoo.train.data import Normalized, Resized, data_config
from vitzoo.train.distributed import (
    World,
    all_reduce_sum,
    full_optimizer_state,
    full_state_dict,
    full_value,
    load_full_optimizer_state,
    load_full_weights,
    wrap,
)
from vitzoo.train.ema import ModelEma
from vitzoo.train.mix import mix_batch
from vitzoo.train.naflex import eval_sequences, steps_in_epoch, token_budget, train_sequences
from vitzoo.train.objective import Objective
from vitzoo.train.recipe import build_optimizer, warmup_cosine
from vitzoo.train.sampler import ResumableSampler, RunSampler, SeededSamples
from vitzoo.train.settings import changes_on_resume, recorded_settings
from vitzoo.vit import VisionTransformer

logger = logging.getLogger("vitzoo.train.loop")


@dataclass
class TrainConfig:
    """How to train; everything that affects the result is here, so runs are reproducible.

    Each field carries its default, range and help (:func:`vitzoo.fields.described`): the constructor
    checks the ranges, and ``vitzoo finetune`` and ``vitzoo ablate`` build their options from the fields.
    """

    steps: int = described(300, "optimizer steps", AT_LEAST_ONE)
    batch_size: int = described(64, "images per process per micro-batch", AT_LEAST_ONE)
    accum_steps: int = described(1, "micro-batches whose gradients make one optimizer step", AT_LEAST_ONE)
    naflex: bool = described(False, "train on patch sequences (NaFlex): each step draws a patch budget from "
                             "seq_lens, resizes its images to it, aspect ratio kept, and packs them into rows, "
                             "max_tokens patches per micro-batch (batch_size is not used)")
    max_tokens: int = described(16384, "with naflex: patches per process per micro-batch, whatever the budget",
                                AT_LEAST_ONE)
    seq_lens: tuple[int, ...] = described((128, 256, 576, 784, 1024), "with naflex: the per-image patch budgets "
                                          "a step draws from (those above max_tokens are left out; the longest "
                                          "is the row length)", AT_LEAST_ONE)
    lr: float = described(1e-3, "peak learning rate", POSITIVE)
    weight_decay: float = described(0.05, "AdamW decoupled decay; norms, biases and tokens skip it", NON_NEGATIVE)
    layer_decay: float | None = described(None, "layer-wise lr decay factor, e.g. 0.75 (None: off)", POSITIVE)
    optimizer: Literal["adamw", "adam"] = described("adamw", "the optimizer of the parameter groups")
    warmup_steps: int = described(30, "steps of linear warm-up before the cosine decay", NON_NEGATIVE)
    label_smoothing: float = described(0.0, "share of the target spread over all classes (0: off)", RATE)
    mixup: float = described(0.0, "Beta concentration for blending image pairs, e.g. 0.8 (DeiT; 0: off)",
                             NON_NEGATIVE)
    cutmix: float = described(0.0, "Beta concentration for pasting boxes between image pairs, e.g. 1.0 (0: off); "
                              "with mixup, one of the two per batch", NON_NEGATIVE)
    grad_clip: float | None = described(1.0, "max global gradient norm (0 or None: off)", NON_NEGATIVE)
    eval_every: int = described(100, "steps between validation passes (and one at the end)", AT_LEAST_ONE)
    eval_sizes: tuple[int, ...] = described((), "also evaluate at these square image sizes, e.g. 128,224,384 "
                                            "(naflex: at (size/patch)^2 patches, aspect ratio kept); a size "
                                            "other than the model's needs dynamic_img_size", AT_LEAST_ONE)
    seed: int = described(0, "seeds data order, augmentation and dropout (the model's init is the caller's)",
                          NON_NEGATIVE)
    device: str = described("cpu", "where to train: cpu, cuda, cuda:N, ...")
    amp: bool = described(False, "bf16 autocast for forward and loss")
    compile: bool = described(False, "torch.compile the model for the training step")
    ema_decay: float | None = described(None, "also keep and evaluate an EMA of the weights, e.g. 0.999 (None: off)",
                                        RATE)
    checkpoint_every: int = described(0, "steps between checkpoints when a run folder is given (0: at the end only)",
                                      NON_NEGATIVE)
    strategy: Literal["ddp", "fsdp"] = described("ddp", "how several processes (torchrun) share the model")
    num_workers: int = described(0, "data-loading processes (any number gives the same results)", NON_NEGATIVE)
    keep_checkpoints: int = described(2, "newest checkpoints kept, besides the best by validation accuracy "
                                      "(by validation loss where there is none)",
                                      AT_LEAST_ONE)

    def __post_init__(self) -> None:
        # Python callers get the checks the command line makes: batch_size=0 would otherwise surface as a
        # ZeroDivisionError, steps=0 as a run that silently does nothing.
        check_fields(self)
        if self.naflex:
            token_budget(self)
            if self.mixup or self.cutmix:
                raise ValueError("mixup and cutmix blend images of one shape, and naflex steps hold images of "
                                 "many; train with naflex without --mixup/--cutmix")


@dataclass
class TrainResult:
    """Curves and final figures of one run (a resumed run includes the steps before the resume)."""

    losses: list[float] = field(default_factory=list)  # training loss per step
    terms: dict[str, list[float]] = field(default_factory=dict)  # an objective's logged terms per step, by name
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "epoch", "val_loss", "val_acc", ...}
    images_per_s: float = 0.0  # training throughput of this process group (evaluation excluded)
    seconds: float = 0.0  # wall time of the training steps
    data_seconds: float = 0.0  # the part of ``seconds`` spent waiting for batches: data loading not hidden by compute

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluation row, with ``train_loss`` the mean of the last 20 steps."""
        tail = self.losses[-20:]
        return {**(self.evals[-1] if self.evals else {}), "train_loss": sum(tail) / max(1, len(tail)),
                "images_per_s": self.images_per_s, "seconds": self.seconds}


class WaitTimer(Iterator):
    """``items`` one at a time, adding up in ``seconds`` how long each ``next`` waited: with loader workers, the
    data loading that the computation did not hide (the start of a loader's workers included)."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items, self.seconds = items, 0.0

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.seconds += time.perf_counter() - start


class Diverged(ValueError):
    """The loss, the gradient norm or the weights stopped being finite; nothing of that step was kept."""


def steps_per_epoch(size: int, config: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps in one pass over ``size`` samples: each process takes ``size // world_size``
    of them and the tail that does not fill a step is dropped (see :class:`ResumableSampler`)."""
    if config.naflex:
        return steps_in_epoch(size, config, world_size)
    return size // world_size // (config.batch_size * config.accum_steps)


def train_loader(model: VisionTransformer, train_data: Dataset, config: TrainConfig, world: World, epoch: int,
                 done: int) -> DataLoader:
    """This process's micro-batches from its step ``done`` of ``epoch`` on: ``(images, labels)`` to the end of
    the run (one loader: its workers are started once and read ahead across epochs), or with ``config.naflex``
    ``(patch-sequence dict, labels in the order of the model's outputs)`` to the end of the epoch."""
    if config.naflex:
        return train_sequences(train_data, config, world, model.spec.patch_size,
                               model.pretrained_cfg["interpolation"], epoch, done)
    per_step, epoch_steps = config.batch_size * config.accum_steps, steps_per_epoch(len(train_data), config,
                                                                                   world.world_size)
    sampler = RunSampler(ResumableSampler(len(train_data), config.seed, world.rank, world.world_size),
                         epoch_steps * per_step, epoch, done * per_step,
                         (config.steps - epoch * epoch_steps - done) * per_step)
    # a private generator: creating the iterator must not draw from the global RNG (dropout's)
    return DataLoader(SeededSamples(train_data, config.seed), batch_size=config.batch_size, sampler=sampler,
                      num_workers=config.num_workers, pin_memory=torch.device(world.device).type == "cuda",
                      generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))


def to_device(inputs: torch.Tensor | dict[str, torch.Tensor], device: str,
              pixels: Normalized | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """A batch of images or a patch-sequence dict on ``device``; a uint8 image batch (``train_pixels`` of
    :func:`vitzoo.train.build_datasets`) normalised there by ``pixels``."""
    if is_sequence(inputs):
        return {key: value.to(device, non_blocking=True) for key, value in inputs.items()}
    inputs = inputs.to(device, non_blocking=True)
    return pixels(inputs) if pixels is not None and inputs.dtype == torch.uint8 else inputs


Batches = Callable[[Dataset], Iterable[tuple[Any, torch.Tensor]]]


def eval_views(model: VisionTransformer, config: TrainConfig) -> dict[str, Batches | None]:
    """The evaluations of a validation row by the suffix of their keys: ``""`` at the model's own size, then
    ``"@S"`` for each of ``config.eval_sizes``; each says how batches are made (None: the images as they come).

    Images are resized to S x S, which a model without ``dynamic_img_size`` refuses (so it is refused here,
    before training); a naflex model reads patch sequences of at most (S / patch)^2 patches, aspect ratio kept.
    """
    patch, interpolation = model.spec.patch_size, model.pretrained_cfg["interpolation"]
    odd = [size for size in config.eval_sizes if size % patch]
    if odd:
        raise ValueError(f"eval_sizes {odd} are not multiples of the patch size {patch}; pick multiples of {patch}")
    if config.naflex:
        tokens = token_budget(config)
        height, width = model.spec.img_size
        budgets = {"": (height // patch) * (width // patch)}
        budgets.update({f"@{size}": (size // patch) ** 2 for size in config.eval_sizes})
        return {suffix: partial(eval_sequences, tokens=tokens, budget=budget, patch_size=patch,
                                interpolation=interpolation) for suffix, budget in budgets.items()}
    other = [size for size in config.eval_sizes if (size, size) != tuple(model.spec.img_size)]
    if other and not model.spec.dynamic_img_size:
        raise ValueError(f"evaluating at {other} needs a model that takes any image size: build it with "
                         f"dynamic_img_size=True (vitzoo finetune: --set dynamic_img_size=true), or train with naflex")
    return {"": None, **{f"@{size}": partial(resized_images, size=size, interpolation=interpolation)
                         for size in config.eval_sizes}}


def resized_images(dataset: Dataset, size: int, interpolation: str, batch_size: int = 256) -> DataLoader:
    """``dataset``'s images resized to ``size`` x ``size``, ``batch_size`` at a time, in order."""
    return DataLoader(Resized(dataset, size, interpolation), batch_size=batch_size, generator=torch.Generator())


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str = "cpu", world: World | None = None,
    shard: bool = True, batches: Batches | None = None, objective: Objective | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over ``dataset`` (where the objective's model classifies), and the
    mean of each of ``objective``'s validation figures (:attr:`Objective.val_names`).

    With several processes each evaluates every ``world_size``-th sample and the sums are reduced;
    ``shard=False`` has every rank run every batch (FSDP needs all ranks in each forward). ``batches`` makes
    ``(inputs, labels)`` batches of the dataset (see :func:`eval_views`; default: its images, ``batch_size``
    at a time).
    """
    world = world or World(device=device)
    was_training = model.training
    model.eval()
    if shard and world.distributed:
        dataset = Subset(dataset, range(world.rank, len(dataset), world.world_size))
    objective = objective or Objective()
    names = (("val_loss", "val_acc") if objective.classifies else ()) + objective.val_names
    sums = torch.zeros(1 + len(names), dtype=torch.float64)
    loader = batches(dataset) if batches else DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())
    for inputs, labels in loader:
        inputs = to_device(inputs, device)
        output = model(inputs).float()
        labels = labels.to(device)
        scores = [F.cross_entropy(output, labels, reduction="sum").item(),
                  (output.argmax(-1) == labels).sum().item()] if objective.classifies else []
        sums += torch.tensor([len(labels), *scores, *objective.val_sums(inputs, output).tolist()],
                             dtype=torch.float64)
    model.train(was_training)
    if shard:
        sums = all_reduce_sum(sums, world)
    total, *figures = sums.tolist()
    return {name: value / total for name, value in zip(names, figures, strict=True)}


def _better(row: dict[str, float], best: dict[str, float]) -> bool:
    """Whether a validation row beats the best checkpoint's: a higher ``val_acc`` where the rows have one,
    otherwise a lower ``val_loss`` (an objective that does not classify, such as a masked autoencoder's)."""
    return row["val_acc"] > best["val_acc"] if "val_acc" in row else row["val_loss"] < best["val_loss"]


class _Run:
    """The state of one training run and the step that advances it."""

    def __init__(self, model: VisionTransformer, train_data: Dataset, config: TrainConfig, world: World,
                 folder: Path | None, run_settings: dict[str, Any] | None, objective: Objective | None) -> None:
        self.model, self.config, self.world, self.folder = model, config, world, folder
        self.objective = objective or Objective()
        if self.objective.settings:
            run_settings = {**(run_settings or {}), **self.objective.settings}
        # what defines the run, saved in each checkpoint and compared on resume (vitzoo.train.settings)
        self.identity = {"config": asdict(config), "spec": model.spec.to_dict(), "world_size": world.world_size,
                         "run_settings": run_settings}
        self.objective.prepare(model)
        self.best: dict[str, float] | None = None  # {"step", "val_acc" or "val_loss"} of the best checkpoint
        self.ema = ModelEma(model, config.ema_decay) if config.ema_decay else None
        self.net = wrap(model, world, config.strategy)
        sharded = world.distributed and config.strategy == "fsdp"
        if self.ema and sharded:  # the average is sharded like the model: each rank averages its own shard
            wrap(self.ema.module, world, config.strategy)
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay, config.layer_decay, config.optimizer,
                                         fused=not sharded)
        self.schedule = warmup_cosine(self.optimizer, config.warmup_steps, config.steps)
        self.forward = torch.compile(self.net) if config.compile else self.net
        self.steps_per_epoch = steps_per_epoch(len(train_data), config, world.world_size)
        if self.steps_per_epoch == 0:
            step = (f"the images that max_tokens={config.max_tokens} hold at the first budget drawn, times "
                    f"accum_steps; lower max_tokens or accum_steps" if config.naflex else
                    f"batch_size x accum_steps = {config.batch_size * config.accum_steps}; lower batch_size or "
                    f"accum_steps")
            raise ValueError(f"the training set ({len(train_data)} samples over {world.world_size} process(es)) is "
                             f"smaller than one step of {step}")
        self.views = eval_views(model, config)
        self.train_data = train_data
        cfg = data_config(model)  # uint8 training batches are normalised on the device, as the transforms would
        self.pixels = Normalized(cfg["mean"], cfg["std"], world.device)
        self.result = TrainResult()

    @property
    def step(self) -> int:
        return len(self.result.losses)

    def batches(self) -> Iterator[tuple[Any, torch.Tensor]]:
        """Micro-batches from the current step on: images from one loader to the end of the run, patch
        sequences from one loader per epoch (see :func:`train_loader`)."""
        while True:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            yield from train_loader(self.model, self.train_data, self.config, self.world, epoch, done)

    def _sync_gradients(self, sync: bool) -> AbstractContextManager:
        if isinstance(self.net, nn.parallel.DistributedDataParallel) and not sync:
            return self.net.no_sync()
        if hasattr(self.net, "set_requires_gradient_sync"):  # FSDP2
            self.net.set_requires_gradient_sync(sync)
        return nullcontext()

    def train_step(self, batches: Iterator[tuple[Any, torch.Tensor]]) -> tuple[float, int, dict[str, float]]:
        """One optimizer step over ``accum_steps`` micro-batches; (mean loss, images seen by this process, mean
        of each of the objective's terms)."""
        config, device = self.config, self.world.device
        total, seen, terms = 0.0, 0, {}
        for micro in range(config.accum_steps):
            images, labels = next(batches)
            images, labels = to_device(images, device, self.pixels), labels.to(device, non_blocking=True)
            targets = labels
            if config.mixup or config.cutmix:
                images, targets = mix_batch(images, labels, self.model.num_classes, config.mixup, config.cutmix)
            with self._sync_gradients(micro == config.accum_steps - 1), torch.autocast(
                device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=config.amp
            ):
                output = self.forward(images)
                loss, parts = self.objective.loss(output, images, targets, config.label_smoothing)
                (loss / config.accum_steps).backward()
            total += loss.item() / config.accum_steps
            for name, value in parts.items():
                terms[name] = terms.get(name, 0.0) + value.item() / config.accum_steps
            seen += len(labels)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = full_value(nn.utils.get_total_norm([p.grad for p in params]))  # clip_grad_norm_'s, without clipping
        # every rank's loss and the (global) norm in one sum: non-finite on one rank is non-finite on all
        check = all_reduce_sum(torch.tensor([total, norm.item()], dtype=torch.float64, device=device), self.world)
        if not check.isfinite().all():
            raise self.diverged(self.step + 1, f"the training loss is {total} and the gradient norm {norm.item()}")
        if config.grad_clip:
            nn.utils.clip_grads_with_norm_(params, config.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema:
            self.ema.update(self.model)
        return total, seen, terms

    def diverged(self, step: int, what: str) -> Diverged:
        """The error that stops a diverged run: which step, what went wrong, what is left, what to try."""
        latest = latest_checkpoint(self.folder) if self.folder else None
        kept = f"the last checkpoint, {latest}, holds finite weights" if latest else "no checkpoint was written"
        return Diverged(
            f"training diverged at step {step}: {what}. Nothing of that step was saved and {kept}. Start a new run "
            f"(another --out; --pretrained <checkpoint folder> starts from its weights) with a lower --lr (now "
            f"{self.config.lr:g}), gradient clipping (--grad-clip, now {self.config.grad_clip or 'off'}) or another "
            f"precision (--amp for bf16 autocast, without it fp32)"
        )

    def checkpoint(self) -> None:
        """Write the run's state (collective under FSDP; rank 0 writes), never a non-finite one."""
        weights, optimizer = full_state_dict(self.model), full_optimizer_state(self.model, self.optimizer)
        ema = full_state_dict(self.ema.module) if self.ema else None
        broken = next((k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()), None)
        if broken:  # every rank holds the full weights here, so all of them stop
            raise self.diverged(self.step, f"the weights are no longer finite ({broken})")
        row = self.result.evals[-1] if self.result.evals else None
        if row and row["step"] == self.step and (self.best is None or _better(row, self.best)):
            key = "val_acc" if "val_acc" in row else "val_loss"
            self.best = {"step": self.step, key: row[key]}
        if not self.world.main:
            return
        trainer = {
            "step": self.step, "optimizer": optimizer, "schedule": self.schedule.state_dict(),
            "rng": torch.get_rng_state(), "losses": self.result.losses, "terms": self.result.terms,
            "evals": self.result.evals,
            "best": self.best, **self.identity,
        }
        if torch.cuda.is_available():
            trainer["cuda_rng"] = torch.cuda.get_rng_state()
        save_checkpoint(self.folder, self.step, weights, trainer, ema, keep=self.config.keep_checkpoints,
                        best_step=self.best["step"] if self.best else None)

    def restore(self, path: Path) -> dict[str, list]:
        """Continue from a checkpoint of this run; returns the settings it changes, ``{name: [old, new]}``."""
        weights, trainer, ema_weights = load_checkpoint(path)
        changed = changes_on_resume(recorded_settings(trainer), recorded_settings(self.identity), trainer["step"], path)
        load_full_weights(self.model, weights)
        load_full_optimizer_state(self.model, self.optimizer, trainer["optimizer"])
        if self.ema and ema_weights is not None:
            load_full_weights(self.ema.module, ema_weights)
        self.schedule.load_state_dict(trainer["schedule"])
        torch.set_rng_state(trainer["rng"])
        if "cuda_rng" in trainer and torch.cuda.is_available():
            torch.cuda.set_rng_state(trainer["cuda_rng"])
        self.result.losses, self.result.evals = list(trainer["losses"]), list(trainer["evals"])
        self.result.terms = {name: list(values) for name, values in trainer.get("terms", {}).items()}
        self.best = trainer.get("best")
        return changed

    def evaluate(self, val_data: Dataset) -> dict[str, float]:
        """The validation row of this step; ``train_loss`` averages the steps since the previous row (also
        across a resume, as the checkpoint holds every loss and row)."""
        shard = self.config.strategy != "fsdp"
        since = self.result.evals[-1]["step"] if self.result.evals else 0
        recent = self.result.losses[since:]
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3),
               "train_loss": sum(recent) / max(1, len(recent)), "lr": self.optimizer.param_groups[0]["lr"]}
        row.update({f"train_{name}": sum(values[since:]) / max(1, len(values[since:]))
                    for name, values in self.result.terms.items()})
        row.update(self._metrics(self.model, val_data, shard))
        if not math.isfinite(row["val_loss"]):  # reduced over the ranks: they all agree
            raise self.diverged(self.step, f"the validation loss is {row['val_loss']}")
        if self.ema:
            row.update({f"ema_{k}": v for k, v in self._metrics(self.ema.module, val_data, shard).items()})
        return row

    def _metrics(self, model: nn.Module, val_data: Dataset, shard: bool) -> dict[str, float]:
        """``val_loss`` and ``val_acc`` at the model's size, and ``val_loss@S``/``val_acc@S`` at each eval size."""
        metrics = {}
        for suffix, batches in self.views.items():
            found = evaluate(model, val_data, device=self.world.device, world=self.world, shard=shard, batches=batches,
                             objective=self.objective)
            metrics.update({f"{k}{suffix}": v for k, v in found.items()})
        return metrics


def fit(
    model: VisionTransformer, train_data: Dataset, val_data: Dataset | None, config: TrainConfig,
    progress: bool = True, run_dir: str | Path | None = None, resume: bool | str | Path = False,
    world: World | None = None, on_eval: Callable[[dict[str, float]], None] | None = None,
    run_settings: dict[str, Any] | None = None,
    on_resume: Callable[[int, dict[str, list], list[dict[str, float]]], None] | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps; a non-finite loss, gradient norm or weights raise
    :class:`Diverged` before anything of that step is saved.

    ``run_dir`` receives checkpoints under ``checkpoints/`` every ``config.checkpoint_every`` steps
    and at the end; ``resume=True`` continues from its latest checkpoint (a path: from that
    checkpoint) if the settings allow (:mod:`vitzoo.train.settings`; ``run_settings``: the caller's,
    such as the data and its split). On rank 0, ``on_resume`` receives the checkpoint's step, the
    accepted changes and the validation rows so far, ``on_eval`` each new validation row. ``objective``: what
    a step minimises (default: cross-entropy to the labels; :mod:`vitzoo.train.objective`). Training batches of uint8
    pixels (``build_datasets(train_pixels=True)``) are normalised on the device with the model's mean and std.
    On the CPU, the process's malloc keeps large freed blocks for the next step
    (:func:`vitzoo.memory.reuse_freed_host_memory`).
    """
    world = world or World(device=config.device)
    if torch.device(world.device).type == "cpu":
        reuse_freed_host_memory()
    torch.manual_seed(config.seed)
    model.to(world.device).train()
    folder = Path(run_dir) / "checkpoints" if run_dir is not None else None
    run = _Run(model, train_data, config, world, folder, run_settings, objective)
    if resume is True:
        path = latest_checkpoint(folder) if folder else None
        if path is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint under {folder}; start the run without resume")
        changed = run.restore(path)
    elif resume:
        changed = run.restore(Path(resume))
    if resume and on_resume and world.main:
        on_resume(run.step, changed, run.result.evals)
    result, batches = run.result, WaitTimer(run.batches())
    seen, train_seconds = 0, 0.0
    with tqdm(total=config.steps, initial=run.step, disable=not (progress and world.main), unit="step") as bar:
        while run.step < config.steps:
            start, waited = time.perf_counter(), batches.seconds
            loss, images, terms = run.train_step(batches)
            seconds = time.perf_counter() - start
            train_seconds += seconds
            logger.debug("step %d: %.4f s, %.4f s of it waiting for data", run.step + 1, seconds,
                         batches.seconds - waited)
            seen += images * world.world_size
            result.losses.append(loss)
            for name, value in terms.items():
                result.terms.setdefault(name, []).append(value)
            step = run.step
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen / train_seconds:.0f}")
            if val_data is not None and (step % config.eval_every == 0 or step == config.steps):
                result.evals.append(run.evaluate(val_data))
                if on_eval and world.main:
                    on_eval(result.evals[-1])
            if folder and ((config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps):
                run.checkpoint()
    result.seconds, result.data_seconds = train_seconds, batches.seconds
    result.images_per_s = seen / train_seconds if train_seconds else 0.0
    return result
