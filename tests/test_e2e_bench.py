"""benchmarks/e2e_train.py's pieces: the generated JPEGs, both trainers' commands as their own parsers read them,
and the per-step timing each trainer logs. timm's train.py itself is never run here."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

import vitzoo
from vitzoo.cli import build_parser
from vitzoo.train.data import build_datasets, data_config
from vitzoo.train.loop import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


e2e = _load("e2e_train", ROOT / "benchmarks" / "e2e_train.py")
TIMM_LOG = "\n".join([  # train.py's lines, epoch 1's first step logged between two of epoch 0's
    "Train: 0 [   0/3 ( 33%)]  Loss: 1.47 (1.47)  Time: 0.721s,   11.09/s  (0.721s,   11.09/s)  "
    "LR: 0.000e+00  Data: 0.252 (0.252)",
    "Train: 1 [   0/3 ( 33%)]  Loss: 1.47 (1.47)  Time: 0.343s,   23.33/s  (0.343s,   23.33/s)  "
    "LR: 5.000e-04  Data: 0.047 (0.047)",
    "Train: 0 [   1/3 ( 67%)]  Loss: 1.41 (1.44)  Time: 0.333s,   24.01/s  (0.527s,   15.18/s)  "
    "LR: 3.333e-04  Data: 0.003 (0.127)",
])


def test_the_jpegs_are_the_same_each_time_and_train_in_the_loop(tmp_path, caplog):
    root = e2e.make_image_folder(tmp_path / "a", classes=2, train_per_class=4, val_per_class=1, size=40)
    again = e2e.make_image_folder(tmp_path / "b", classes=2, train_per_class=4, val_per_class=1, size=40)
    files = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    assert len(files) == 10 and files == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    model = vitzoo.create_model("vit_tiny_patch16_224", img_size=16, num_classes=2, embed_dim=32, num_heads=2,
                                depth=1, patch_size=4)
    train, val = build_datasets(str(root), data_config(model))
    assert (len(train), len(val)) == (8, 2)
    with caplog.at_level(logging.DEBUG, logger="vitzoo.train.loop"):  # 2 epochs of 2 steps, one worker
        result = fit(model, train, None, TrainConfig(steps=4, batch_size=4, warmup_steps=1, num_workers=1),
                     progress=False)
    steps = e2e.parse_steps("vitzoo", caplog.text)
    assert len(steps) == 4 and all(0 <= waited <= seconds for seconds, waited in steps)
    assert result.data_seconds == pytest.approx(sum(waited for _, waited in steps), abs=1e-3)
    assert sum(seconds for seconds, _ in steps) == pytest.approx(result.seconds, abs=1e-3)


def test_both_commands_ask_for_the_same_recipe(tmp_path):
    recipe = e2e.Recipe(batch_size=8, steps_per_epoch=3, img_size=64, workers=1)
    timm_train = _load("timm_train", e2e.TIMM_TRAIN)
    theirs = timm_train.parser.parse_args(e2e.timm_command(recipe, tmp_path, tmp_path / "timm", 4)[2:])
    ours = build_parser().parse_args(e2e.vitzoo_command(recipe, tmp_path, tmp_path / "vitzoo")[3:])
    assert (theirs.batch_size, theirs.workers, theirs.lr, theirs.weight_decay, theirs.clip_grad) == (
        ours.batch_size, ours.num_workers, ours.lr, ours.weight_decay, ours.grad_clip) == (8, 1, 1e-3, 0.05, 1.0)
    assert theirs.epochs * recipe.steps_per_epoch == ours.steps == 6 and ours.warmup_steps == 3
    assert theirs.model == ours.model == recipe.model and theirs.model_kwargs == {"img_size": 64} == {
        "img_size": ours.img_size}
    assert theirs.smoothing == ours.label_smoothing and theirs.opt == ours.optimizer == "adamw"


def test_step_times_are_read_in_step_order():
    assert e2e.parse_steps("timm", TIMM_LOG) == [(0.721, 0.252), (0.333, 0.003), (0.343, 0.047)]
    vitzoo_log = ("\r 50%|#####| 1/2 [img_s=8]step 2: 0.3455 s, 0.0058 s of it waiting for data\n"  # after tqdm's bar
                  "step 1: 1.5 s, 0.25 s of it waiting for data\n")
    assert e2e.parse_steps("vitzoo", vitzoo_log) == [(1.5, 0.25), (0.3455, 0.0058)]
