"""Ablations: every block swapped at creation trains, per-layer choices, custom blocks by name (code,
TOML, CLI) with contract checks, partial loading into swapped models, and the grid runner."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import vitzoo
from tests.conftest import entry_changes
from vitzoo import registry
from vitzoo.ablate import main, parse_grid
from vitzoo.blocks import SLOTS, BlockContractError, register_block, slot_table
from vitzoo.train import TrainConfig, fit
from vitzoo.weights import write_state_dict

TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
# Hybrid CNN stems need patch_size = their reduction (up to 32) and are covered by test_blocks;
# pool "none" and "cell_mean" return tokens (features-only readouts) and cannot feed a classifier.
SKIP = {("patch_embed", n) for n in SLOTS["patch_embed"] if n.startswith("hybrid")} | {("pool", "none"),
                                                                                      ("pool", "cell_mean")}
CASES = [(slot, name) for slot, table in SLOTS.items() for name in table if (slot, name) not in SKIP]


@pytest.fixture
def tiny_model(new_models_removed):
    """A 2-block, 16-dim registry entry on 16x16 images, removed again after the test."""
    registry.register_model("test_ablate_tiny", TINY)
    return "test_ablate_tiny"


@pytest.fixture
def custom_mlp():
    """A user MLP registered by decorator as ``test_sq_mlp`` (squared ReLU, Primer)."""

    @vitzoo.register_block("mlp", "test_sq_mlp")
    class SquaredReluMlp(nn.Module):
        def __init__(self, dim: int, hidden_dim: int, norm: Callable, drop: float) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x).relu().square())

    yield SquaredReluMlp
    slot_table("mlp").unregister("test_sq_mlp")


def _overfit_losses(model: nn.Module, steps: int = 5) -> list[float]:
    """Losses of a few AdamW steps on one fixed batch: a working block must let the loss fall."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, *model.spec.img_size), torch.arange(16) % 4)
    config = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=0, weight_decay=0.0, grad_clip=None)
    return fit(model, data, None, config, progress=False).losses


@pytest.mark.parametrize(("slot", "name"), CASES, ids=[f"{s}={n}" for s, n in CASES])
def test_every_slot_entry_swapped_at_creation_trains(tiny_model, slot, name):
    torch.manual_seed(0)
    model = vitzoo.create_model(tiny_model, num_classes=4, **entry_changes(slot, name))
    assert getattr(model.spec, slot).name in (name, (name,) * model.spec.depth)
    losses = _overfit_losses(model)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_per_layer_choices_build_each_layer_and_train(tiny_model):
    model = vitzoo.create_model(tiny_model, num_classes=4, mlp=["gelu", "swiglu"], block=("prenorm", "parallel"))
    assert model.spec.mlp.name == ("gelu", "swiglu")
    assert [type(b).__name__ for b in model.blocks] == ["PreNormBlock", "ParallelBlock"]
    assert hasattr(model.blocks[0].mlp, "fc1") and hasattr(model.blocks[1].mlp, "fc1_g")
    losses = _overfit_losses(model)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="has 3 per-layer values but depth=2"):
        vitzoo.create_model(tiny_model, mlp=["gelu"] * 3)


def test_issue_overrides_and_aliases_at_create_model(tiny_model):
    model = vitzoo.create_model(tiny_model, num_classes=4, mlp="swiglu", norm="rmsnorm", pool="gap",
                                pos_embed="sincos2d", attn={"qk_norm": True}, reg_tokens=4, block={"layer_scale": 1e-5})
    spec = model.spec
    assert spec.pool.name == "avg" and spec.class_token and spec.final_norm_at == "pooled"  # GAP next to a class token
    assert model.reg_token.shape == (1, 4, 16) and model.pos_embed is None
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert vitzoo.ViTSpec(**TINY, pos_embed="sincos").pos_embed.name == "sincos2d"
    with pytest.raises(ValueError, match="unknown block 'gapp'; closest: gap"):
        vitzoo.create_model(tiny_model, pool="gapp")


