"""Ablations: train every variant of a grid of spec overrides under identical conditions, and compare.

``vitzoo ablate --model vit_pico_patch4_32 --grid mlp=gelu,swiglu --grid norm=layernorm,rmsnorm
--seeds 2`` (or :func:`ablate`) trains each variant for each seed with the same data split, data
order, initialisation seed and optimizer recipe, so the only difference between two runs of a seed
is the swapped block. Each finished run is a JSON file under ``OUT/runs/`` written atomically; a
rerun of the same command skips them, so an interrupted grid resumes where it stopped (more seeds add
runs). A folder holding an ablation of other settings, or a fine-tuning run, is refused unless
``overwrite`` moves it aside, and one process at a time holds it (:mod:`vitzoo.train.runfolder`). The folder
gets ``results.csv``/``results.json`` (one row per variant and seed), ``summary.md`` (mean ± std
over seeds) and PNG plots (see :mod:`vitzoo.ablate.report`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import itertools
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vitzoo.ablate.report import size_columns, write_report
from vitzoo.arguments import add_device_option, add_options, add_set_option, parsed_fields, spec_overrides, value_type
from vitzoo.card import count_macs
from vitzoo.errors import run_command
from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, check_fields, described, field_default, field_like
from vitzoo.memory import peak_tensor_bytes
from vitzoo.registry import create_model, load_registry_file, model_spec
from vitzoo.spec import parse_value
from vitzoo.train import TrainConfig, build_datasets, fit
from vitzoo.train.data import add_data_arguments, check_images, data_options, num_classes
from vitzoo.train.distributed import World
from vitzoo.train.finetune import FinetuneConfig
from vitzoo.train.loop import to_device, train_loader
from vitzoo.train.recipe import build_optimizer
from vitzoo.train.runfolder import claim_run_folder, run_files
from vitzoo.train.sources import DataOptions
from vitzoo.weights.files import write_text_atomic

# pretrained_cfg keys that decide how images are prepared: variants that agree on them share datasets
PREPROCESSING = ("input_size", "mean", "std", "interpolation", "crop_pct")


@dataclass
class AblationConfig:
    """Everything that decides the numbers of an ablation; a resumed grid must match it exactly.

    The settings it shares with fine-tuning are declared there (default, range, help) and taken from
    :class:`TrainConfig` and :class:`FinetuneConfig`; ``vitzoo ablate`` builds its options from the fields.
    """

    model: str = described(help="registry name of the base model, e.g. vit_pico_patch4_32")
    grid: dict[str, list[Any]] = described(help="spec field -> values to try; variants are the cartesian product")
    overrides: dict[str, Any] = described(help="spec fields fixed for every variant", factory=dict)
    data: str = field_like(FinetuneConfig, "data")
    data_options: DataOptions = field_like(FinetuneConfig, "data_options")
    steps: int = field_like(TrainConfig, "steps", default=200)
    seeds: list[int] = described(help="each variant trains once per seed", factory=lambda: [0])
    batch_size: int = field_like(TrainConfig, "batch_size")
    naflex: bool = field_like(TrainConfig, "naflex")
    max_tokens: int = field_like(TrainConfig, "max_tokens")
    seq_lens: tuple[int, ...] = field_like(TrainConfig, "seq_lens")
    eval_sizes: tuple[int, ...] = field_like(TrainConfig, "eval_sizes")
    lr: float = field_like(TrainConfig, "lr")
    weight_decay: float = field_like(TrainConfig, "weight_decay")
    warmup_steps: int | None = described(None, "steps of linear warm-up (None: a tenth of the steps, at most 30)",
                                         NON_NEGATIVE)
    device: str = field_like(TrainConfig, "device")
    data_root: str = field_like(FinetuneConfig, "data_root")
    download: bool = field_like(FinetuneConfig, "download")

    def __post_init__(self) -> None:
        check_fields(self)

    def train_config(self, seed: int) -> TrainConfig:
        """The one recipe every run uses; only the seed changes between seeds."""
        warmup = min(30, self.steps // 10) if self.warmup_steps is None else self.warmup_steps
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, naflex=self.naflex, max_tokens=self.max_tokens,
                           seq_lens=self.seq_lens, eval_sizes=self.eval_sizes, lr=self.lr,
                           weight_decay=self.weight_decay, warmup_steps=warmup, eval_every=self.steps, seed=seed,
                           device=self.device)

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, spec overrides) for each point of the grid, e.g. ``("mlp=swiglu norm=rmsnorm", {...})``."""
        fields = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[f] for f in fields)):
            name = " ".join(f"{f}={format_value(v)}" for f, v in zip(fields, values, strict=True)) or "baseline"
            out.append((name, {**self.overrides, **dict(zip(fields, values, strict=True))}))
        return out


@dataclass
class AblationResult:
    """The rows of all runs (finished earlier or now), the runs executed now, and the results folder."""

    rows: list[dict[str, Any]]
    executed: list[str]
    out: Path


