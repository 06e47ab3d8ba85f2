"""timm's own model tests, run unchanged on vitzoo models: an outside check that vitzoo is timm's namesake.

``tests/upstream/timm_test_models.py`` is timm's ``tests/test_models.py`` byte for byte (see its README).
Its test functions run as written; only the module's ``create_model`` is vitzoo's. Each function keeps
the model names upstream parametrizes it with, restricted to the names vitzoo builds (tags included where
upstream lists tags), so a name timm leaves out of a test is left out here too.

Which names run is chosen by ``VITZOO_TIMM_SUITE``:

- unset: ``CI_NAMES``, the smallest name of each family (the set the default test run checks);
- ``all``: every name vitzoo shares with timm (many hours on CPU; ``make timm-suite`` runs it resumably
  and writes the table in docs/parity.md);
- comma-separated shell patterns (``vit_small*,eva02*``): the names matching any of them.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import huggingface_hub.constants
import pytest
import timm
import torch
from torch import nn

import vitzoo
from tests.conftest import hub_snapshot
from vitzoo.size import estimate_params
from vitzoo.weights import write_state_dict

UPSTREAM_FILE = Path(__file__).parent / "upstream" / "timm_test_models.py"

# The upstream functions this suite runs (timm's other tests need timm-only models, ``features_only``
# FX wrappers of non-ViTs, or network access).
UPSTREAM_TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_default_cfgs_non_std",
    "test_model_forward_intermediates",
    "test_model_forward_intermediates_features",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_torchscript",
)
PRETRAINED_TEST = "test_model_load_pretrained"

# One small name per family: plain ViT; timm's test ViTs (test_vit2: registers, GAP, layer scale;
# test_vit3: MAP pooling); DeiT distilled; CLIP; EVA-02 (RoPE, SwiGLU); ResNet hybrid stem; DINOv3 (dynamic
# image size, RoPE); DINOv2 (registers); Perception Encoder (attention pooling); relative-position ViT (MLP
# bias); ConViT (gated positional attention); MLP-Mixer and gMLP (token mixing). AIMv2 (smallest: 300M
# parameters) and other families whose smallest is ViT-S or larger (FlexiViT, ViTamin, ROPE-ViT, DeiT-III,
# SigLIP, BEiT, CaiT, XCiT, SAM, the VLM towers, ...) are left to the full run, so that this set stays near two
# minutes on two CPU cores.
CI_NAMES = (
    "vit_tiny_patch16_224",
    "test_vit",
    "test_vit2",
    "test_vit3",
    "deit_tiny_distilled_patch16_224",
    "vit_xsmall_patch16_clip_224",
    "eva02_tiny_patch14_224",
    "vit_tiny_r_s16_p8_224",
    "vit_tiny_patch16_dinov3_qkvb",
    "vit_small_patch14_reg4_dinov2",
    "vit_pe_core_tiny_patch16_384",
    "test_vit_relpos",
    "convit_tiny",
    "mixer_s32_224",
    "gmlp_ti16_224",
)

# Bytes of memory a case may need per parameter (weights, gradients or a loaded checkpoint, activations):
# a case that cannot fit fails with that reason instead of driving a shared machine out of memory.
BYTES_PER_PARAM = 12


def _load_upstream() -> ModuleType:
    """Import timm's test module under its own name. ``GITHUB_ACTIONS`` is hidden while it loads: upstream
    then defines every test (it drops ``test_model_load_pretrained`` on GitHub's runners) with its full
    name lists, so the parametrization does not depend on where this suite runs."""
    spec = importlib.util.spec_from_file_location("timm_test_models", UPSTREAM_FILE)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.pop("GITHUB_ACTIONS", None)
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ["GITHUB_ACTIONS"] = saved
    return module


upstream = _load_upstream()


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ``create_model`` as the upstream tests call it, answered by vitzoo: every keyword goes
    through unchanged, so one vitzoo does not take yet fails the test that passes it."""
    return vitzoo.create_model(model_name, pretrained=pretrained, **kwargs)


upstream.create_model = create_model


def _chosen(name: str) -> bool:
    choice = os.environ.get("VITZOO_TIMM_SUITE", "")
    if choice == "all":
        return True
    patterns = choice.split(",") if choice else CI_NAMES
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def upstream_cases(test: str) -> list[tuple[str, int]]:
    """(model name, batch size) pairs upstream parametrizes ``test`` with, kept where vitzoo has the name
    (``name.tag`` is kept when vitzoo has ``name``) and the name is chosen; the default (CI) choice keeps
    one tag per name, as the tags of a name differ only in their weights and preprocessing."""
    params = {m.args[0]: list(m.args[1]) for m in getattr(upstream, test).pytestmark if m.name == "parametrize"}
    ours = set(vitzoo.list_models())
    names = [n for n in params["model_name"] if n.partition(".")[0] in ours and _chosen(n.partition(".")[0])]
    if not os.environ.get("VITZOO_TIMM_SUITE"):
        first: dict[str, str] = {}
        for name in names:
            first.setdefault(name.partition(".")[0], name)
        names = list(first.values())
    return [(name, batch) for name in names for batch in params["batch_size"]]


@contextmanager
def on_upstream_device() -> Iterator[None]:
    """Upstream's ``TORCH_DEVICE`` as the default device of the test body. Upstream moves only some of its
    models and inputs there (its FX, intermediates and TorchScript tests build both on the CPU), so on a GPU
    every tensor and model a test makes is made there instead; a GPU's cached memory is handed back after each
    case, so parallel workers share the card."""
    device = torch.device(upstream.torch_device)
    try:
        with device:
            yield
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _fits_in_memory(model_name: str) -> None:
    """Fail with the sizes involved when a CPU case cannot fit in this machine's free memory (a GPU
    raises its own out-of-memory error instead of driving the machine out of memory)."""
    if torch.device(upstream.torch_device).type != "cpu":
        return
    params = estimate_params(vitzoo.model_spec(model_name.partition(".")[0]))
    need = params * BYTES_PER_PARAM
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        pytest.fail(f"{model_name}: about {need / 2**30:.0f} GiB needed ({params / 1e9:.1f}B parameters), "
                    f"{free / 2**30:.0f} GiB free; run this case on a machine with more memory")


@pytest.mark.parametrize(
    ("test", "model_name", "batch_size"),
    [pytest.param(test, name, batch, id=f"{test}-{name}") for test in UPSTREAM_TESTS
     for name, batch in upstream_cases(test)],
)
def test_upstream(test: str, model_name: str, batch_size: int) -> None:
    """timm's ``test`` as written, on a vitzoo model of timm's name."""
    _fits_in_memory(model_name)
    with on_upstream_device():
        getattr(upstream, test)(model_name=model_name, batch_size=batch_size)


@contextmanager
def offline_hub_cache(model_name: str) -> Iterator[None]:
    """An offline Hugging Face cache holding, at the hub path of ``model_name``'s weights, a safetensors
    file of timm's randomly initialised model of that name (or, for weights timm publishes at a plain URL,
    a pickle of it in torch.hub's checkpoint folder); deleted on exit (large models take GBs)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    with tempfile.TemporaryDirectory() as hf_home, pytest.MonkeyPatch.context() as patch:
        if cfg.hf_hub_id or cfg.url:  # without either, vitzoo has nothing to find either, and the test says so
            torch.manual_seed(0)
            state_dict = timm.create_model(model_name, pretrained=False).state_dict()
            if cfg.hf_hub_id:
                write_state_dict(state_dict, hub_snapshot(Path(hf_home), cfg.hf_hub_id) / "model.safetensors")
            else:
                checkpoints = Path(hf_home) / "hub" / "checkpoints"
                checkpoints.mkdir(parents=True)
                torch.save(state_dict, checkpoints / Path(urlparse(cfg.url).path).name)
            del state_dict
        patch.setenv("TORCH_HOME", hf_home)
        patch.setenv("HF_HOME", hf_home)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.mark.parametrize(
    ("model_name", "batch_size"),
    [pytest.param(name, batch, id=f"{PRETRAINED_TEST}-{name}") for name, batch in upstream_cases(PRETRAINED_TEST)],
)
def test_upstream_pretrained(model_name: str, batch_size: int) -> None:
    """timm's pretrained-loading test, the weights found where timm would find them (the hub cache)."""
    _fits_in_memory(model_name)
    with on_upstream_device(), offline_hub_cache(model_name):
        getattr(upstream, PRETRAINED_TEST)(model_name=model_name, batch_size=batch_size)
