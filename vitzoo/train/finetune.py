"""``vitzoo finetune`` / ``python -m vitzoo.train``: any registry model on any image dataset.

One run folder holds everything a run produces: ``run.json`` (the options it started with, and a
``history`` of its resumes and what each changed), ``metrics.jsonl`` and ``metrics.csv`` (one row per
evaluation), ``curves.png``, ``summary.json`` and ``checkpoints/``. ``--resume`` continues the run in
that folder exactly where its last checkpoint left it, with the same settings (see
:mod:`vitzoo.train.settings` for the few it may change), and cuts the logs back to that step. A new
run refuses a folder that holds another one (``--overwrite`` moves it aside), and one process at a
time holds the folder (:mod:`vitzoo.train.runfolder`). Under ``torchrun`` every process trains its
share of each batch (DDP, or FSDP with ``--strategy fsdp``) and rank 0 holds and writes the folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from vitzoo.arguments import device, non_negative_float, non_negative_int, positive_float, positive_int
from vitzoo.errors import run_command
from vitzoo.registry import create_model
from vitzoo.spec import parse_assignment
from vitzoo.train.data import add_data_arguments, build_datasets, check_images, num_classes
from vitzoo.train.distributed import World, close_world, full_state_dict, gather_strings, init_world, weights_digest
from vitzoo.train.loop import TrainConfig, TrainResult, fit, steps_per_epoch
from vitzoo.train.recipe import freeze_backbone
from vitzoo.train.runfolder import claim_run_folder, run_files
from vitzoo.vit import VisionTransformer
from vitzoo.weights.files import write_text_atomic

logger = logging.getLogger("vitzoo.finetune")


@dataclass
class FinetuneConfig:
    """What to fine-tune on what; ``train`` says how."""

    model: str
    data: str = "digits"  # "digits", an ImageFolder path, or "torchvision:NAME"
    data_root: str = "data"  # where torchvision datasets live (and are downloaded with download=True)
    download: bool = False
    val_fraction: float = 0.2  # held out per class when the data has no val split
    pretrained: bool | str = False  # True: the hub weights; a path: a file or save_pretrained folder
    num_classes: int | None = None  # None: the number of classes in the data
    img_size: int | None = None  # None: the model's; another size resamples the position embedding
    overrides: dict[str, Any] = field(default_factory=dict)  # spec fields: {"mlp": "swiglu", ...}
    freeze: bool = False  # linear probing: train the head only
    grad_checkpointing: bool = False
    epochs: float | None = None  # when set, overrides train.steps
    eval_every: int | None = None  # steps between evaluations; None: once per epoch
    checkpoint_every: int | None = None  # steps between checkpoints; None: at each evaluation
    out: str = "runs/finetune"
    resume: bool = False
    overwrite: bool = False  # move another run found in out to <out>.old-<time> instead of refusing to start
    train: TrainConfig = field(default_factory=TrainConfig)


def build_model(config: FinetuneConfig, data_classes: int) -> VisionTransformer:
    """The registry model with the run's head, size and block overrides, weights loaded and adapted."""
    if config.num_classes is not None and config.num_classes != data_classes:
        raise ValueError(f"num_classes={config.num_classes} but the data has {data_classes} classes; "
                         f"drop --num-classes or point --data at the matching dataset")
    model = create_model(config.model, pretrained=config.pretrained, num_classes=data_classes,
                         img_size=config.img_size, **config.overrides)
    if config.freeze:
        freeze_backbone(model)
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def strict_json(values: dict[str, Any], indent: int | None = None) -> str:
    """JSON text with a non-finite number written as null: a bare NaN is not JSON and breaks strict readers."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
    return json.dumps(finite, indent=indent, allow_nan=False)


class RunLog:
    """Rank 0's record of a run: its settings and resumes, metrics rows as JSON lines and CSV, curves as a PNG."""

    def __init__(self, folder: Path, resume: bool) -> None:
        self.folder = folder
        self.jsonl = folder / "metrics.jsonl"
        if not resume:
            self.jsonl.unlink(missing_ok=True)

    def started(self, config: FinetuneConfig) -> None:
        """``run.json``: the options the run starts with, never rewritten by a resume (see :meth:`resumed`)."""
        write_text_atomic(self.folder / "run.json", json.dumps({**asdict(config), "history": []}, indent=2) + "\n")

    def resumed(self, step: int, changed: dict[str, list], rows: list[dict[str, float]]) -> None:
        """Write back the rows of the checkpoint (a killed run may have logged later ones, which the resumed
        run logs again) and add the resume, with the settings it changed, to ``run.json``'s history; the
        options the run started with stay."""
        write_text_atomic(self.jsonl, "".join(strict_json(row) + "\n" for row in rows))
        path = self.folder / "run.json"
        run = json.loads(path.read_text()) if path.is_file() else {}
        run.setdefault("history", []).append({"resumed_at": step, "changed": changed})
        write_text_atomic(path, json.dumps(run, indent=2) + "\n")

    def row(self, values: dict[str, float]) -> None:
        with self.jsonl.open("a") as f:
            f.write(strict_json(values) + "\n")
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

    def _plot(self, result: TrainResult) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
        loss_ax.plot(range(1, len(result.losses) + 1), result.losses, lw=0.8, label="train (per step)")
        steps = [r["step"] for r in result.evals]
        if steps:
            loss_ax.plot(steps, [r["val_loss"] for r in result.evals], "o-", label="val")
            acc_ax.plot(steps, [r["val_acc"] for r in result.evals], "o-", label="val")
            if "ema_val_acc" in result.evals[-1]:
                acc_ax.plot(steps, [r["ema_val_acc"] for r in result.evals], "s--", label="val (EMA)")
        loss_ax.set(xlabel="step", ylabel="cross-entropy", title="loss")
        acc_ax.set(xlabel="step", ylabel="top-1", title="validation accuracy")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(self.folder / "curves.png", dpi=100)
        plt.close(fig)