def format_value(value: Any) -> str:
    """A grid value as variant names and the CLI write it; per-layer choices joined by ``+``."""
    return "+".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """``"mlp=gelu,swiglu"`` -> ``("mlp", ["gelu", "swiglu"])``; ``gelu+swiglu`` is one per-layer value."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise ValueError(f"expected --grid FIELD=VALUE,VALUE (e.g. mlp=gelu,swiglu), got {text!r}")
    field = name.strip()
    parse = lambda part: parse_value(part, field)  # noqa: E731 -- a bool word only for a bool field
    parsed = [tuple(map(parse, v.split("+"))) if "+" in v else parse(v) for v in values.split(",")]
    return field, parsed


def import_plugin(target: str) -> None:
    """Import a user's Python file (``path/blocks.py``) or module (``mypkg.blocks``) that registers blocks."""
    path = Path(target)
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ValueError(f"plugin file {target} does not exist; pass a .py file or an importable module name")
        spec = importlib.util.spec_from_file_location(f"vitzoo_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(target)
    except ModuleNotFoundError as err:
        raise ValueError(f"cannot import plugin {target!r} ({err}); pass a .py path or put the module on "
                         f"PYTHONPATH") from None


def ablate(model: str, grid: Mapping[str, Sequence[Any]], out: str | Path = "ablation", *,
           seeds: int | Sequence[int] = 1, progress: bool = True, overwrite: bool = False,
           **settings: Any) -> AblationResult:
    """Train every variant of ``grid`` on ``model`` for each seed and write the results folder ``out``.

    ``seeds`` is a count (seeds 0..n-1) or a list; ``settings`` are the other :class:`AblationConfig`
    fields (``data``, ``steps``, ``overrides``, ``batch_size``, ``lr``, ...). Runs already in ``out``
    are kept, so calling again after an interruption finishes the grid; ``overwrite`` moves an ablation
    of other settings found in ``out`` to ``<out>.old-<time>`` instead of refusing to start.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    config = AblationConfig(model=model, grid={k: list(v) for k, v in grid.items()}, seeds=seed_list, **settings)
    return run_ablation(config, out, progress, overwrite)


def run_ablation(config: AblationConfig, out: str | Path, progress: bool = True,
                 overwrite: bool = False) -> AblationResult:
    """Run the grid of ``config`` into the folder ``out`` (see :func:`ablate`)."""
    variants = config.variants()
    for _, overrides in variants:  # fail on a bad field or block name before hours of training
        model_spec(config.model, **overrides)
    setup = json.loads(json.dumps({k: v for k, v in asdict(config).items() if k != "seeds"}))  # as files hold it
    jobs = [(name, overrides, seed) for seed in config.seeds for name, overrides in variants]
    rows, executed, datasets = [], [], {}
    with claim_run_folder(out, lambda folder: _other_run(folder, setup), overwrite) as folder:
        (folder / "runs").mkdir(exist_ok=True)
        bar = tqdm(jobs, disable=not progress, unit="run", desc="ablation")
        for name, overrides, seed in bar:
            path = folder / "runs" / f"{slug(name)}__seed{seed}.json"
            if path.is_file():  # finished earlier: the claim checked it was run with this setup
                run = json.loads(path.read_text())
            else:
                bar.set_postfix_str(f"{name} seed={seed}")
                run = {"setup": setup, **train_variant(config, name, overrides, seed, datasets, progress)}
                write_text_atomic(path, json.dumps(run, indent=1))
                executed.append(path.stem)
            rows.append(run)
        bar.close()
        write_report(folder, config, rows)
    return AblationResult(rows=rows, executed=executed, out=folder)


def _other_run(folder: Path, setup: dict[str, Any]) -> str | None:
    """What in ``folder`` an ablation of ``setup`` would mix with: a fine-tuning run, or runs of other settings."""
    finetune = [name for name in run_files(folder) if name not in ("runs", "results.json")]
    if finetune:
        return f"a fine-tuning run ({', '.join(finetune)})"
    setups = [json.loads(path.read_text())["setup"] for path in (folder / "runs").glob("*.json")]
    # a setting that runs of an older vitzoo do not record is compared as its default, so their grid resumes
    defaults = json.loads(json.dumps({f.name: value for f in fields(AblationConfig)
                                      if (value := field_default(f)) is not MISSING}, default=asdict))
    changed = sorted({k for other in setups for k in setup.keys() | other.keys()
                      if other.get(k, defaults.get(k)) != setup.get(k)})
    if changed:
        return (f"an ablation written with other settings ({', '.join(changed)}); rerun with the original settings "
                f"to resume it")
    return None


def train_variant(config: AblationConfig, name: str, overrides: dict[str, Any], seed: int,
                  datasets: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Train one variant with one seed; its row of results and its loss curve.

    ``datasets`` caches the (train, val) pair per input preprocessing, so variants share the data.
    """
    torch.manual_seed(seed)  # the same initialisation stream for every variant of a seed
    model = create_model(config.model, naflex=config.naflex, **overrides)
    cfg = model.pretrained_cfg
    key = json.dumps([cfg.get(k) for k in PREPROCESSING], default=str)
    if key not in datasets:
        datasets[key] = build_datasets(config.data, cfg, config.data_root, config.download, native=config.naflex,
                                       options=config.data_options, train_pixels=not config.naflex)
    train, val = datasets[key]
    model.reset_classifier(num_classes(train))
    train_config = config.train_config(seed)
    result = fit(model, train, val, train_config, progress=progress)
    final = result.final
    input_size = model.pretrained_cfg["input_size"]
    return {
        "variant": name, "seed": seed, **{k: format_value(v) for k, v in overrides.items() if k in config.grid},
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": 2 * count_macs(model.eval(), input_size) / 1e9,
        "train_img_s": final["images_per_s"], "train_loss": final["train_loss"],  # mean of the last 20 steps
        "val_loss": final.get("val_loss"), "val_acc": final.get("val_acc"),
        **{key: final.get(key) for key in size_columns(config)},
        "peak_mem_mb": training_bytes(model, train, train_config) / 2**20,
        "peak_mem_kind": "weights + the live tensors of one training step at their peak (activations, "
                         "gradients, optimizer state), measured",
        "seconds": final["seconds"], "steps": len(result.losses), "losses": result.losses,
    }


def training_bytes(model: nn.Module, train: Any, config: TrainConfig) -> int:
    """Memory training needs: the weights plus the most tensor bytes that one step of ``config``'s recipe
    (forward, backward, the optimizer's first update, which creates its state) holds at once,
    counted on a copy of the model so the trained one is left as it is."""
    replica = copy.deepcopy(model).train()
    optimizer = build_optimizer(replica, config.lr, config.weight_decay, config.layer_decay, config.optimizer)
    device = next(replica.parameters()).device
    images, labels = next(iter(train_loader(replica, train, config, World(device=str(device)), epoch=0, done=0)))
    images, labels = to_device(images, str(device)), labels.to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            loss = F.cross_entropy(replica(images), labels)
        loss.backward()
        optimizer.step()

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        step_bytes = peak_tensor_bytes(step, device)
    return sum(p.numel() * p.element_size() for p in replica.parameters()) + step_bytes


def slug(name: str) -> str:
    """A variant name as a file name: ``mlp=swiglu norm=rmsnorm`` -> ``mlp-swiglu_norm-rmsnorm``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name.replace("=", "-"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ablation options: the fields of :class:`AblationConfig` and the few only the command line has."""
    add_options(p, AblationConfig, ["model"], flags={"model": "--model"})
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="spec field and the values to compare (repeat for a grid); per-layer: gelu+gelu+swiglu")
    add_set_option(p, "spec override for every variant, e.g. depth=2 (per-layer values comma-separated)")
    add_data_arguments(p, AblationConfig)
    add_options(p, AblationConfig, ["steps"])
    p.add_argument("--seeds", type=value_type("number of seeds", int, AT_LEAST_ONE), default=1,
                   help="runs per variant, seeds 0..N-1")
    add_options(p, AblationConfig, ["batch_size", "naflex", "max_tokens", "seq_lens", "lr", "weight_decay",
                                    "warmup_steps", "eval_sizes"])
    add_device_option(p)
    p.add_argument("--out", default=None, help="results folder (default: ablations/MODEL); rerun to resume")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew although --out holds another ablation: it is moved to <out>.old-<time>")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a user file or module first, e.g. one that calls vitzoo.register_block")
    p.add_argument("--registry", action="append", default=[], metavar="FILE.toml",
                   help="extra registry file with the user's model entries")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from_args(args: argparse.Namespace) -> AblationConfig:
    return AblationConfig(**{
        **parsed_fields(AblationConfig, args), "grid": dict(map(parse_grid, args.grid)),
        "overrides": spec_overrides(args), "seeds": list(range(args.seeds)), "data_options": data_options(args),
    })


def run_from_args(args: argparse.Namespace) -> int:
    """The ``ablate`` command: plugins and registry files first, then the grid; prints where results are."""
    for target in args.plugin:
        import_plugin(target)
    for path in args.registry:
        load_registry_file(path)
    if args.check_images:
        check_images(args.data)
    config = _config_from_args(args)
    result = run_ablation(config, args.out or Path("ablations") / args.model, progress=not args.no_progress,
                          overwrite=args.overwrite)
    print(f"{len(result.executed)} run(s) trained, {len(result.rows) - len(result.executed)} reused; "
          f"results in {result.out} (summary.md, results.csv, results.json, *.png)")
    return 0


def add_ablate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="compare block swaps: train a grid of variants x seeds, write tables and plots")
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitzoo.ablate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command("vitzoo ablate", lambda: run_from_args(parser.parse_args(argv)))