def test_pretrained_weights_load_into_a_swapped_model_with_report(tiny_model, tmp_path, caplog):
    base = vitzoo.create_model(tiny_model, num_classes=4)
    path = write_state_dict(base.state_dict(), tmp_path / "base.safetensors")
    with caplog.at_level(logging.INFO, logger="vitzoo"):
        model = vitzoo.create_model(tiny_model, pretrained=str(path), num_classes=4, mlp="swiglu", reg_tokens=2)
    assert torch.equal(model.patch_embed.proj.weight, base.patch_embed.proj.weight)
    assert torch.equal(model.blocks[1].attn.qkv.weight, base.blocks[1].attn.qkv.weight)
    log = caplog.text
    assert "blocks.0.mlp.fc1_g.weight: new (32, 16)" in log and "reg_token: new" in log
    assert "blocks.0.mlp.fc1.weight: dropped (32, 16)" in log and "pos_embed: resampled" not in log


def test_custom_block_by_call_and_from_a_toml_registry_file(tiny_model, custom_mlp, tmp_path):
    register_block("norm", "test_scale_norm", lambda dim: nn.LayerNorm(dim, bias=False))
    toml = tmp_path / "mine.toml"
    toml.write_text('[family]\nname = "mine"\npaper = "mine"\n\n[models.test_toml_sq]\nvariant = "test64/4"\n'
                    'img_size = 16\ndepth = 2\nmlp = "test_sq_mlp"\nnorm = "test_scale_norm"\nnotes = "user"\n')
    try:
        assert registry.load_registry_file(toml) == ["test_toml_sq"]
        model = vitzoo.create_model("test_toml_sq", num_classes=3)
        assert isinstance(model.blocks[1].mlp, custom_mlp) and model.blocks[0].norm1.bias is None
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
        with pytest.raises(ValueError, match="already exist"):
            registry.load_registry_file(toml)
    finally:
        slot_table("norm").unregister("test_scale_norm")


