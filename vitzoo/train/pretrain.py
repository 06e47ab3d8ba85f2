"""Self-supervised pretraining: ``vitzoo pretrain --method mae`` (:mod:`vitzoo.train.mae`).

A pretraining run is a fine-tuning run with another objective: the same loop (:func:`vitzoo.train.loop.fit`:
data order, checkpoints, exact resume, DDP/FSDP), the same run folder (run.json, metrics.jsonl/csv,
curves.png, summary.json, checkpoints/) and the same rules for what a resume may change; the objective
(:class:`~vitzoo.train.mae.MaeObjective`) is what differs. Its validation rows hold the reconstruction loss
on the held-out images, each time with the same masks. At the end the
encoder alone is written as a ``save_pretrained`` folder, ``<out>/encoder/`` (timm's layout, no head), which
``vitzoo finetune --pretrained <out>/encoder`` and ``create_model(name, pretrained="<out>/encoder")`` load.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from vitzoo.arguments import add_device_option, add_options, add_set_option, parsed_fields, spec_overrides
from vitzoo.fields import AT_LEAST_ONE, Range, check_fields, described
from vitzoo.registry import create_model
from vitzoo.subset import subset_problem
from vitzoo.train.data import add_data_arguments, build_datasets, data_options
from vitzoo.train.distributed import World, close_world, full_state_dict, gather_strings, init_world, weights_digest
from vitzoo.train.finetune import RunLog, run_training
from vitzoo.train.loop import TrainConfig, fit
from vitzoo.train.mae import MaeObjective, MaeOptions, MaskedAutoencoder
from vitzoo.train.runfolder import claim_run_folder, training_run_in
from vitzoo.train.sources import DataOptions
from vitzoo.train.trackers import Tracker, check_trackers
from vitzoo.weights import save_pretrained

ENCODER = "encoder"  # the folder of the run that holds the pretrained encoder
# TrainConfig's options for a classifier, which a pretraining run has no use for: their values must stay the defaults
CLASSIFIER_ONLY = ("naflex", "label_smoothing", "mixup", "cutmix", "layer_decay", "ema_decay", "eval_sizes")


@dataclass
class PretrainConfig:
    """What to pretrain on which images; ``mae`` holds the objective's settings, ``train`` how to train. Each
    field carries its default, range and help (:func:`vitzoo.fields.described`), which ``vitzoo pretrain``
    offers."""

    model: str = described(help="a registry name, e.g. vit_small_patch16_224 (see `vitzoo list`)")
    method: Literal["mae"] = described("mae", "the self-supervised objective: mae, masked autoencoder (He et al. "
                                       "2022)")
    data: str = described("digits", "digits | an ImageFolder path | torchvision:NAME | hf:PATH_OR_NAME | "
                          "wds:PATTERN (the labels are not used)")
    data_options: DataOptions = described(help="how hf: and wds: data are read", factory=DataOptions)
    data_root: str = described("data", "where torchvision datasets are stored")
    download: bool = described(False, "let torchvision download the dataset (internet)")
    val_fraction: float = described(0.2, "held out per class when the data has no val split",
                                    Range(0, 1, open_low=True))
    img_size: int | None = described(None, "pretrain at this size (None: the model's)", AT_LEAST_ONE)
    overrides: dict[str, Any] = described(help="spec fields, e.g. {'depth': 6}", factory=dict)
    grad_checkpointing: bool = described(False, "recompute block activations in backward")
    out: str = described("runs/pretrain", "run folder: metrics, plot, checkpoints, the encoder (one run each)")
    log: tuple[Tracker, ...] = described((), "also send the metrics rows and the options to tensorboard and/or "
                                         "wandb, e.g. tensorboard,wandb (as vitzoo finetune --log)")
    resume: bool = described(False, "continue the run in out from its latest checkpoint")
    overwrite: bool = described(False, "start anew although out holds a run: it is moved to <out>.old-<time>, "
                                "not deleted")
    mae: MaeOptions = described(help="the masked autoencoder's settings", factory=MaeOptions)
    train: TrainConfig = described(help="how to train", factory=TrainConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        default = TrainConfig()
        changed = [name for name in CLASSIFIER_ONLY if getattr(self.train, name) != getattr(default, name)]
        if changed:
            raise ValueError(f"train.{', train.'.join(changed)} only apply to training a classifier; pretrain "
                             f"without them (fine-tune the pretrained encoder with them)")


def encoder_folder(out: str | Path) -> Path:
    """Where a pretraining run in ``out`` writes its encoder (a ``save_pretrained`` folder)."""
    return Path(out) / ENCODER


def pretrain(config: PretrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the summary that is also written to ``summary.json``."""
    with torch.device("meta"):  # refuse an encoder that cannot be masked before any data is read
        encoder = create_model(config.model, num_classes=0, img_size=config.img_size, **config.overrides)
    problem = subset_problem(encoder.spec)
    if problem:
        raise ValueError(f"{config.model} cannot be pretrained with MAE, which runs the encoder on the visible "
                         f"patches only: {problem}; pick a model whose blocks treat tokens as a set (plain ViT blocks "
                         f"with absolute or rotary positions)")
    world = init_world(config.train.device)
    with claim_run_folder(config.out, lambda folder: training_run_in(folder, config.resume),
                          config.overwrite) if world.main else nullcontext():
        return _pretrain(config, world, encoder.pretrained_cfg, progress)


