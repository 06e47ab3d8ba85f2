"""XCiT: timm's state_dicts and outputs for every name; its blocks (xca, xcit, conv_bn, fourier, xcit_class_attn) in
another model; from_timm of built timm instances."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import xcit
from torch import nn

import vitzoo
from tests.conftest import meta_twins
from vitzoo.timm_compat import from_timm

TOL = 1e-4
NAMES = sorted(timm.list_models("xcit_*"))


def random_twin(name: str, **kwargs) -> tuple[nn.Module, vitzoo.VisionTransformer]:
    """timm's model with every tensor drawn anew (LayerScales near 1 so every branch counts; BatchNorm statistics
    positive) and its vitzoo twin from from_timm, weights loaded strictly."""
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    state = {k: torch.rand_like(v) + 0.5 if k.endswith(("running_var", "gamma1", "gamma2", "gamma3"))
             else torch.randn_like(v) * 0.1 if v.is_floating_point() else v
             for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    return reference, from_timm(reference)


def test_every_name_is_in_the_registry():
    assert set(NAMES) <= set(vitzoo.list_models("xcit_*")) and len(NAMES) == 28


@pytest.mark.parametrize("name", NAMES)
def test_full_size_structure_matches_timm(name):
    reference, model = meta_twins(name, xcit)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert model.pretrained_cfg["input_size"] == reference.pretrained_cfg["input_size"]
    assert model.pretrained_cfg["hf_hub_id"] == reference.pretrained_cfg["hf_hub_id"]
    assert model.pretrained_cfg["first_conv"] == reference.pretrained_cfg["first_conv"]


@pytest.mark.parametrize("name,kwargs", [
    ("xcit_nano_12_p16_224", dict(depth=2, img_size=64, tokens_norm=False)),
    ("xcit_tiny_12_p8_224", dict(depth=2, img_size=48, tokens_norm=True, cls_attn_layers=1)),
    ("xcit_small_12_p16_224", dict(depth=1, img_size=80, global_pool="avg", eta=None, num_classes=5)),
])
def test_outputs_match_timm_with_every_weight_random(name, kwargs):
    reference, model = random_twin(name, **kwargs)
    x = torch.randn(2, 3, *model.spec.img_size)
    with torch.no_grad():
        assert (model.forward_features(x) - reference.forward_features(x)).abs().max() <= TOL
        assert (model(x) - reference(x)).abs().max() <= TOL
        ours = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        theirs = reference.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        assert (ours - theirs).abs().max() <= TOL


def test_registry_model_equals_timm_in_training_mode_too():
    """Batch statistics (the stem's and the local patch interaction's BatchNorm) and LayerScale at their init."""
    torch.manual_seed(0)
    reference = timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=2, img_size=64)
    model = vitzoo.create_model("xcit_nano_12_p16_224", depth=2, img_size=64)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(4, 3, 64, 64)
    assert (model(x) - reference(x)).abs().max() <= TOL


def test_xcit_blocks_serve_another_model():
    model = vitzoo.create_model(
        "vit_tiny_patch16_224", depth=2, img_size=64, attn="xca", block={"name": "xcit", "layer_scale": 0.1},
        patch_embed="conv_bn", pos_embed="fourier", num_classes=3,
        prefix_join={"name": "xcit_class_attn", "depth": 1, "layer_scale": 0.1},
    ).eval()
    keys = model.state_dict()
    assert "pos_embed.token_projection.weight" in keys and "cls_attn_blocks.0.gamma1" in keys
    assert "blocks.1.local_mp.conv2.weight" in keys and "patch_embed.proj.6.1.running_var" in keys
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="attn='xca' mixes channels over all tokens"):
        model.blocks[0].attn(torch.randn(1, 4, 192), None, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_size a power of two"):
        vitzoo.create_model("vit_tiny_patch16_224", patch_embed="conv_bn", patch_size=14, img_size=56)


def test_from_timm_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="drop_path_rate"):
        from_timm(timm.create_model("xcit_nano_12_p16_224", depth=2, drop_path_rate=0.1))
    with pytest.raises(ValueError, match="act_layer"):
        from_timm(timm.create_model("xcit_nano_12_p16_224", depth=2, act_layer=nn.ReLU))
