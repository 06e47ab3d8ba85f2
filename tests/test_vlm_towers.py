"""Vision towers of VLMs (timm's Qwen3Vit* and DeepseekVit*): keys at full size, outputs at small size, the new
entries in another model, from_timm."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import vitzoo
from vitzoo.registry import list_models
from vitzoo.timm_compat import from_timm
from vitzoo.validate import _shapes, _structure_problem

NAMES = [n for n in list_models() if n.startswith(("qwen3_vit_", "deepseek_vit_"))]

# one small model per kind: (name, vitzoo overrides, timm keywords), the same architecture on both sides
SMALL = {
    "qwen3_vit_88m": ({"img_size": 64}, {"pos_embed_grid_size": 4}),
    "qwen3_vit_88m_merge": ({"img_size": 64, "pool": {"out_features": 32}},
                            {"pos_embed_grid_size": 4, "out_features": 32}),
    "qwen3_vit_88m_enc": ({"img_size": 64, "pool": {"out_features": 32}},
                          {"pos_embed_grid_size": 4, "out_features": 32}),
    "deepseek_vit_412m": ({"img_size": 56}, {}),
    "deepseek_vit_412m_align": ({"img_size": 70, "pool": {"out_features": 32}}, {"out_features": 32}),  # 5x5: padded
    "deepseek_vit_412m_enc": ({"img_size": 84, "pool": {"out_features": 32}}, {"out_features": 32}),
}
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def test_family_names() -> None:
    assert len(NAMES) == 12


@pytest.mark.parametrize("name", NAMES)
def test_keys_and_shapes_match_timm(name: str) -> None:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = _structure_problem(_shapes(timm.create_model(name)), _shapes(vitzoo.create_model(name)))
    assert not problem


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_match_timm(name: str) -> None:
    ours_kw, theirs_kw = SMALL[name]
    torch.manual_seed(0)
    size = ours_kw["img_size"]
    reference = timm.create_model(name, img_size=size, **TINY, **theirs_kw).eval()
    model = vitzoo.create_model(name, **TINY, **ours_kw).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4
        if not name.endswith(("_merge", "_align")):  # timm counts the projector in those features
            feats = reference.forward_features(x)
            assert (model.forward_features(x).reshape(feats.shape) - feats).abs().max() <= 1e-4


def test_entries_in_another_model() -> None:
    x, small = torch.randn(1, 3, 128, 128), {"depth": 2, "img_size": 128}
    rope = vitzoo.create_model("vit_tiny_patch16_224", rope="axial_half", pool="avg_norm", num_classes=10, **small)
    assert rope(x).shape == (1, 10) and not any("attn_pool" in k for k in rope.state_dict())
    merged = vitzoo.create_model("vit_tiny_patch16_224", class_token=False, num_classes=10, **small,
                                 pool={"name": "merger", "out_features": 48, "readout": "avg_norm"})
    assert merged.head.in_features == 48 and merged(x).shape == (1, 10)
    assert "merger.fc2.weight" in merged.state_dict()
    aligned = vitzoo.create_model("vit_tiny_patch16_224", class_token=False, num_classes=0, **small,
                                  pool={"name": "aligner", "cell": 3, "out_features": 32, "readout": "none"})
    assert aligned(x).shape == (1, 9, 32)  # 8 x 8 patches padded to 3 x 3 cells of 3 x 3
    with pytest.raises(ValueError, match="class_token=False"):
        vitzoo.create_model("vit_tiny_patch16_224", pool="merger", **small)
    with pytest.raises(ValueError, match="divisible by the cell"):
        vitzoo.create_model("vit_tiny_patch16_224", class_token=False, pool="merger", depth=1, img_size=112)


def test_checkpoint_prefix_round_trip() -> None:
    model = vitzoo.create_model("deepseek_vit_412m", **TINY, img_size=56)
    keys = list(model.state_dict())
    assert all(k.startswith("encoder.") for k in keys)
    twin = vitzoo.create_model("deepseek_vit_412m", **TINY, img_size=56)
    twin.load_state_dict(model.state_dict(), strict=True)
    assert model.pretrained_cfg["first_conv"] == "encoder.patch_embed.proj"


@pytest.mark.parametrize("name,kwargs", [
    ("qwen3_vit_88m_merge", {"img_size": 64, "pos_embed_grid_size": 4, "num_classes": 5, "out_features": 24,
                             "mlp_ratio": 3.0, "rope_temperature": 100.0}),
    ("deepseek_vit_412m_enc", {"img_size": 56, "out_features": 0, "global_pool": "avg", "norm_eps": 1e-5}),
    ("qwen3_vit_88m", {"img_size": 64, "pos_embed_grid_size": 4, "final_norm": False, "num_classes": 3}),
])
def test_from_timm_round_trip(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(name, **TINY, **kwargs).eval()
    model = from_timm(reference).eval()
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4
    rebuilt = vitzoo.VisionTransformer(vitzoo.ViTSpec.from_dict(model.spec.to_dict()))
    rebuilt.load_state_dict(reference.state_dict(), strict=True)


def test_from_timm_refuses_what_it_cannot_express() -> None:
    reference = timm.create_model("qwen3_vit_88m", **TINY, img_size=64, pos_embed_grid_size=4, global_pool="")
    with pytest.raises(ValueError, match="global_pool"):
        from_timm(reference)
