"""Shared helpers: timm twins of vitzoo models with identical weights, timm weight files, hub caches."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import timm
import torch

import vitzoo
from vitzoo.weights import write_state_dict

# Every test runs offline against whatever hub cache a test sets up, never the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The cores are shared by pytest-xdist's workers (`make test` runs one per core): one intra-op thread per core each.
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

# The models of the core issue; each is compared with timm's model of the same name.
CORE_MODELS = [
    "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch16_224", "vit_small_patch32_224",
    "vit_small_patch8_224", "vit_base_patch16_224", "vit_base_patch32_224", "vit_base_patch8_224",
    "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch32_384", "vit_huge_patch14_224",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit_base_distilled_patch16_384", "deit3_small_patch16_224",
    "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224",
    "vit_base_patch16_clip_224", "vit_medium_patch16_gap_256", "vit_betwixt_patch16_reg4_gap_256",
]


def parity_depth(name: str) -> int | None:
    """Depth for numeric comparisons: full depth up to ViT-B, 2 blocks for ViT-L/H so the suite
    stays fast on two CPU cores (their structure is still checked at full size)."""
    return None if vitzoo.model_spec(name).embed_dim <= 768 else 2


def timm_twin(name: str, **overrides) -> tuple[torch.nn.Module, vitzoo.VisionTransformer]:
    """timm's model (random init, eval mode) and the vitzoo model carrying the same weights."""
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **overrides).eval()
    model = vitzoo.create_model(name, **overrides).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


def meta_twins(name: str, *timm_modules: ModuleType) -> tuple[torch.nn.Module, vitzoo.VisionTransformer]:
    """timm's model ``name`` and vitzoo's at full size on the ``meta`` device with weight init skipped (most of a
    meta build's time, where only keys and shapes count); ``timm_modules`` are those whose ``trunc_normal_`` runs."""
    def skip(*args, **kwargs) -> None:
        return None

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device("meta"))
        for cls in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv2d):
            stack.enter_context(mock.patch.object(cls, "reset_parameters", skip))
        for module in timm_modules:
            stack.enter_context(mock.patch.object(module, "trunc_normal_", skip))
        stack.enter_context(mock.patch.object(vitzoo.VisionTransformer, "_init_linear", staticmethod(skip)))
        return timm.create_model(name, pretrained=False), vitzoo.create_model(name)


def entry_changes(slot: str, name: str) -> dict:
    """The spec changes that put entry ``name`` of ``slot`` into a small model, with what the
    entry needs beside it (a readout without the class token, the attention a fused block takes apart, ...)."""
    changes: dict = {slot: name}
    if slot == "pool" and name != "token":
        changes["class_token"] = False
    if name == "diff_parallel_scaling":  # takes the differential attention apart
        changes["attn"] = "diff"
    if name == "windowed" or (slot == "features" and name != "tokens"):  # the patch grid alone, mean-pooled
        changes.update(class_token=False, pool="avg")
    if name == "gqa":  # two query heads per key/value head
        changes["attn"] = {"name": "gqa", "kv_heads": 2}
    if (slot, name) in (("attn", "none"), ("block", "gmlp")):  # gMLP: its MLP mixes tokens, no attention branch
        changes.update(attn="none", block="gmlp", mlp="spatial_gating")
    if name == "gpsa":  # over the patch grid alone (ConViT's class token joins after these blocks)
        changes.update(class_token=False, pool="avg")
    if name == "cell_mean":  # the 4 x 4 grid in 2 x 2 cells: one output per cell
        changes["pool"] = {"name": name, "cell": 2}
    if name == "eva_attn_scale":  # LayerScale on the attention branch only
        changes["block"] = {"name": name, "layer_scale": 0.1}
    return changes


@pytest.fixture
def images():
    def make(model: vitzoo.VisionTransformer, batch: int = 2) -> torch.Tensor:
        torch.manual_seed(1)
        return torch.randn(batch, *model.pretrained_cfg["input_size"])

    return make


