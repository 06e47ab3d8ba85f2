"""Which settings make a run what it is, and which of them a resumed run may change.

A checkpoint records every setting of its run: the training options, the model spec, the number
of processes and the caller's own (the data, its split, the starting weights). ``--resume``
compares them with the new command line in one place, :func:`changes_on_resume`. A run resumed
with other values would not compute what it started to compute, so every difference is refused,
named old → new, except the few that only say where the run executes, what it logs and how long
it goes on; those are accepted and returned, so the run folder can record them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitzoo.migrate import flat_changes, spec_from_saved
from vitzoo.spec import nest

# Where and how the run executes and what it logs; the weights do not depend on them (across
# devices or strategies, up to the last bits of floating point).
ADJUSTABLE = frozenset({
    "device", "strategy", "num_workers", "grad_checkpointing", "data_root", "download",
    "eval_every", "checkpoint_every", "keep_checkpoints", "log",
})
# The run's length (``--steps``, or ``--epochs`` turned into steps): it may move, but beyond the
# checkpoint; the cosine schedule is recomputed for the new length from there on.
LENGTH = "steps"


def recorded_settings(state: dict[str, Any]) -> dict[str, Any]:
    """One flat dict of everything that defines a run, from a checkpoint's trainer state: the caller's
    ``run_settings``, the training options (``config``), ``spec.<field>`` and the number of processes. A
    spec written by vitzoo 0.1 is read as today's, so its run resumes."""
    spec = {f"spec.{k}": v for k, v in spec_from_saved(state["spec"]).to_dict().items()}
    return {**(state.get("run_settings") or {}), **state["config"], **spec, "processes": state["world_size"]}


def changes_on_resume(saved: dict[str, Any], current: dict[str, Any], step: int, where: str | Path) -> dict[str, list]:
    """The accepted changes as ``{name: [old, new]}``; raises ValueError naming every refused one.

    A setting only one side records (the checkpoint predates it, or the caller does not pass it) is
    not compared. ``step`` is the checkpoint's; the run must go on beyond it.
    """
    saved, current = _canonical(saved), _canonical(current)
    changed = {k: [saved[k], current[k]] for k in saved.keys() & current.keys() if saved[k] != current[k]}
    refused = sorted(k for k in changed if k not in ADJUSTABLE | {LENGTH})
    if refused:
        listed = ", ".join(f"{k} {changed[k][0]!r} → {changed[k][1]!r}" for k in refused)
        raise ValueError(
            f"{where} was written with other settings: {listed}. A resumed run must compute what it started to "
            f"compute: resume with the original values, or start a new run in another --out (--pretrained "
            f"<checkpoint folder> starts from its weights). A resume may change only {', '.join(sorted(ADJUSTABLE))} "
            f"and the length (--steps / --epochs)"
        )
    if current.get(LENGTH, step + 1) <= step:
        raise ValueError(f"{where} is at step {step} already; --steps {current[LENGTH]} would train nothing: "
                         f"pass --steps (or --epochs) beyond step {step} to train further")
    return {k: changed[k] for k in sorted(changed)}


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """Spec overrides in one spelling: ``{"attn.qk_norm": True}``, ``{"attn": {"qk_norm": True}}`` and vitzoo
    0.1's ``{"qk_norm": True}`` all become the second."""
    if not isinstance(settings.get("overrides"), dict):
        return settings
    return {**settings, "overrides": nest(flat_changes(settings["overrides"]))}