def finetune(config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the summary that is also written to ``summary.json``.

    Rank 0 holds the run folder from before the first write to the end (see :func:`claim_run_folder`).
    """
    world = init_world(config.train.device)
    with claim_run_folder(config.out, lambda folder: _other_run(folder, config.resume),
                          config.overwrite) if world.main else nullcontext():
        return _train(config, world, progress)


def _other_run(folder: Path, resume: bool) -> str | None:
    """The run already in ``folder`` that a new run would mix with (none when resuming it)."""
    found = [] if resume else run_files(folder)
    return f"another run ({', '.join(found)}); continue it with --resume" if found else None


def _train(config: FinetuneConfig, world: World, progress: bool) -> dict[str, Any]:
    """The run itself; ``config`` stays as the caller gave it, the settings it leaves open are filled in a copy."""
    out = Path(config.out)
    with torch.device("meta"):  # only the preprocessing config is needed before the data is known
        cfg = create_model(config.model, img_size=config.img_size, **config.overrides).pretrained_cfg
    train_data, val_data = build_datasets(config.data, cfg, config.data_root, config.download,
                                          config.val_fraction, config.train.seed)
    classes = num_classes(train_data)
    torch.manual_seed(config.train.seed)
    model = build_model(config, classes)
    epoch_steps = max(1, steps_per_epoch(len(train_data), config.train, world.world_size))
    steps = config.train.steps if config.epochs is None else max(1, round(config.epochs * epoch_steps))
    eval_every = config.eval_every or min(epoch_steps, steps)
    train = replace(config.train, steps=steps, eval_every=eval_every,
                    checkpoint_every=config.checkpoint_every or eval_every)
    config = replace(config, train=train)
    log = RunLog(out, config.resume) if world.main else None
    if log and not config.resume:
        out.mkdir(parents=True, exist_ok=True)
        log.started(config)
    # what the run is besides train and the model, for checkpoints to record (epochs became train.steps)
    settings = {k: v for k, v in asdict(config).items() if k not in ("train", "out", "resume", "overwrite", "epochs")}
    result = fit(model, train_data, val_data, train, progress=progress, run_dir=out, resume=config.resume,
                 world=world, on_eval=log.row if log else None, run_settings=settings,
                 on_resume=log.resumed if log else None)
    digests = gather_strings(weights_digest(full_state_dict(model)), world)
    final = result.final
    summary = {
        "model": config.model, "data": config.data, "classes": classes, "train_images": len(train_data),
        "steps": len(result.losses), "processes": world.world_size, "val_acc": final.get("val_acc"),
        "val_loss": final.get("val_loss"), "ema_val_acc": final.get("ema_val_acc"),
        "train_loss": final["train_loss"], "images_per_s": round(result.images_per_s, 1),
        "train_minutes": round(result.seconds / 60, 2), "weights_digest": digests[0],
        "ranks_identical": len(set(digests)) == 1,
    }
    if log:
        log.finish(result, summary)
        print(json.dumps(summary), flush=True)  # the result on stdout; progress and logs are on stderr
    close_world(world)
    return summary


def _config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    train_fields = {f.name for f in fields(TrainConfig)} - {"eval_every", "checkpoint_every"}
    train = TrainConfig(**{k: v for k, v in vars(args).items() if k in train_fields and v is not None})
    if args.amp:
        train.amp = True
    pretrained: bool | str = args.pretrained if args.pretrained not in (None, "hub") else args.pretrained == "hub"
    return FinetuneConfig(
        model=args.model, data=args.data, data_root=args.data_root, download=args.download,
        val_fraction=args.val_fraction, pretrained=pretrained, num_classes=args.num_classes, img_size=args.img_size,
        overrides=dict(parse_assignment(text) for text in args.set), freeze=args.freeze,
        grad_checkpointing=args.grad_checkpointing, epochs=args.epochs, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, out=args.out, resume=args.resume, overwrite=args.overwrite, train=train,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The fine-tuning options (shared by ``vitzoo finetune`` and ``python -m vitzoo.train``)."""
    p.add_argument("model", help="a registry name, e.g. vit_tiny_patch16_224 (see `vitzoo list`)")
    add_data_arguments(p)
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out per class when there is no val split")
    p.add_argument("--pretrained", nargs="?", const="hub", default=None,
                   help="start from weights: the hub's (no value) or a file / save_pretrained folder")
    p.add_argument("--num-classes", type=positive_int, help="checked against the data (default: the data's classes)")
    p.add_argument("--img-size", type=positive_int, help="train at this size (position embedding resampled)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a spec field, e.g. --set mlp=swiglu --set drop_rate=0.1 (repeatable)")
    p.add_argument("--freeze", action="store_true", help="linear probe: train the head only")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_float, help="passes over the training data")
    length.add_argument("--steps", type=positive_int, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=positive_int, help="images per process per micro-batch (default 64)")
    p.add_argument("--accum-steps", type=positive_int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help="AdamW decoupled decay; norms, biases, tokens skip it")
    p.add_argument("--layer-decay", type=positive_float, help="layer-wise lr decay, e.g. 0.75")
    p.add_argument("--optimizer", choices=("adamw", "adam"))
    p.add_argument("--warmup-steps", type=non_negative_int)
    p.add_argument("--label-smoothing", type=non_negative_float)
    p.add_argument("--mixup", type=non_negative_float, help="Mixup Beta concentration, e.g. 0.8 (DeiT); off by default")
    p.add_argument("--cutmix", type=non_negative_float,
                   help="CutMix Beta concentration, e.g. 1.0; with --mixup, one per batch")
    p.add_argument("--grad-clip", type=non_negative_float, help="max gradient norm (0 disables)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--ema-decay", type=positive_float, help="also keep and evaluate an EMA of the weights, e.g. 0.999")
    p.add_argument("--eval-every", type=positive_int, help="steps between evaluations (default: once per epoch)")
    p.add_argument("--checkpoint-every", type=positive_int,
                   help="steps between checkpoints (default: each evaluation)")
    p.add_argument("--keep-checkpoints", type=positive_int,
                   help="newest checkpoints kept besides the best (default 2)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), help="multi-process strategy under torchrun")
    p.add_argument("--workers", dest="num_workers", type=non_negative_int,
                   help="data-loading processes (default 0; same results)")
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:N, ... (default: cuda when available)")
    p.add_argument("--out", default="runs/finetune", help="run folder: metrics, plot, checkpoints (one run each)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="start anew although --out holds a run: it is moved to <out>.old-<time>, not deleted")


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = _config_from_args(args)
    if args.check_images:
        check_images(args.data)
    if args.device is None:
        config.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = finetune(config)
    return 0 if summary["ranks_identical"] else 1


def add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on digits, an ImageFolder or a torchvision dataset")
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitzoo.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command("python -m vitzoo.train", lambda: run_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
