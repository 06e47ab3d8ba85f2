"""A run folder is never poisoned: divergence stops a run, a resume keeps its settings, logs match after a kill.

Each case runs real ``python -m vitzoo.train`` processes on a one-block 16 px pico model and digits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import killed_copy, process_env
from vitzoo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vitzoo.weights import read_state_dict

PICO = ["vit_pico_patch4_32", "--set", "depth=1", "--img-size", "16", "--batch-size", "32", "--device", "cpu"]


def _train(out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitzoo.train", *PICO, "--out", str(out), *options], env=process_env(),
                          capture_output=True, text=True, timeout=120)


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl read strictly: a bare NaN or Infinity is not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in {out / 'metrics.jsonl'}")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, bad_input):
    """lr 1e6 turns the loss into NaN at step 2: the run exits non-zero naming the step, the step-1 checkpoint
    is the latest (one kept, and none written after it), and every file of the run folder is valid JSON."""
    out = tmp_path / "run"
    done = _train(out, "--steps", "8", "--lr", "1e6", "--warmup-steps", "0", "--eval-every", "4",
                  "--checkpoint-every", "1", "--keep-checkpoints", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    bad_input("vitzoo finetune", "--lr 1e6 (the loss becomes NaN)", message)
    assert "training diverged at step 2" in message and "--lr" in message and "--grad-clip" in message
    assert "--amp" in message and "step_00000001, holds finite weights" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    weights, trainer, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert trainer["step"] == 1 and all(t.isfinite().all() for t in weights.values())
    assert not (out / "metrics.jsonl").exists() and not (out / "summary.json").exists()


def test_rotation_keeps_the_newest_and_the_best_checkpoint(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2, best_step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest", "step_00000002", "step_00000004",
                                                          "step_00000005"]
    assert (tmp_path / "best").read_text() == "step_00000002"


SCHEDULE = ("--eval-every", "2", "--checkpoint-every", "3")


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    """A finished 6-step run: evaluated at steps 2, 4 and 6, checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("runs") / "six"
    done = _train(out, "--steps", "6", *SCHEDULE)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _run_files(run: Path) -> dict[str, bytes]:
    """The run's files and their bytes, less the lock file (it holds the pid of whichever process opened it)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


def _copy(run: Path, to: Path, checkpoint_step: int | None = None) -> Path:
    """A copy of ``run``; with ``checkpoint_step``, as a kill after that checkpoint would have left it."""
    if checkpoint_step is not None:
        return killed_copy(run, to, checkpoint_step)
    shutil.copytree(run, to)
    return to


def test_resume_refuses_settings_that_change_the_result(six_steps, tmp_path, bad_input):
    """lr, label smoothing and the validation split differ: all three named, old → new, and nothing written."""
    run = _copy(six_steps, tmp_path / "run", checkpoint_step=3)
    before = _run_files(run)
    done = _train(run, "--steps", "6", *SCHEDULE, "--resume",
                  "--lr", "0.1", "--label-smoothing", "0.1", "--val-fraction", "0.5")
    assert done.returncode == 2, done.stderr[-2000:]
    message = bad_input("vitzoo finetune --resume", "--lr 0.1 --label-smoothing 0.1 --val-fraction 0.5 (started "
                        "with 0.001, 0.0, 0.2)", done.stderr.strip().splitlines()[-1])
    assert "label_smoothing 0.0 → 0.1, lr 0.001 → 0.1, val_fraction 0.2 → 0.5" in message
    assert _run_files(run) == before


def test_resume_refuses_a_length_that_trains_nothing(six_steps, tmp_path, bad_input):
    run = _copy(six_steps, tmp_path / "run")
    done = _train(run, "--steps", "5", *SCHEDULE, "--resume")
    assert done.returncode == 2, done.stderr[-2000:]
    message = bad_input("vitzoo finetune --resume", "--steps 5 (the checkpoint is at step 6)",
                        done.stderr.strip().splitlines()[-1])
    assert "is at step 6 already; --steps 5 would train nothing" in message


def test_resume_records_a_longer_run_in_the_history(six_steps, tmp_path):
    """A longer --steps and another --eval-every are accepted; run.json keeps the options the run started with
    and records the resume with what it changed."""
    run = _copy(six_steps, tmp_path / "run")
    started = json.loads((run / "run.json").read_text())
    done = _train(run, "--steps", "8", "--eval-every", "4", "--checkpoint-every", "3", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    changed = {"eval_every": [2, 4], "steps": [6, 8]}
    assert json.loads((run / "run.json").read_text()) == {**started, "history": [{"resumed_at": 6, "changed": changed}]}
    assert [r["step"] for r in _rows(run)] == [2, 4, 6, 8]
    rows = {r["step"]: r["val_acc"] for r in _rows(run)}
    best = max((6, 8), key=rows.__getitem__)  # the checkpoints with a row; on a tie, the earlier
    assert (run / "checkpoints" / "best").read_text() == f"step_{best:08d}"
    assert (run / "checkpoints" / f"step_{best:08d}" / "model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_metrics_after_a_kill_match_the_uninterrupted_run(six_steps, tmp_path):
    """A kill while the step-6 row is written leaves rows 2 and 4 and half of row 6, with the checkpoint at step
    3; the resumed run's metrics.jsonl is the uninterrupted run's, byte for byte: row 4 is not duplicated
    and its train_loss averages steps 3 and 4, as the uninterrupted run's did, not step 4 alone."""
    run = _copy(six_steps, tmp_path / "run", checkpoint_step=3)
    logged = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(logged[:logged.rindex("{") + 20])
    done = _train(run, "--steps", "6", *SCHEDULE, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "metrics.jsonl").read_text() == (six_steps / "metrics.jsonl").read_text()
    assert [r["step"] for r in _rows(run)] == [2, 4, 6]
    resumed, straight = (read_state_dict(latest_checkpoint(r / "checkpoints") / "model.safetensors")
                         for r in (run, six_steps))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
