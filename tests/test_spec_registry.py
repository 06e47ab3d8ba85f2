"""The spec validates and round-trips; the registry builds every entry and explains bad names."""

from __future__ import annotations

import tomllib

import pytest
import torch

import vitzoo
from vitzoo.registry import REGISTRY_DIR, load_registry_file, model_entry
from vitzoo.spec import ViTSpec
from vitzoo.validate import reduced_depth


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(embed_dim=100, num_heads=3), "ViTSpec.embed_dim: 100 is not divisible by num_heads=3"),
        (dict(img_size=225), r"ViTSpec.img_size: \(225, 225\) is not divisible by patch_size=16"),
        (dict(mlp="swigloo"), "ViTSpec.mlp: unknown block 'swigloo'; closest: swiglu"),
        (dict(norm="batchnorm"), "ViTSpec.norm: unknown block 'batchnorm'"),
        (dict(class_token=False), "ViTSpec.pool: 'token' reads the class token"),
        (dict(attn=("mhsa", "mhsa")), "ViTSpec.attn: has 2 per-layer values but depth=12"),
        (dict(attn={"kv_heads": 4}), "ViTSpec.attn: block 'mhsa' has no option 'kv_heads'; its options: qkv_bias, "
                                     "qk_norm, proj_bias, inner_norm"),
        (dict(attn={"name": "gqa", "kv_heads": 5}), r"ViTSpec.attn \(gqa\): kv_heads=5 does not divide num_heads=12"),
        (dict(attn={"name": "gqa", "kv_heads": (12, 4)}), "ViTSpec.attn.kv_heads: has 2 per-layer values but depth=12"),
        (dict(rope={"rescale": 2.0}), "ViTSpec.rope: block 'none' has no option 'rescale'; it takes no options"),
        (dict(rope={"name": "axial", "rescale": 0.5}), r"ViTSpec.rope.rescale: must be >= 1"),
        (dict(drop={"path": 1.5}), r"ViTSpec.drop.path: must be in \[0, 1\)"),
        (dict(qk_norm=True), "ViTSpec has no field 'qk_norm'; 'qk_norm' is now 'attn.qk_norm'"),
        (dict(final_norm="pool"), "ViTSpec.final_norm: 'pool' is not a placement; closest: pooled"),
        (dict(depth=0), "ViTSpec.depth: must be >= 1, got 0"),
        (dict(dist_token=True, pool="avg"), "ViTSpec.dist_token: needs class_token=True and pool='token'"),
        (dict(embed_dimm=384), "ViTSpec has no field 'embed_dimm'; closest: embed_dim"),
    ],
)
def test_invalid_specs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        ViTSpec().replace(**changes)


def test_spec_round_trips_through_dict_and_toml():
    spec = ViTSpec(img_size=(192, 256), depth=3, mlp=("gelu", "swiglu", "gelu"), block={"layer_scale": 1e-5},
                   attn={"name": "gqa", "kv_heads": (1, 3, 12)}, rope={"name": "axial", "ref_grid": (16, 16)},
                   reg_tokens=4, drop={"path": 0.1})
    assert ViTSpec.from_dict(spec.to_dict()) == spec
    assert ViTSpec.from_dict(tomllib.loads(to_toml(spec.to_dict()))) == spec


def to_toml(data: dict) -> str:
    """A spec dict as TOML lines (inline tables for the slots with options)."""
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(map(value, v)) + "]"
        return repr(v).replace("'", '"').replace("True", "true").replace("False", "false")

    return "\n".join(f"{k} = {value(v)}" for k, v in data.items())


@pytest.mark.parametrize("name", vitzoo.list_models())
def test_every_registry_entry_builds_and_runs(name):
    """Full-size structure on meta; a 1-block forward at the entry's input size is finite."""
    with torch.device("meta"):
        full = vitzoo.create_model(name)
    assert len(full.blocks) == full.spec.depth
    model = vitzoo.create_model(name, **reduced_depth(full.spec, 1)[0]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, *model.pretrained_cfg["input_size"]))
    # one vector per image, or tokens (b, n, width) where the readout keeps them (a VLM tower's image tokens)
    assert out.shape[::out.ndim - 1] == (1, model.num_classes or model.head_hidden_size) and torch.isfinite(out).all()
    entry = model_entry(name)
    assert entry.paper and (entry.pretrained_cfg.get("hf_hub_id") or entry.notes)


def test_registry_lives_in_toml_files():
    files = {p.name for p in REGISTRY_DIR.glob("*.toml")}
    assert {"sizes.toml", "vit.toml", "deit.toml"} <= files
    assert model_entry("vit_base_patch16_224").source == "vit.toml"


def test_unknown_model_lists_closest_names():
    with pytest.raises(ValueError, match="unknown model 'vit_base_patch16_22'; closest: vit_base_patch16_224"):
        vitzoo.create_model("vit_base_patch16_22")


def test_list_models_patterns():
    assert "deit_tiny_patch16_224" in vitzoo.list_models("deit_*")
    assert all(n.startswith("vit_small") for n in vitzoo.list_models("vit_small_*"))
    both = vitzoo.list_models(["deit3_small_*", "vit_base_patch16_siglip_2*"])
    assert both == ["deit3_small_patch16_224", "deit3_small_patch16_384", "vit_base_patch16_siglip_224",
                    "vit_base_patch16_siglip_256"]
    assert set(vitzoo.list_models(pretrained=True)) <= set(vitzoo.list_models())


def test_create_model_overrides_and_register_model(new_models_removed):
    model = vitzoo.create_model("vit_tiny_patch16_224", num_classes=7, img_size=96, depth=2, pool="avg",
                                class_token=False)
    assert model.spec.img_size == (96, 96) and model.pretrained_cfg["input_size"] == (3, 96, 96)
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 7)
    spec = vitzoo.model_spec("vit_tiny_patch16_224", depth=3)
    vitzoo.register_model("test_tiny_d3", spec, notes="a test entry", overwrite=True)
    assert "test_tiny_d3" in vitzoo.list_models("test_*")
    assert len(vitzoo.create_model("test_tiny_d3").blocks) == 3
    with pytest.raises(ValueError, match="already exists"):
        vitzoo.register_model("test_tiny_d3", spec)


def test_unregister_model_removes_and_returns_the_entry(new_models_removed):
    spec = vitzoo.model_spec("vit_tiny_patch16_224", depth=2)
    added = vitzoo.register_model("test_tiny_d2", spec, {"crop_pct": 1.0}, notes="a test entry")
    assert vitzoo.unregister_model("test_tiny_d2") == added
    assert "test_tiny_d2" not in vitzoo.list_models("test_*")
    with pytest.raises(ValueError, match="unknown model 'test_tiny_d2'"):
        vitzoo.create_model("test_tiny_d2")
    vitzoo.register_model(added.name, added.spec, added.pretrained_cfg, notes=added.notes)  # no overwrite needed
    assert model_entry("test_tiny_d2") == added


def test_unregister_model_removes_a_file_model(new_models_removed, tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('[family]\nname = "mine"\npaper = "mine"\n\n[models.test_file_vit]\nvariant = "Ti/16"\n')
    load_registry_file(toml)
    assert vitzoo.unregister_model("test_file_vit").source == "mine.toml"
    assert load_registry_file(toml) == ["test_file_vit"]  # the name is free again


def test_unregister_unknown_model_lists_closest_names():
    with pytest.raises(ValueError, match="unknown model 'vit_base_patch16_22'; closest: vit_base_patch16_224"):
        vitzoo.unregister_model("vit_base_patch16_22")
