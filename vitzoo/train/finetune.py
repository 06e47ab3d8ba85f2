"""``vitzoo finetune`` / ``python -m vitzoo.train``: any registry model on any image dataset.

One run folder holds everything a run produces: ``run.json`` (the options it started with, and a
``history`` of its resumes and what each changed), ``metrics.jsonl`` and ``metrics.csv`` (one row per
evaluation), ``curves.png``, ``summary.json`` and ``checkpoints/``. ``--resume`` continues the run in
that folder exactly where its last checkpoint left it, with the same settings (see
:mod:`vitzoo.train.settings` for the few it may change), and cuts the logs back to that step. A new
run refuses a folder that holds another one (``--overwrite`` moves it aside), and one process at a
time holds the folder (:mod:`vitzoo.train.runfolder`). A ``--lora`` run (:mod:`vitzoo.lora`) also ends with
``adapters.safetensors`` and ``merged/``. Under ``torchrun`` every process trains its
share of each batch (DDP, or FSDP with ``--strategy fsdp``) and rank 0 holds and writes the folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from vitzoo.arguments import (
    add_device_option,
    add_options,
    add_pretrained_option,
    add_set_option,
    parsed_fields,
    pretrained_value,
    spec_overrides,
)
from vitzoo.errors import run_command
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, Range, check_fields, described
from vitzoo.lora import LoraOptions, apply_lora, merged_state_dict, parse_lora, save_lora, trainable_parameters
from vitzoo.registry import create_model
from vitzoo.train.data import (
    add_data_arguments,
    build_datasets,
    check_images,
    data_options,
    labelled_subset,
    num_classes,
)
from vitzoo.train.distill import DistillConfig, add_distill_arguments, build_distillation, distill_config_from_args
from vitzoo.train.distributed import World, close_world, full_state_dict, gather_strings, init_world, weights_digest
from vitzoo.train.loop import TrainConfig, TrainResult, fit, steps_per_epoch
from vitzoo.train.recipe import freeze_backbone
from vitzoo.train.runfolder import claim_run_folder, training_run_in
from vitzoo.train.sources import DataOptions
from vitzoo.train.trackers import Log, Tracker, check_trackers, open_trackers
from vitzoo.vit import VisionTransformer
from vitzoo.weights import save_pretrained
from vitzoo.weights.files import write_text_atomic

logger = logging.getLogger("vitzoo.finetune")
ADAPTERS, MERGED = "adapters.safetensors", "merged"  # a LoRA run's outputs in its folder


@dataclass
class FinetuneConfig:
    """What to fine-tune on what; ``train`` says how. Each field carries its default, range and help
    (:func:`vitzoo.fields.described`), which the constructor checks and ``vitzoo finetune`` offers."""

    model: str = described(help="a registry name, e.g. vit_tiny_patch16_224 (see `vitzoo list`)")
    data: str = described("digits", "digits | an ImageFolder path | torchvision:NAME | hf:PATH_OR_NAME (Hugging Face "
                          "datasets) | wds:PATTERN (webdataset tar shards)")
    data_options: DataOptions = described(help="how hf: and wds: data are read", factory=DataOptions)
    data_root: str = described("data", "where torchvision datasets are stored")
    download: bool = described(False, "let torchvision download the dataset (internet)")
    val_fraction: float = described(0.2, "held out per class when the data has no val split",
                                    Range(0, 1, open_low=True))
    labels_per_class: int | None = described(None, "train on this many labelled images of each class, drawn with the "
                                             "seed (few-label studies); None: all", AT_LEAST_ONE)
    pretrained: bool | str = described(False, "True: the hub weights; a path: a file or save_pretrained folder")
    num_classes: int | None = described(None, "checked against the data (None: the data's classes)", AT_LEAST_ONE)
    img_size: int | None = described(None, "train at this size, the position embedding resampled (None: the "
                                     "model's)", AT_LEAST_ONE)
    overrides: dict[str, Any] = described(help="spec fields, e.g. {'mlp': 'swiglu'}", factory=dict)
    freeze: bool = described(False, "linear probe: train the head only (not with lora, which says what trains)")
    lora: LoraOptions | None = described(None, "train low-rank adapters (LoRA/DoRA) on frozen weights instead of "
                                         "every weight; the run ends with adapters.safetensors and merged/")
    grad_checkpointing: bool = described(False, "recompute block activations in backward")
    epochs: float | None = described(None, "passes over the training data; when set, overrides train.steps",
                                     POSITIVE)
    eval_every: int | None = described(None, "steps between evaluations (None: once per epoch)", AT_LEAST_ONE)
    checkpoint_every: int | None = described(None, "steps between checkpoints (None: at each evaluation)",
                                             AT_LEAST_ONE)
    out: str = described("runs/finetune", "run folder: metrics, plot, checkpoints (one run each)")
    log: tuple[Tracker, ...] = described((), "also send the metrics rows and the options to tensorboard "
                                         "(<out>/tensorboard) and/or wandb (WANDB_MODE=offline: on disk only), e.g. "
                                         "tensorboard,wandb; metrics.jsonl/csv and curves.png are always written")
    resume: bool = described(False, "continue the run in out from its latest checkpoint")
    overwrite: bool = described(False, "start anew although out holds a run: it is moved to <out>.old-<time>, "
                                "not deleted")
    train: TrainConfig = described(help="how to train", factory=TrainConfig)
    distillation: DistillConfig = described(help="a teacher to learn from besides the labels", factory=DistillConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.distillation.teacher and self.train.naflex:
            raise ValueError("distillation feeds the teacher image batches, and naflex trains on patch sequences; "
                             "distil without --naflex")
        if self.freeze and self.lora:
            raise ValueError("--freeze trains the head alone and --lora trains adapters (and the head, unless "
                             "train_head=false): drop one")


def build_model(config: FinetuneConfig, data_classes: int) -> VisionTransformer:
    """The registry model with the run's head, size and block overrides, weights loaded and adapted."""
    if config.num_classes is not None and config.num_classes != data_classes:
        raise ValueError(f"num_classes={config.num_classes} but the data has {data_classes} classes; "
                         f"drop --num-classes or point --data at the matching dataset")
    model = create_model(config.model, pretrained=config.pretrained, num_classes=data_classes,
                         img_size=config.img_size, naflex=config.train.naflex, **config.overrides)
    if config.freeze:
        freeze_backbone(model)
    if config.lora:
        apply_lora(model, config.lora)
    model.set_grad_checkpointing(config.grad_checkpointing)
    trainable, total = trainable_parameters(model)
    logger.info("training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / max(1, total))
    return model


def strict_json(values: dict[str, Any], indent: int | None = None) -> str:
    """JSON text with a non-finite number written as null: a bare NaN is not JSON and breaks strict readers."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
    return json.dumps(finite, indent=indent, allow_nan=False)


class RunLog:
    """Rank 0's record of a run: its settings and resumes, metrics rows as JSON lines and CSV, curves as a PNG."""

    def __init__(self, folder: Path, resume: bool, trackers: tuple[Tracker, ...] = (),
                 loss_name: str = "cross-entropy") -> None:
        """``loss_name``: what the loss curves measure, as the plot labels them."""
        self.folder, self.trackers, self.loss_name = folder, trackers, loss_name
        self.logs: list[Log] = []  # the trackers, open from the start or resume of the run on
        self.jsonl = folder / "metrics.jsonl"
        if not resume:
            self.jsonl.unlink(missing_ok=True)

    def started(self, config: FinetuneConfig) -> None:
        """``run.json``: the options the run starts with, never rewritten by a resume (see :meth:`resumed`)."""
        write_text_atomic(self.folder / "run.json", json.dumps({**asdict(config), "history": []}, indent=2) + "\n")
        self.logs = open_trackers(self.trackers, self.folder, asdict(config))

    def resumed(self, step: int, changed: dict[str, list], rows: list[dict[str, float]]) -> None:
        """Write back the rows of the checkpoint (a killed run may have logged later ones, which the resumed
        run logs again) and add the resume, with the settings it changed, to ``run.json``'s history; the
        options the run started with stay."""
        write_text_atomic(self.jsonl, "".join(strict_json(row) + "\n" for row in rows))
        path = self.folder / "run.json"
        run = json.loads(path.read_text()) if path.is_file() else {}
        run.setdefault("history", []).append({"resumed_at": step, "changed": changed})
        write_text_atomic(path, json.dumps(run, indent=2) + "\n")
        options = {k: v for k, v in run.items() if k != "history"}
        self.logs = open_trackers(self.trackers, self.folder, options, step, rows)

    def row(self, values: dict[str, float]) -> None:
        with self.jsonl.open("a") as f:
            f.write(strict_json(values) + "\n")
        for log in self.logs:
            log.row(values)
        logger.info("step %d  %s", values["step"],
                    "  ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in ("step",)))

    def finish(self, result: TrainResult, summary: dict[str, Any]) -> None:
        """Rewrite the CSV and the plot from the whole run (rows before a resume included)."""
        rows = result.evals
        if rows:
            with (self.folder / "metrics.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
                writer.writeheader()
                writer.writerows(rows)
        self._plot(result)
        write_text_atomic(self.folder / "summary.json", strict_json(summary, indent=2) + "\n")
        for log in self.logs:
            log.close()

    def _plot(self, result: TrainResult) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
        loss_ax.plot(range(1, len(result.losses) + 1), result.losses, lw=0.8, label="train (per step)")
        steps = [r["step"] for r in result.evals]
        if steps:
            loss_ax.plot(steps, [r["val_loss"] for r in result.evals], "o-", label="val")
        if steps and "val_acc" in result.evals[-1]:
            acc_ax.plot(steps, [r["val_acc"] for r in result.evals], "o-", label="val")
            for key in (k for k in result.evals[-1] if k.startswith("val_acc@")):
                acc_ax.plot(steps, [r[key] for r in result.evals], ".:", label=f"val at {key.partition('@')[2]} px")
            if "val_agreement" in result.evals[-1]:
                acc_ax.plot(steps, [r["val_agreement"] for r in result.evals], "^-.", label="agreement with teacher")
            if "ema_val_acc" in result.evals[-1]:
                acc_ax.plot(steps, [r["ema_val_acc"] for r in result.evals], "s--", label="val (EMA)")
        loss_ax.set(xlabel="step", ylabel=self.loss_name, title="loss")
        acc_ax.set(xlabel="step", ylabel="top-1", title="validation accuracy")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
            if ax.lines:  # a pretraining run has no accuracy to show
                ax.legend()
        fig.tight_layout()
        fig.savefig(self.folder / "curves.png", dpi=100)
        plt.close(fig)


def finetune(config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the summary that is also written to ``summary.json``.

    Rank 0 holds the run folder from before the first write to the end (see :func:`claim_run_folder`).
    """
    world = init_world(config.train.device)
    with claim_run_folder(config.out, lambda folder: training_run_in(folder, config.resume),
                          config.overwrite) if world.main else nullcontext():
        return _train(config, world, progress)


def _train(config: FinetuneConfig, world: World, progress: bool) -> dict[str, Any]:
    """The run itself; ``config`` stays as the caller gave it, the settings it leaves open are filled in a copy."""
    out = Path(config.out)
    check_trackers(config.log)
    with torch.device("meta"):  # only the preprocessing config is needed before the data is known
        cfg = create_model(config.model, img_size=config.img_size, **config.overrides).pretrained_cfg
    train_data, val_data = build_datasets(config.data, cfg, config.data_root, config.download,
                                          config.val_fraction, config.train.seed, native=config.train.naflex,
                                          train_pixels=not config.train.naflex,
                                          options=config.data_options, expected_classes=config.num_classes)
    if config.labels_per_class:
        train_data = labelled_subset(train_data, config.labels_per_class, config.train.seed)
    classes = num_classes(train_data)
    distillation = build_distillation(config.distillation, cfg, classes, world.device, config.data)
    torch.manual_seed(config.train.seed)
    model = build_model(config, classes)
    epoch_steps = max(1, steps_per_epoch(len(train_data), config.train, world.world_size))
    steps = config.train.steps if config.epochs is None else max(1, round(config.epochs * epoch_steps))
    eval_every = config.eval_every or min(epoch_steps, steps)
    train = replace(config.train, steps=steps, eval_every=eval_every,
                    checkpoint_every=config.checkpoint_every or eval_every)
    config = replace(config, train=train)
    log = RunLog(out, config.resume, config.log) if world.main else None
    if log and not config.resume:
        out.mkdir(parents=True, exist_ok=True)
        log.started(config)
    # what the run is besides train and the model, for checkpoints to record (epochs became train.steps)
    skipped = ("train", "distillation", "out", "resume", "overwrite", "epochs")
    settings = {k: v for k, v in asdict(config).items() if k not in skipped} | asdict(config.distillation)
    result = fit(model, train_data, val_data, train, progress=progress, run_dir=out, resume=config.resume,
                 world=world, on_eval=log.row if log else None, run_settings=settings,
                 on_resume=log.resumed if log else None, objective=distillation)
    weights = full_state_dict(model)
    digests = gather_strings(weights_digest(weights), world)
    final, (trainable, total) = result.final, trainable_parameters(model)
    summary = {
        "model": config.model, "data": config.data, "classes": classes, "train_images": len(train_data),
        "steps": len(result.losses), "processes": world.world_size, "val_acc": final.get("val_acc"),
        "val_loss": final.get("val_loss"), "ema_val_acc": final.get("ema_val_acc"),
        **{k: v for k, v in final.items() if k.startswith(("val_acc@", "ema_val_acc@", "val_agreement"))},
        "train_loss": final["train_loss"], "images_per_s": round(result.images_per_s, 1),
        "train_minutes": round(result.seconds / 60, 2), "data_wait_minutes": round(result.data_seconds / 60, 3),
        "weights_digest": digests[0], "ranks_identical": len(set(digests)) == 1, "trainable_params": trainable,
        "params": total,
    }
    if log and config.lora:  # the adapters alone, and plain weights that load into the registry model
        save_lora(model, out / ADAPTERS, config.lora, weights)
        save_pretrained(model, out / MERGED, merged_state_dict(model, weights))
        logger.info("adapters: %s; merged weights: %s", out / ADAPTERS, out / MERGED)
    if log:
        log.finish(result, summary)
        print(json.dumps(summary), flush=True)  # the result on stdout; progress and logs are on stderr
    close_world(world)
    return summary


def _config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    # eval_every and checkpoint_every are the run's (None: per epoch); _train sets train's from them
    train = TrainConfig(**parsed_fields(TrainConfig, args, exclude={f.name for f in fields(FinetuneConfig)}))
    return FinetuneConfig(**{**parsed_fields(FinetuneConfig, args), "pretrained": pretrained_value(args),
                             "train": train, "overrides": spec_overrides(args), "data_options": data_options(args),
                             "distillation": distill_config_from_args(args)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The fine-tuning options (shared by ``vitzoo finetune`` and ``python -m vitzoo.train``): the fields of
    :class:`FinetuneConfig` and :class:`TrainConfig`, and the few that only the command line has."""
    add_options(p, FinetuneConfig, ["model"])
    add_data_arguments(p, FinetuneConfig)
    add_options(p, FinetuneConfig, ["val_fraction", "labels_per_class"])
    add_pretrained_option(p, "start from")
    add_options(p, FinetuneConfig, ["num_classes", "img_size"])
    add_set_option(p, "override a spec field or block option, e.g. --set mlp=swiglu --set attn.qk_norm=true "
                      "--set drop.head=0.1 (repeatable)")
    add_options(p, FinetuneConfig, ["freeze", "grad_checkpointing"])
    add_distill_arguments(p)
    p.add_argument("--lora", type=_lora_argument, nargs="?", const=LoraOptions(), default=None,
                   metavar="NAME=VALUE,...",
                   help="train LoRA adapters on frozen weights: r=8,alpha=16,dropout=0.0,dora=false,targets=attn.qkv "
                        "(targets: attn.qkv, attn.q, attn.k, attn.v, attn.proj, mlp, head; alone: these defaults). "
                        "The head trains fully, as a new head for new classes must, unless train_head=false or head "
                        "is a target; --freeze does not combine with it. The run folder ends with "
                        "adapters.safetensors (the trained tensors and the options) and merged/ (the adapters "
                        "folded into plain weights, a save_pretrained folder: create_model('<out>/merged'))")
    length = p.add_mutually_exclusive_group()
    add_options(length, FinetuneConfig, ["epochs"])
    add_options(length, TrainConfig, ["steps"])
    add_options(p, TrainConfig, [
        "batch_size", "accum_steps", "naflex", "max_tokens", "seq_lens", "lr", "weight_decay", "layer_decay",
        "optimizer", "warmup_steps", "label_smoothing", "mixup", "cutmix", "grad_clip", "amp", "compile", "ema_decay",
    ])
    add_options(p, FinetuneConfig, ["eval_every"])
    add_options(p, TrainConfig, ["eval_sizes"])
    add_options(p, FinetuneConfig, ["checkpoint_every"])
    add_options(p, TrainConfig, ["keep_checkpoints", "strategy", "num_workers", "seed"],
                flags={"num_workers": "--workers"})
    add_device_option(p)
    add_options(p, FinetuneConfig, ["out", "log"])
    add_options(p.add_mutually_exclusive_group(), FinetuneConfig, ["resume", "overwrite"])


def _lora_argument(text: str) -> LoraOptions:
    try:
        return parse_lora(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--lora: ")) from None


def run_training(args: argparse.Namespace, config_from_args: Callable[[argparse.Namespace], Any],
                 train: Callable[..., dict[str, Any]]) -> int:
    """What a training command (finetune, pretrain) does with its parsed arguments: log to stdout, build the
    config, check every image first where asked, train; exit status 1 when the processes ended with different
    weights."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args)
    if args.check_images:
        check_images(args.data)
    return 0 if train(config)["ranks_identical"] else 1


def run_from_args(args: argparse.Namespace) -> int:
    return run_training(args, _config_from_args, finetune)


def add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on digits, an ImageFolder, a torchvision, Hugging Face "
                                        "or webdataset dataset")
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitzoo.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command("python -m vitzoo.train", lambda: run_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
