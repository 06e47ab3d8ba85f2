"""CaiT and ConViT: timm's state_dicts and outputs; the prefix_join slot (a late class token, CaiT's class-attention
stage), talking-heads attention and GPSA as blocks of any model; from_timm for both classes."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import cait, convit

import vitzoo
from tests.conftest import meta_twins
from vitzoo.packing import pack_images
from vitzoo.timm_compat import from_timm

TOL = 1e-4
CAIT = ["cait_xxs24_224", "cait_xxs24_384", "cait_xxs36_224", "cait_xxs36_384", "cait_xs24_384", "cait_s24_224",
        "cait_s24_384", "cait_s36_384", "cait_m36_384", "cait_m48_448"]
CONVIT = ["convit_tiny", "convit_small", "convit_base"]
# one small representative per kind, with the same timm keywords on both sides (from_timm reads the rest)
SMALL = {
    "cait": ("cait_xxs24_224", dict(depth=2, img_size=32, depth_token_only=2)),
    "cait_avg": ("cait_xxs24_224", dict(depth=2, img_size=48, global_pool="avg", depth_token_only=1,
                                        mlp_ratio_token_only=2.0, qkv_bias=False)),
    "convit": ("convit_tiny", dict(depth=4, local_up_to_layer=2, img_size=64)),
    "convit_avg": ("convit_small", dict(depth=3, local_up_to_layer=1, img_size=48, global_pool="avg",
                                        qkv_bias=True)),
}


def random_twin(name: str, **kwargs) -> tuple[torch.nn.Module, vitzoo.VisionTransformer]:
    """timm's model with every weight drawn anew (LayerScale and gates near 1, so every branch counts) and its
    vitzoo twin from from_timm, weights loaded strictly."""
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    state = {k: torch.randn_like(v) * 0.05 + float(k.endswith(("gamma_1", "gamma_2", "norm1.weight", "norm2.weight")))
             for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    return reference, from_timm(reference)


@pytest.mark.parametrize("name", CAIT + CONVIT)
def test_full_size_structure_matches_timm(name):
    reference, model = meta_twins(name, cait, convit)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert model.pretrained_cfg["input_size"] == reference.pretrained_cfg["input_size"]
    assert model.pretrained_cfg["hf_hub_id"] == reference.pretrained_cfg["hf_hub_id"]
    assert len(model.feature_info) == len(reference.feature_info)


@pytest.mark.parametrize("kind", SMALL)
def test_outputs_match_timm(kind):
    reference, model = random_twin(*SMALL[kind][:1], **SMALL[kind][1])
    torch.manual_seed(1)
    x = torch.randn(2, 3, *model.spec.img_size)
    with torch.no_grad():
        feats, feats_ref = model.forward_features(x), reference.forward_features(x)
        assert (feats - feats_ref).abs().max() <= TOL
        assert (model.forward_head(feats) - reference.forward_head(feats_ref)).abs().max() <= TOL
        final, inter = model.forward_intermediates(x, indices=[0, 1], norm=True)
        final_ref, inter_ref = reference.forward_intermediates(x, indices=[0, 1], norm=True)
    assert (final - final_ref).abs().max() <= TOL
    for ours, theirs in zip(inter, inter_ref, strict=True):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= TOL


def test_registry_model_matches_timm():
    """The registry entry itself (not from_timm) against timm at full depth."""
    torch.manual_seed(0)
    reference = timm.create_model("convit_tiny", pretrained=False, img_size=32).eval()
    model = vitzoo.create_model("convit_tiny", img_size=32).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= TOL


def test_entries_in_another_model():
    """Talking heads, GPSA and both joins in a plain ViT: build, run, train."""
    torch.manual_seed(0)
    for changes in (
        {"attn": "talking_heads", "prefix_join": {"name": "class_attn", "depth": 1, "layer_scale": 0.1}},
        {"attn": ["gpsa", "gpsa", "mhsa"], "prefix_join": {"at": 2}, "reg_tokens": 2},
        {"attn": "gpsa", "class_token": False, "pool": "avg"},
    ):
        model = vitzoo.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=5, **changes)
        out = model(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_late_join_intermediates_and_pruning():
    model = vitzoo.create_model("vit_tiny_patch16_224", img_size=64, depth=4, prefix_join={"at": 2}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        states = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)
        assert [prefix.shape[1] for _, prefix in states] == [0, 0, 1, 1]
        assert all(s.shape == (1, 16, 192) for s, _ in states)
        assert model.forward_features(x).shape == (1, 17, 192)
        model.prune_intermediate_layers([0], prune_head=True)
        assert len(model.blocks) == 1 and model.forward_features(x).shape == (1, 17, 192)


def test_gpsa_refuses_prefix_tokens_in_its_layers():
    with pytest.raises(ValueError, match="prefix_join"):
        vitzoo.create_model("vit_tiny_patch16_224", attn="gpsa")
    model = vitzoo.create_model("cait_xxs24_224", depth=1)
    with pytest.raises(ValueError, match="feed this model images"):
        model(pack_images([torch.randn(3, 32, 48)], 16)[0])


def test_from_timm_refuses_what_vitzoo_cannot_express():
    with torch.device("meta"):
        cait = timm.create_model("cait_xxs24_224", depth=2, drop_path_rate=0.1)
        convit = timm.create_model("convit_tiny", depth=4, local_up_to_layer=4)
    with pytest.raises(ValueError, match="drop_path_rate"):
        from_timm(cait)
    with pytest.raises(ValueError, match="local_up_to_layer"):
        from_timm(convit)


def test_spec_round_trip_and_fx():
    model = vitzoo.create_model("cait_xxs24_224", depth=2, img_size=32)
    assert vitzoo.VisionTransformer(vitzoo.ViTSpec.from_dict(model.spec.to_dict())).spec == model.spec
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (traced(x) - model(x)).abs().max() <= TOL


def test_gpsa_starts_as_a_convolution():
    """Relative offsets and the local init as timm's GPSA has them."""
    ours = vitzoo.create_model("convit_tiny", img_size=32).blocks[0].attn
    theirs = timm.create_model("convit_tiny", img_size=32).blocks[0].attn
    assert torch.equal(ours.rel_indices, theirs.get_rel_indices(4)[0])
    assert torch.equal(ours.v.weight, theirs.v.weight)
    assert torch.equal(ours.pos_proj.weight, theirs.pos_proj.weight)  # 4 heads: all on the 2 x 2 kernel
