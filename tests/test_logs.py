"""--log tensorboard,wandb: the scalars of metrics.jsonl at its steps, the options once, coherent after a resume.

wandb runs offline into a temporary WANDB_DIR (no login, no network); its run file is read back record by record.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import killed_copy
from tests.test_data_sources import tiny_images, train_config, write_shards
from vitzoo.train.finetune import finetune

LOGS = ("tensorboard", "wandb")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag as (step, value) pairs, read as TensorBoard reads the folder (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_logged(table: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard stores it: one tag per column, values as float32."""
    return {key: [(row["step"], float(np.float32(row[key]))) for row in table] for key in table[0] if key != "step"}


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB's log format: 32 KiB blocks of checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, found, pending = run_file.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # the padding at the end of a block
            pos += room
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def wandb_run(wandb_dir: Path, run_id: str) -> tuple[dict, list[dict]]:
    """The config and the history rows of the offline runs with ``run_id`` (a resume adds a run folder)."""
    config, history = {}, []
    for run_file in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history.append({k: v for k, v in row.items() if not k.startswith("_")})
    return config, history


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("data") / "shards", *tiny_images())


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-files").mkdir()
    return tmp_path / "wandb-files"


def test_logs_hold_the_metrics_and_continue_after_a_kill(shards, tmp_path, offline):
    """TensorBoard and wandb get metrics.jsonl's scalars at its steps and the run's options; killed after the
    step-2 checkpoint (the step-4 row already sent) and resumed, TensorBoard shows the uninterrupted run's rows
    and wandb continues the same run, by the id in the run folder, from step 4 on."""
    straight = tmp_path / "straight"
    finetune(train_config(straight, shards, log=LOGS), progress=False)
    assert [r["step"] for r in rows(straight)] == [2, 4]
    assert tensorboard_scalars(straight) == as_logged(rows(straight))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard")).Reload()
    assert "options/text_summary" in events.Tags()["tensors"]
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    started = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(started).session_start_info.hparams
    assert hparams["train.lr"].number_value == 1e-3 and hparams["data"].string_value == shards
    run_id = json.loads((straight / "wandb-run.json").read_text())["id"]
    config, history = wandb_run(offline, run_id)
    assert config["data"] == shards and config["train"]["steps"] == 4 and config["log"] == list(LOGS)
    assert history == rows(straight)

    run = killed_copy(straight, tmp_path / "killed", step=2, half_written_row=True)
    finetune(train_config(run, shards, resume=True, log=LOGS), progress=False)
    assert rows(run) == rows(straight)
    assert tensorboard_scalars(run) == as_logged(rows(straight))  # the killed run's step-4 row is purged
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    _, history = wandb_run(offline, run_id)
    assert [r["step"] for r in history] == [2, 4, 4]  # the killed run's step 4, then the resumed run's
    assert history[-1] == rows(straight)[-1]


def test_a_missing_package_is_named_with_its_pip_install(shards, tmp_path, monkeypatch, bad_input):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"--log tensorboard,wandb needs wandb: pip install wandb") as refused:
        finetune(train_config(tmp_path / "run", shards, log=LOGS), progress=False)
    bad_input("vitzoo finetune --log", "wandb (not installed)", str(refused.value))
    assert not (tmp_path / "run").exists()  # refused before anything was written