def _pretrain(config: PretrainConfig, world: World, cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    out, train = Path(config.out), config.train
    check_trackers(config.log)
    train_data, val_data = build_datasets(config.data, cfg, config.data_root, config.download, config.val_fraction,
                                          train.seed, options=config.data_options, train_pixels=True)
    torch.manual_seed(train.seed)
    encoder = create_model(config.model, num_classes=0, img_size=config.img_size, **config.overrides)
    encoder.set_grad_checkpointing(config.grad_checkpointing)
    model = MaskedAutoencoder(encoder, config.mae)
    log = RunLog(out, config.resume, config.log, loss_name="masked-patch MSE") if world.main else None
    if log and not config.resume:
        out.mkdir(parents=True, exist_ok=True)
        log.started(config)
    # what the run is besides train, the model and the objective (which adds the MAE options), for checkpoints
    settings = {k: v for k, v in asdict(config).items() if k not in ("train", "mae", "out", "resume", "overwrite")}
    result = fit(model, train_data, val_data, train, progress=progress, run_dir=out, resume=config.resume,
                 world=world, on_eval=log.row if log else None, run_settings=settings,
                 on_resume=log.resumed if log else None, objective=MaeObjective(config.mae))
    weights = full_state_dict(model)
    digests = gather_strings(weights_digest(weights), world)
    final = result.final
    summary = {
        "model": config.model, "method": config.method, "data": config.data, "train_images": len(train_data),
        "steps": len(result.losses), "processes": world.world_size, "val_loss": final.get("val_loss"),
        "train_loss": final["train_loss"], "images_per_s": round(result.images_per_s, 1),
        "train_minutes": round(result.seconds / 60, 2), "encoder": str(encoder_folder(out)),
        "weights_digest": digests[0], "ranks_identical": len(set(digests)) == 1,
    }
    if log:
        save_pretrained(encoder, encoder_folder(out), {k.removeprefix("encoder."): v for k, v in weights.items()
                                                       if k.startswith("encoder.")})  # full under FSDP too
        log.finish(result, summary)
        print(json.dumps(summary), flush=True)  # the result on stdout; progress and logs are on stderr
    close_world(world)
    return summary


def _config_from_args(args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(**parsed_fields(PretrainConfig, args), overrides=spec_overrides(args),
                          data_options=data_options(args),
                          mae=MaeOptions(**parsed_fields(MaeOptions, args)),
                          train=TrainConfig(**parsed_fields(TrainConfig, args)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The pretraining options: the fields of :class:`PretrainConfig`, :class:`MaeOptions` and the
    :class:`TrainConfig` fields that apply to it."""
    add_options(p, PretrainConfig, ["model", "method"])
    add_data_arguments(p, PretrainConfig)
    add_options(p, PretrainConfig, ["val_fraction", "img_size"])
    add_set_option(p, "override a spec field or block option, e.g. --set depth=6 (repeatable)")
    add_options(p, MaeOptions, [f.name for f in fields(MaeOptions)])
    add_options(p, PretrainConfig, ["grad_checkpointing"])
    add_options(p, TrainConfig, [
        "steps", "batch_size", "accum_steps", "lr", "weight_decay", "optimizer", "warmup_steps", "grad_clip", "amp",
        "compile", "eval_every", "checkpoint_every", "keep_checkpoints", "strategy", "num_workers", "seed",
    ], flags={"num_workers": "--workers"})
    add_device_option(p)
    add_options(p, PretrainConfig, ["out", "log"])
    add_options(p.add_mutually_exclusive_group(), PretrainConfig, ["resume", "overwrite"])


def run_from_args(args: argparse.Namespace) -> int:
    return run_training(args, _config_from_args, pretrain)


def add_pretrain_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining of an encoder (MAE) on unlabeled images")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