@pytest.mark.parametrize(("block", "message"), [
    ("bad_signature", r"mlp block 'test_bad_signature' does not follow the 'mlp' slot contract: its constructor "
                      r"cannot take \(16, 32, build\('layernorm', options=NormOptions\), 0.0\).*"
                      r"Contract: factory\(dim, hidden_dim, norm, drop, \*, options\)"),
    ("bad_shape", r"mlp block 'test_bad_shape' .*its forward returned \(2, 5, 32\), expected shape \(2, 5, 16\)"),
])
def test_block_contract_violations_name_slot_block_and_contract(tiny_model, block, message):
    class BadSignature(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()

    class BadShape(nn.Module):
        def __init__(self, dim: int, hidden_dim: int, norm: Callable, drop: float) -> None:
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc1(x)  # forgot fc2: (b, n, hidden_dim) instead of (b, n, dim)

    register_block("mlp", f"test_{block}", {"bad_signature": BadSignature, "bad_shape": BadShape}[block])
    try:
        with pytest.raises(BlockContractError, match=message):
            vitzoo.create_model(tiny_model, mlp=f"test_{block}")
    finally:
        slot_table("mlp").unregister(f"test_{block}")


def test_parse_grid_values_and_per_layer_choices():
    assert parse_grid("mlp=gelu,gelu+swiglu") == ("mlp", ["gelu", ("gelu", "swiglu")])
    assert parse_grid("attn.qk_norm=false,true") == ("attn.qk_norm", [False, True])
    assert parse_grid("attn.qk_norm=no,on") == ("attn.qk_norm", [False, True])
    assert parse_grid("attn.kv_heads=1,2+4") == ("attn.kv_heads", [1, (2, 4)])
    # the words of a bool and of None are read as such only for a field that takes them
    assert parse_grid("pool=token,none") == ("pool", ["token", "none"])
    assert parse_grid("mlp=yes") == ("mlp", ["yes"])
    with pytest.raises(ValueError, match="expected --grid FIELD=VALUE,VALUE"):
        parse_grid("mlp")


def test_grid_writes_tables_and_plots_and_resumes(tiny_model, tmp_path):
    grid = {"mlp": ["gelu", "swiglu"], "norm": ["layernorm", "rmsnorm"]}
    result = vitzoo.ablate(tiny_model, grid, tmp_path, seeds=1, steps=3, batch_size=32, progress=False)
    assert len(result.executed) == 4
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mlp"], r["norm"]) for r in rows][:2] == [("gelu", "layernorm"), ("gelu", "rmsnorm")]
    assert all(float(r["params"]) > 0 and float(r["gflops"]) > 0 and 0 <= float(r["val_acc"]) <= 1 for r in rows)
    # measured: more than weights, gradients and AdamW's two moments (4 x the fp32 weights)
    assert all(float(r["peak_mem_mb"]) * 2**20 > 16 * float(r["params"]) for r in rows)
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4
    summary = (tmp_path / "summary.md").read_text()
    assert "| mlp=swiglu norm=rmsnorm |" in summary and "val acc (%)" in summary
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000 and (tmp_path / "acc_vs_params.png").is_file()

    first = json.loads((tmp_path / "runs" / "mlp-swiglu_norm-layernorm__seed0.json").read_text())
    (tmp_path / "runs" / "mlp-swiglu_norm-layernorm__seed0.json").unlink()
    again = vitzoo.ablate(tiny_model, grid, tmp_path, seeds=2, steps=3, batch_size=32, progress=False)
    assert again.executed == ["mlp-swiglu_norm-layernorm__seed0"] + [
        f"mlp-{m}_norm-{n}__seed1" for m in grid["mlp"] for n in grid["norm"]]
    redone = json.loads((tmp_path / "runs" / "mlp-swiglu_norm-layernorm__seed0.json").read_text())
    assert redone["losses"] == first["losses"]  # identical conditions: a rerun reproduces the curve
    assert "±" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match=r"written with other settings \(steps\)"):
        vitzoo.ablate(tiny_model, grid, tmp_path, seeds=1, steps=4, batch_size=32, progress=False)


def test_cli_uses_a_plugin_block_by_name_in_grid_and_registry(tmp_path, capsys, new_models_removed):
    plugin = tmp_path / "my_blocks.py"
    plugin.write_text(
        "import torch\nfrom torch import nn\nimport vitzoo\n\n\n"
        "@vitzoo.register_block('mlp', 'test_plugin_mlp')\n"
        "class HalfMlp(nn.Module):\n"
        "    def __init__(self, dim, hidden_dim, norm, drop):\n"
        "        super().__init__()\n"
        "        self.fc1, self.fc2 = nn.Linear(dim, hidden_dim // 2), nn.Linear(hidden_dim // 2, dim)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc2(torch.relu(self.fc1(x)))\n"
    )
    toml = tmp_path / "plugin.toml"
    toml.write_text('[family]\npaper = "test"\n\n[models.test_plugin_vit]\nimg_size = 16\npatch_size = 4\n'
                    'embed_dim = 16\ndepth = 1\nnum_heads = 2\nmlp = "test_plugin_mlp"\nnotes = "user"\n')
    out = tmp_path / "out"
    try:
        code = main(["--model", "test_plugin_vit", "--plugin", str(plugin), "--registry", str(toml),
                     "--grid", "mlp=test_plugin_mlp,gelu", "--steps", "2", "--batch-size", "32",
                     "--out", str(out), "--no-progress"])
        assert code == 0 and "2 run(s) trained, 0 reused" in capsys.readouterr().out
        assert "| mlp=test_plugin_mlp |" in (out / "summary.md").read_text()
        assert main(["--model", "test_plugin_vit", "--grid", "mlp=nope", "--out", str(out)]) == 2
        assert "unknown block 'nope'" in capsys.readouterr().err
    finally:
        slot_table("mlp").unregister("test_plugin_mlp")
