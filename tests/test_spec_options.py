"""Spec v2: block options live on their slot, spelled one way per place; files of vitzoo 0.1 still load."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

import vitzoo
from vitzoo.blocks import SLOTS, register_block
from vitzoo.blocks.catalog import blocks_markdown
from vitzoo.blocks.options import BlockOptions, GridOptions
from vitzoo.migrate import spec_from_saved
from vitzoo.spec import ViTSpec, parse_assignment
from vitzoo.train.checkpoint import load_checkpoint
from vitzoo.train.finetune import main as finetune_main

DATA = Path(__file__).parent / "data"
BASE = ViTSpec(img_size=(32, 32), patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=3)


def from_toml(text: str) -> ViTSpec:
    return BASE.replace(**tomllib.loads(text))


def from_set(*assignments: str) -> ViTSpec:
    return BASE.replace(**dict(map(parse_assignment, assignments)))


def test_spec_keeps_only_model_wide_fields():
    assert len(dataclasses.fields(ViTSpec)) <= 25  # 25th: attn_bias, a model-level stage (timm's shared_rel_pos)


@pytest.mark.parametrize("python,toml,assignments", [
    ({"attn": {"name": "gqa", "kv_heads": 2}}, 'attn = { name = "gqa", kv_heads = 2 }',
     ("attn=gqa", "attn.kv_heads=2")),
    ({"attn": {"qk_norm": True}}, "attn = { qk_norm = true }", ("attn.qk_norm=true",)),
    ({"attn": "gqa"}, 'attn = "gqa"', ("attn=gqa",)),
    ({"rope": {"name": "axial", "temperature": 100.0, "ref_grid": (4, 4)}},
     'rope = { name = "axial", temperature = 100.0, ref_grid = [4, 4] }',
     ("rope=axial", "rope.temperature=100", "rope.ref_grid=4,4")),
    ({"norm": {"eps": 1e-5}, "drop": {"path": 0.1}}, "norm = { eps = 1e-5 }\ndrop = { path = 0.1 }",
     ("norm.eps=1e-5", "drop.path=0.1")),
    # per layer: the entry, and one value of an option per layer
    ({"attn": {"name": ["mhsa", "gqa", "gqa", "mhsa"], "qk_norm": [True, False, False, True]}},
     'attn = { name = ["mhsa", "gqa", "gqa", "mhsa"], qk_norm = [true, false, false, true] }',
     ("attn=mhsa,gqa,gqa,mhsa", "attn.qk_norm=true,false,false,true")),
    ({"attn": {"name": "gqa", "kv_heads": [4, 2, 2, 1]}}, 'attn = { name = "gqa", kv_heads = [4, 2, 2, 1] }',
     ("attn=gqa", "attn.kv_heads=4,2,2,1")),
])
def test_three_spellings_give_one_spec(python, toml, assignments):
    spec = BASE.replace(**python)
    assert from_toml(toml) == spec
    assert from_set(*assignments) == spec
    assert ViTSpec.from_dict(spec.to_dict()) == spec
    assert spec != BASE


def test_per_layer_options_reach_each_block():
    model = vitzoo.VisionTransformer(from_set("attn=gqa", "attn.kv_heads=4,2,2,1", "block.layer_scale=1e-5"))
    assert [b.attn.kv_heads for b in model.blocks] == [4, 2, 2, 1]
    assert [b.attn.k_proj.out_features for b in model.blocks] == [64, 32, 32, 16]
    assert all(torch.all(b.ls1.gamma == 1e-5) for b in model.blocks)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_default_options_are_not_stored():
    """Writing an option at its default gives the same spec as leaving it out, so specs compare by model."""
    assert BASE.replace(attn={"qk_norm": False}) == BASE
    assert BASE.replace(attn="gqa") == BASE.replace(attn={"name": "gqa", "kv_heads": None})
    assert BASE.to_dict()["attn"] == "mhsa" and "drop" not in BASE.to_dict()


def test_changing_the_entry_resets_its_options():
    spec = BASE.replace(attn={"name": "gqa", "kv_heads": 2})
    assert spec.replace(attn={"qk_norm": True}).get("attn.kv_heads") == 2  # an option: the entry stays
    assert spec.replace(attn="mhsa").attn.options == ()  # another entry: its defaults


def test_an_undeclared_option_names_the_entry_options(bad_input):
    with pytest.raises(ValueError) as err:
        BASE.replace(**{"attn.kv_heads": 2})
    message = bad_input("spec", "attn.kv_heads=2 with attn=mhsa", str(err.value))
    assert "its options: qkv_bias, qk_norm, proj_bias, inner_norm" in message
    with pytest.raises(ValueError, match="'rope_temperature' is now 'rope.temperature'"):
        BASE.replace(rope_temperature=100.0)


def test_a_user_block_declares_options():
    @dataclasses.dataclass(frozen=True)
    class ScaledOptions(BlockOptions):
        scale: float = 1.0
        """multiplies the MLP output"""

    class ScaledMlp(torch.nn.Module):
        def __init__(self, dim, hidden_dim, norm, drop, *, options: ScaledOptions):
            super().__init__()
            self.fc = torch.nn.Linear(dim, dim)
            self.scale = options.scale

        def forward(self, x):
            return self.fc(x) * self.scale

    register_block("mlp", "test_scaled", ScaledMlp, options=ScaledOptions, overwrite=True)
    try:
        model = vitzoo.VisionTransformer(from_set("mlp=test_scaled", "mlp.scale=0.5"))
        assert all(b.mlp.scale == 0.5 for b in model.blocks)
        with pytest.raises(ValueError, match="block 'test_scaled' has no option 'bias'; its options: scale"):
            from_set("mlp=test_scaled", "mlp.bias=false")
    finally:
        SLOTS["mlp"].unregister("test_scaled")


def test_grid_options_follow_the_model_unless_set():
    class TokenCount(torch.nn.Module):
        def __init__(self, dim, hidden_dim, norm, drop, *, options: GridOptions):
            super().__init__()
            self.grid = options.grid

        def forward(self, x):
            return x

    register_block("mlp", "test_grid", TokenCount, options=GridOptions, overwrite=True)
    try:
        spec = from_set("mlp=test_grid")
        assert spec.get("mlp.grid") is None  # the spec keeps what was set: nothing
        assert {b.mlp.grid for b in vitzoo.VisionTransformer(spec).blocks} == {(4, 4)}
        wide = vitzoo.VisionTransformer(spec.replace(img_size=(32, 64)))
        assert wide.blocks[0].mlp.grid == (4, 8)
        assert vitzoo.VisionTransformer(from_set("mlp=test_grid", "mlp.grid=2,3")).blocks[0].mlp.grid == (2, 3)
    finally:
        SLOTS["mlp"].unregister("test_grid")


def test_timm_keywords_still_work_in_create_model():
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=2, drop_path_rate=0.1, qk_norm=True,
                                init_values=1e-5, global_pool="avg", no_embed_class=True, fc_norm=False)
    spec = model.spec
    assert spec.drop.path == 0.1 and spec.get("attn.qk_norm") and spec.get("block.layer_scale") == 1e-5
    assert spec.pool.name == "avg" and spec.final_norm == "tokens" and spec.positioned_prefix == 0


def test_v01_save_pretrained_folder_loads_unchanged():
    expected = torch.load(DATA / "pretrained_v01" / "expected.pt", weights_only=True)
    model = vitzoo.create_model(str(DATA / "pretrained_v01")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(expected["images"]), expected["logits"], rtol=0, atol=1e-5)
    spec = model.spec
    assert spec.get("attn.kv_heads") == (2, 4) and spec.get("norm.eps") == 1e-5 and spec.final_norm == "tokens"
    assert spec.get("pos_embed.prefix") is False and spec.get("mlp.bias") is False and spec.drop.path == 0.1


def test_v01_spec_reads_as_the_same_model():
    old = json.loads((DATA / "pretrained_v01" / "config.json").read_text())["spec"]
    spec = spec_from_saved(old)
    assert spec_from_saved(spec.to_dict()) == spec  # today's files read the same way


def test_v01_fine_tuning_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DATA / "run_v01", run)
    weights, trainer, _ = load_checkpoint(run / "checkpoints" / "step_00000004")
    assert weights and trainer["spec"]["qk_norm"] is True  # as 0.1 wrote it
    code = finetune_main(["vit_small_patch16_224", "--data", "digits", "--img-size", "16", "--set", "patch_size=8",
                 "--set", "embed_dim=32", "--set", "depth=2", "--set", "num_heads=2", "--set", "attn.qk_norm=true",
                 "--set", "block.layer_scale=1e-5", "--set", "drop.path=0.1", "--steps", "6", "--batch-size", "8",
                 "--eval-every", "2", "--out", str(run), "--resume"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6


def test_blocks_doc_is_generated_from_the_tables():
    committed = (Path(__file__).parents[1] / "docs" / "blocks.md").read_text()
    assert committed == blocks_markdown(), "docs/blocks.md is stale: run `make blocks-doc`"
    assert "| `kv_heads` | an int or None | `None` |" in committed
