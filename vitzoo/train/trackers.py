"""``--log tensorboard,wandb``: the metrics rows of a run also sent to TensorBoard and Weights & Biases.

Beside ``metrics.jsonl`` (always written), each tracker gets the same scalars at the same steps, and the run's
options (``run.json``) once: TensorBoard as hparams and as text, wandb as the run's config. A resumed run goes on
where its checkpoint is. TensorBoard: a new event file whose start purges the steps after the checkpoint that a
killed run had logged, so the curves are those of the uninterrupted run. wandb: the same run, by the id kept in
``<out>/wandb-run.json``, with ``step`` as the x axis of every chart (rows after the checkpoint that a killed run
had sent stay in wandb's history; the resumed run sends its own after them). A tracker added on a resume starts
with the rows the checkpoint holds. wandb logs in without a prompt only where it is set up; ``WANDB_MODE=offline``
keeps the run on disk (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol

from vitzoo.weights.files import write_text_atomic

Tracker = Literal["tensorboard", "wandb"]
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_ID = "wandb-run.json"


class Log(Protocol):
    def row(self, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: tuple[str, ...]) -> None:
    """Refuse a tracker whose package is missing, before any work is done, naming the pip install."""
    missing = [PACKAGES[name] for name in names if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ImportError(f"--log {','.join(names)} needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                          f"(or pip install 'vitzoo[logs]')")


def flat(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as one level (``train.lr``), each value a bool, number or string (what hparams accept)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, bool | int | float | str) else json.dumps(value)
    return out


class TensorBoardLog:
    """Scalars in ``<out>/tensorboard``; ``resume_step``: the checkpoint's, whose later steps are purged."""

    def __init__(self, folder: Path, options: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        logdir = folder / "tensorboard"
        self.fresh = not logdir.is_dir()
        self.writer = SummaryWriter(str(logdir), purge_step=None if resume_step is None else resume_step + 1)
        if self.fresh:
            for summary in hparams(flat(options), {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("options", "```\n" + json.dumps(options, indent=2) + "\n```", 0)

    def row(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key != "step" and value is not None:
                self.writer.add_scalar(key, value, values["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """One wandb run per run folder, its id in ``<out>/wandb-run.json``; files under ``WANDB_DIR`` or ``<out>``."""

    def __init__(self, folder: Path, options: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        saved = folder / WANDB_ID
        self.fresh = resume_step is None or not saved.is_file()
        run_id = uuid.uuid4().hex[:12] if self.fresh else json.loads(saved.read_text())["id"]
        if self.fresh:
            write_text_atomic(saved, json.dumps({"id": run_id}) + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vitzoo"), name=folder.resolve().name,
                              id=run_id, resume="allow", dir=os.environ.get("WANDB_DIR") or str(folder),
                              config=options if self.fresh else None)
        self.run.define_metric("*", step_metric="step")

    def row(self, values: dict[str, float]) -> None:
        self.run.log(values)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: tuple[str, ...], folder: Path, options: dict[str, Any], resume_step: int | None = None,
                  rows: list[dict[str, float]] = ()) -> list[Log]:
    """The trackers ``names`` for the run in ``folder``: a new run (``resume_step`` None) or one resumed from that
    step; a tracker the run did not have before gets the ``rows`` so far."""
    check_trackers(names)
    kinds = {"tensorboard": TensorBoardLog, "wandb": WandbLog}
    logs = [kinds[name](folder, options, resume_step) for name in dict.fromkeys(names)]
    for log in logs:
        if log.fresh:
            for row in rows:
                log.row(row)
    return logs
