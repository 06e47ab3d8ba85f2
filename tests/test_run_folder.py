"""A run folder belongs to one run: reuse refused or moved aside, one process at a time, damaged
checkpoints skipped; and training inputs refused with one line before anything runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitzoo
from tests.conftest import process_env
from vitzoo.ablate import main as ablate_main
from vitzoo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vitzoo.train.finetune import main as finetune_main
from vitzoo.train.runfolder import RunFolderError, claim_run_folder
from vitzoo.weights import WeightsError

TINY = ["vit_pico_patch4_32", "--set", "depth=1", "--set", "embed_dim=32", "--img-size", "16", "--batch-size", "32"]
ABLATION = dict(overrides={"depth": 1, "embed_dim": 32}, steps=2, batch_size=32, progress=False)


def _finetune(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A real ``python -m vitzoo.train`` process on digits (4 steps, a checkpoint every 2 unless told)."""
    command = [sys.executable, "-m", "vitzoo.train", *TINY, "--steps", "4", "--eval-every", "2", "--out", str(out),
               *extra]
    return subprocess.run(command, env=process_env(), capture_output=True, text=True, timeout=120)


def _files(folder: Path) -> dict[Path, bytes]:
    """Every file of a run (the lock, which holds whoever last held the folder, aside) and its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def _error_line(stderr: str) -> str:
    """The command's message: its last stderr line from the program name on (a progress bar left open by
    the failure may precede it), checked to be the only thing it said besides progress and logs."""
    assert "Traceback" not in stderr, stderr
    return re.search(r"(python -m )?vitzoo[ .]\w+: .*", stderr.strip().splitlines()[-1]).group(0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished 4-step run (checkpoints at steps 2 and 4) that each test copies before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = _finetune(out)
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run[0], tmp_path / "run"))


def test_the_summary_line_goes_to_stdout_and_progress_to_stderr(finished_run):
    _, done = finished_run
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 4
    assert "step 4" in done.stderr and "weights_digest" not in done.stderr


def test_a_new_run_refuses_a_folder_holding_another_run_and_overwrite_moves_it_aside(run_copy, bad_input):
    before = _files(run_copy)
    refused = _finetune(run_copy, "--steps", "2")
    assert refused.returncode == 2
    message = bad_input("vitzoo finetune", "--out <a folder holding another run>", _error_line(refused.stderr))
    assert "holds another run (run.json, metrics.jsonl, summary.json, checkpoints)" in message
    assert all(hint in message for hint in ("--resume", "a new --out", "--overwrite"))
    assert _files(run_copy) == before

    done = _finetune(run_copy, "--steps", "2", "--overwrite")
    assert done.returncode == 0, done.stderr
    (old,) = run_copy.parent.glob("run.old-*")
    assert f"moved the run that was in {run_copy} to {old}" in done.stderr
    assert _files(old) == before  # all of it, intact
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["best", "latest", "step_00000002"]
    assert [json.loads(row)["step"] for row in (run_copy / "metrics.jsonl").read_text().splitlines()] == [2]


def test_a_second_process_on_a_held_folder_stops_at_once_naming_the_holder(tmp_path, bad_input):
    out = tmp_path / "run"
    with claim_run_folder(out, lambda folder: None):
        refused = _finetune(out)
    assert refused.returncode == 2
    message = bad_input("vitzoo finetune", "--out <a folder another process is training in>",
                        _error_line(refused.stderr))
    assert f"is in use by process {os.getpid()}" in message and "pass another --out" in message
    assert [p.name for p in out.iterdir()] == [".lock"]  # refused before writing anything
    with claim_run_folder(out, lambda folder: None):  # released: the lock file left behind does not block
        pass


def test_an_unreadable_newest_checkpoint_gives_way_to_the_previous_one(run_copy):
    weights = run_copy / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as a disk error or a copy gone wrong leaves it
    (run_copy / "checkpoints" / ".tmp-step_00000006-4242").mkdir()  # a write killed half-way
    (run_copy / "checkpoints" / ".latest.x1y2.tmp").write_text("step_00000006")
    done = _finetune(run_copy, "--steps", "6", "--resume")
    assert done.returncode == 0, done.stderr
    assert "cannot read step_00000004 (model.safetensors: SafetensorError" in done.stderr
    assert "resuming from step_00000002 instead" in done.stderr
    left = {p.name for p in (run_copy / "checkpoints").iterdir()}
    assert {"best", "latest", "step_00000004", "step_00000006"} <= left  # and the best one, whichever it is
    assert not [name for name in left if name.startswith(".")]  # the killed writes' leftovers are gone
    assert load_checkpoint(latest_checkpoint(run_copy / "checkpoints"))[1]["step"] == 6


def test_latest_names_a_readable_checkpoint_inside_the_run_folder(tmp_path, bad_input):
    folder, outside = tmp_path / "checkpoints", tmp_path / "elsewhere"
    for step in (1, 2):
        save_checkpoint(folder, step, {"w": torch.ones(2)}, {"step": step})
    save_checkpoint(outside, 9, {"w": torch.ones(2)}, {"step": 9})
    (folder / "step_00000009").symlink_to(outside / "step_00000009")
    for name in ("../elsewhere/step_00000009", str(outside / "step_00000009"), "step_00000009"):
        (folder / "latest").write_text(name)
        with pytest.raises(WeightsError, match="which is not a checkpoint folder of") as err:
            latest_checkpoint(folder)
        bad_input("vitzoo finetune --resume", f"checkpoints/latest naming {name.replace(str(tmp_path), '<tmp>')}",
                  str(err.value))
    (folder / "latest").write_text("step_00000002")
    (folder / "step_00000002" / "trainer.pt").write_bytes(b"\x80\x04garbage")
    assert latest_checkpoint(folder).name == "step_00000001"
    with pytest.raises(WeightsError, match=r"trainer.pt cannot be read \(UnpicklingError"):
        load_checkpoint(folder / "step_00000002")
    (folder / "step_00000001" / "trainer.pt").unlink()
    with pytest.raises(WeightsError, match="no checkpoint in .* can be read: step_00000002 .*step_00000001") as err:
        latest_checkpoint(folder)
    bad_input("vitzoo finetune --resume", "every checkpoint damaged", str(err.value))


FINETUNE_OPTIONS = [
    ("--batch-size", "0"), ("--accum-steps", "0"), ("--steps", "0"), ("--steps", "-5"), ("--warmup-steps", "-1"),
    ("--epochs", "0"), ("--lr", "nan"), ("--eval-every", "0"), ("--checkpoint-every", "0"), ("--workers", "-1"),
    ("--weight-decay", "-0.1"), ("--img-size", "0"), ("--device", "gpu"),
] + ([] if torch.cuda.is_available() else [("--device", "cuda")])


@pytest.mark.parametrize(("option", "value"), FINETUNE_OPTIONS)
def test_training_numbers_out_of_range_stop_the_command_line_parser(option, value, tmp_path, capsys, bad_input):
    with pytest.raises(SystemExit) as stopped:  # a missing --data: the command fails fast if parsing lets it by
        finetune_main(["vit_pico_patch4_32", "--data", str(tmp_path / "missing"), option, value])
    assert stopped.value.code == 2
    message = bad_input("vitzoo finetune", f"{option} {value}", _error_line(capsys.readouterr().err))
    assert f"argument {option}: " in message


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--seeds", "0"], ["--batch-size", "-1"], ["--lr", "0"]])
def test_ablation_numbers_out_of_range_stop_the_command_line_parser(argv, tmp_path, capsys, bad_input):
    with pytest.raises(SystemExit):
        ablate_main(["--model", "vit_pico_patch4_32", "--data", str(tmp_path / "missing"), *argv])
    bad_input("vitzoo ablate", " ".join(argv), _error_line(capsys.readouterr().err))


def _images(root: Path, classes: str, bad: tuple[str, ...] = ()) -> Path:
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12, 12), (40 * i, 100, 0)).save(root / label / f"{i}.png")
    for name in bad:
        (root / name).write_bytes(b"")
    return root


def test_data_and_folder_problems_are_one_line_errors(tmp_path, capsys, bad_input):
    """Each refused at once with one line on stderr and exit code 2: nothing trains, nothing is written."""
    out, file = tmp_path / "out", tmp_path / "a_file"
    file.write_text("")
    folders = _images(tmp_path / "bad", "ab", bad=("a/1.png", "b/2.png"))
    cases = [
        ("--data <ImageFolder with one class>", ["--data", str(_images(tmp_path / "one", "a")), "--steps", "2"],
         "has only one class, so there is nothing to learn"),
        ("--check-images on an ImageFolder with 2 bad files", ["--data", str(folders), "--check-images"],
         f"2 of 12 images in {folders} cannot be read: {folders}/a/1.png, {folders}/b/2.png; delete or replace"),
        ("--check-images --data digits", ["--check-images"], "--check-images checks the files of an ImageFolder"),
        ("--data torchvision:CIFAR10 (not downloaded)", ["--data", "torchvision:CIFAR10", "--data-root", str(out)],
         "torchvision dataset CIFAR10 is not in"),
        ("--out <a file>", ["--out", str(file)], "is a file; pass a folder"),
        ("--out <a path under a file>", ["--out", str(file / "run")], "cannot write to the run folder"),
    ]
    for given, argv, expected in cases:
        assert finetune_main([*TINY, "--out", str(out), *argv]) == 2
        message = bad_input("vitzoo finetune", given, _error_line(capsys.readouterr().err))
        assert expected in message and "Caught" not in message
    assert not out.exists()  # a failed start leaves no folder behind


def test_an_unreadable_image_met_in_a_loader_worker_is_named_in_one_line(tmp_path, capsys, bad_input):
    folders = _images(tmp_path / "bad", "ab", bad=("b/2.png",))
    argv = ["--data", str(folders), "--val-fraction", "0.34", "--batch-size", "4", "--workers", "1", "--steps", "3"]
    assert finetune_main([*TINY, *argv, "--out", str(tmp_path / "out")]) == 2
    message = bad_input("vitzoo finetune", "--data <ImageFolder with an empty .png> --workers 1",
                        _error_line(capsys.readouterr().err))
    assert message.startswith(f"python -m vitzoo.train: cannot read image {folders}/b/2.png (")


def test_an_ablation_folder_resumes_its_own_grid_and_refuses_another(tmp_path, bad_input):
    grid, out = {"mlp": ["gelu"]}, tmp_path / "ablation"
    assert vitzoo.ablate("vit_pico_patch4_32", grid, out, **ABLATION).executed == ["mlp-gelu__seed0"]
    assert vitzoo.ablate("vit_pico_patch4_32", grid, out, **ABLATION).executed == []  # the same grid resumes
    with pytest.raises(RunFolderError, match=r"an ablation written with other settings \(lr\)") as err:
        vitzoo.ablate("vit_pico_patch4_32", grid, out, **{**ABLATION, "lr": 0.01})
    bad_input("vitzoo ablate", "--out <a folder holding an ablation of other settings>", str(err.value))
    with claim_run_folder(out, lambda folder: None), pytest.raises(RunFolderError, match="in use by process"):
        vitzoo.ablate("vit_pico_patch4_32", grid, out, **ABLATION)
    again = vitzoo.ablate("vit_pico_patch4_32", grid, out, overwrite=True, **{**ABLATION, "lr": 0.01})
    assert again.executed == ["mlp-gelu__seed0"] and len(list(tmp_path.glob("ablation.old-*/runs/*.json"))) == 1
    (out / "checkpoints").mkdir()
    with pytest.raises(RunFolderError, match=r"holds a fine-tuning run \(checkpoints\)"):
        vitzoo.ablate("vit_pico_patch4_32", grid, out, **ABLATION)