@pytest.fixture
def new_models_removed():
    """Unregister every model a test adds (``register_model``, ``load_registry_file``, ``--registry``), so
    names a test registers do not leak into ``list_models`` for the tests after it."""
    before = set(vitzoo.list_models())
    yield
    for name in set(vitzoo.list_models()) - before:
        vitzoo.unregister_model(name)


WEIGHTS_NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    """A timm-format safetensors file of a randomly initialised timm ``WEIGHTS_NAME``."""
    torch.manual_seed(0)
    reference = timm.create_model(WEIGHTS_NAME, pretrained=False)
    return write_state_dict(reference.state_dict(), tmp_path_factory.mktemp("w") / "model.safetensors")


def hub_snapshot(hf_home: Path, repo_id: str) -> Path:
    """The folder where huggingface_hub's cache under ``hf_home`` keeps ``repo_id``'s files (created empty)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def fill_hub_cache(hf_home: Path, repo_id: str, weights: Path) -> None:
    """Lay out ``weights`` the way huggingface_hub caches ``repo_id``'s model.safetensors."""
    (hub_snapshot(hf_home, repo_id) / "model.safetensors").write_bytes(weights.read_bytes())


# Inputs that must be refused and the message each got, collected by the ``bad_input`` fixture over
# the whole run; ``make errors-doc`` writes them to docs/errors.md, so the table is what the tests saw.
BAD_INPUTS: list[tuple[str, str, str]] = []
_TMP_PATH = re.compile(r"/tmp/pytest-of-[^/]+/pytest-[^/]+/[^/\s'\"]+")
_PID = re.compile(r"process \d+")


@pytest.fixture
def bad_input():
    """``bad_input(area, given, message)``: record a refused input and its message for docs/errors.md.

    ``message`` is what the user saw (an exception's text or a command's stderr); temporary paths are
    shown as ``<tmp>`` and process ids as ``<pid>``, so the table changes only when a message does.
    Returns the message, so a test can go on checking it.
    """
    def record(area: str, given: str, message: str) -> str:
        BAD_INPUTS.append((area, given, _PID.sub("process <pid>", _TMP_PATH.sub("<tmp>", message.strip()))))
        return message

    return record


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("VITZOO_ERRORS_DOC")
    if not path or not BAD_INPUTS:
        return
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = [
        "# Bad input and what vitzoo says",
        "",
        "Every row is an input that vitzoo refuses and the message the test suite saw for it",
        "(generated by `make errors-doc`; temporary paths are shown as `<tmp>`, process ids as `<pid>`).",
        "",
        "| where | input | message |",
        "|---|---|---|",
    ]
    lines += [f"| {cell(a)} | {cell(g)} | {cell(m)} |" for a, g, m in sorted(set(BAD_INPUTS))]
    Path(path).write_text("\n".join(lines) + "\n")


def process_env() -> dict[str, str]:
    """The environment of a child process a test starts (torchrun, ``python -m vitzoo.train``): one thread, and
    this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def killed_copy(run: Path, to: Path, step: int, outputs: tuple[str, ...] = (), half_written_row: bool = False) -> Path:
    """A copy of the run folder ``run`` as a kill just after its step-``step`` checkpoint leaves it: later checkpoints
    gone, no summary.json nor the end-of-run ``outputs`` (files or folders), and with ``half_written_row`` the last
    row of metrics.jsonl cut in the middle, as a kill while it was written leaves it."""
    import shutil

    shutil.copytree(run, to)
    for later in (to / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (to / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    for output in ("summary.json", *outputs):
        shutil.rmtree(to / output) if (to / output).is_dir() else (to / output).unlink()
    if half_written_row:
        logged = (to / "metrics.jsonl").read_text()
        (to / "metrics.jsonl").write_text(logged[: logged.rindex("{") + 20])
    return to
