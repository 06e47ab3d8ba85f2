"""timm's MlpMixer family (MLP-Mixer, gMixer, ResMLP, gMLP): structure, numerics, the token mixers elsewhere."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.layers import GatedMlp, GluMlp
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, SpatialGatingBlock
from torch import nn

import vitzoo
from vitzoo.registry import list_models
from vitzoo.spec import ViTSpec
from vitzoo.timm_compat import from_timm
from vitzoo.validate import timm_reference
from vitzoo.weights.load import adapt_state_dict

NAMES = list_models(["mixer_*", "gmixer_*", "resmlp_*", "gmlp_*"])
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=10)
# one small timm MlpMixer per kind of the family, beside the registry name whose spec it must match
KINDS = {
    "mixer_s16_224": {},
    "gmixer_12_224": dict(mlp_ratio=(1.0, 4.0), mlp_layer=GluMlp, act_layer=nn.SiLU),
    "resmlp_24_224": dict(mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine),
    "gmlp_s16_224": dict(mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp),
}


def _timm_small(**kwargs) -> MlpMixer:
    torch.manual_seed(0)
    size = {k: v for k, v in SMALL.items() if k != "depth"}
    model = MlpMixer(num_blocks=SMALL["depth"], **{**size, **kwargs}).eval()
    nn.init.normal_(model.head.weight, std=0.1)  # timm starts the head at zero: logits would compare nothing
    return model


def _assert_same(ours: nn.Module, theirs: nn.Module, in_chans: int = 3) -> None:
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        feats, feats_ref = ours.forward_features(x), theirs.forward_features(x)
        torch.testing.assert_close(feats, feats_ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.forward_head(feats), theirs.forward_head(feats_ref), atol=1e-4, rtol=0)


def test_every_name_of_the_family_is_registered():
    assert len(NAMES) == 15


@pytest.mark.parametrize("name", NAMES)
def test_keys_and_shapes_match_timm(name):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = {k: tuple(v.shape) for k, v in timm.create_model(name).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in vitzoo.create_model(name).state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("name", KINDS)
def test_outputs_match_timm_at_small_size(name):
    reference = _timm_small(**KINDS[name])
    model = vitzoo.create_model(name, **SMALL).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert model.pretrained_cfg["first_conv"] == "stem.proj"
    _assert_same(model, reference)


def test_from_timm_reads_non_default_arguments():
    reference = _timm_small(patch_size=4, mlp_ratio=(0.25, 2.0), stem_norm=True, in_chans=1, global_pool="")
    model = from_timm(reference).eval()
    assert model.spec.get("attn.ratio") == 0.25 and model.spec.pool.name == "none"
    assert model.spec.get("patch_embed.norm") and model.spec.grid_size == (8, 8)
    _assert_same(model, reference, in_chans=1)


@pytest.mark.parametrize("name", KINDS)
def test_from_timm_gives_the_registry_spec(name):
    spec = from_timm(_timm_small(**KINDS[name])).spec
    expected = vitzoo.model_spec(name, **SMALL)
    if expected.block.name == "resmlp":  # read from the instance: 1e-4 at the init of this small ResBlock
        expected = expected.replace(block={"layer_scale": spec.get("block.layer_scale")})
    assert spec == expected


@pytest.mark.parametrize("kwargs,argument", [
    (dict(act_layer=nn.ReLU), "act_layer"), (dict(drop_path_rate=0.1), "drop_path_rate"),
    (dict(norm_layer=nn.BatchNorm1d), "norm_layer"),
])
def test_from_timm_refuses_what_vitzoo_cannot_express(kwargs, argument):
    with pytest.raises(ValueError, match=f"timm argument '{argument}'"):
        from_timm(MlpMixer(num_blocks=1, embed_dim=16, img_size=32, patch_size=8, **kwargs))


@pytest.mark.parametrize("attn", ["token_mlp", "token_glu", "token_linear"])
def test_token_mixers_work_in_a_vit_with_a_class_token(attn):
    spec = ViTSpec(**SMALL, num_heads=2, attn={"name": attn, "ratio": 1.0} if attn != "token_linear" else attn)
    model = vitzoo.VisionTransformer(spec)
    tokens = model.blocks[0].attn.fc1.in_features if attn != "token_linear" else model.blocks[0].attn.in_features
    assert tokens == 4 * 4 + 1  # the patch grid and the class token
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None for p in model.blocks[0].attn.parameters())


def test_token_mixers_refuse_rope_dynamic_size_and_patch_sequences():
    with pytest.raises(ValueError, match="rope='none'"):
        ViTSpec(**SMALL, num_heads=2, attn="token_mlp", rope="axial")
    with pytest.raises(ValueError, match="dynamic_img_size=False"):
        ViTSpec(**SMALL, num_heads=2, attn="token_linear", dynamic_img_size=True)
    attn = vitzoo.VisionTransformer(ViTSpec(**SMALL, num_heads=2, attn="token_mlp")).blocks[0].attn
    with pytest.raises(ValueError, match="patch sequences"):
        attn(torch.randn(1, 17, 32), None, torch.ones(1, 1, 17, 17, dtype=torch.bool))


def test_gmlp_block_takes_no_attention_and_starts_its_gate_at_one():
    with pytest.raises(ValueError, match="attn='none'"):
        vitzoo.VisionTransformer(ViTSpec(**SMALL, num_heads=2, block="gmlp"))
    model = vitzoo.create_model("gmlp_ti16_224", **SMALL)
    gate = model.blocks[0].mlp_channels.gate.proj
    assert torch.equal(gate.bias, torch.ones_like(gate.bias)) and gate.weight.abs().max() < 1e-4


def test_patch_embedding_stored_as_another_name_round_trips():
    model = vitzoo.create_model("mixer_s16_224", **SMALL)
    state = model.state_dict()
    assert "stem.proj.weight" in state and not any(k.startswith("patch_embed.") for k in state)
    twin = vitzoo.create_model("mixer_s16_224", **SMALL)
    twin.load_state_dict(state, strict=True)
    assert torch.equal(twin.patch_embed.proj.weight, model.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="stored_as"):
        ViTSpec(patch_embed={"stored_as": "blocks"})
    gray = vitzoo.create_model("mixer_s16_224", **SMALL, in_chans=1)
    adapted, report = adapt_state_dict(gray, state)  # a pretrained kernel fitted to one input channel
    gray.load_state_dict(adapted, strict=True)
    assert any(line.startswith("stem.proj.weight: (32, 3, 8, 8) -> (32, 1, 8, 8)") for line in report.adapted)


def test_validate_cuts_mlp_mixer_to_the_depth_asked():
    assert len(timm_reference("gmlp_ti16_224", {"depth": 2}).blocks) == 2
