"""Beyond the core models: one timm name per family or structural feature matches timm, and
``from_timm`` translates timm ViTs built with non-default arguments (or names what it cannot)."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from timm.layers import SwiGLU
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock, ResPostBlock

import vitzoo
import vitzoo.validate as validate_module
from vitzoo.timm_compat import mlp_ratio_for, spec_from_timm
from vitzoo.validate import TOL, Validation, validate

# name -> the feature it stands for; compared at one or two blocks (structure at full size).
REPRESENTATIVES = {
    "aimv2_large_patch14_224": 1,  # RMSNorm, SwiGLU, patch-embedding norm, no projection biases
    "beit3_base_patch16_224": 1,  # Sub-LN: norms inside attention and MLP
    "vit_giant_patch14_dinov2": 1,  # packed SwiGLU (fc1 holds gate and value), ViT-g
    "vit_base_patch16_rpn_224": 2,  # res-post-norm blocks
    "test_vit3": 2,  # attention pooling over prefix tokens too, registers
    "vit_so400m_patch16_siglip_256": 1,  # tanh-GELU, So400m width (float mlp_ratio), MAP pooling
    "vit_base_patch16_clip_quickgelu_224": 1,  # quick-GELU, CLIP pre-norm
    "vit_large_patch16_radio_v3": 1,  # no final norm, 7 registers
    "deit_small_distilled_patch16_224": 1,  # distillation token and head
    "vit_so150m2_patch16_reg1_gap_256": 1,  # So150m v2 width, GAP, no qkv bias
    "vit_so400m_patch14_siglip_384": 1,  # 384 px with patch 14: the pixels past the last whole patch are dropped
    "vit_small_r26_s32_224": 1,  # hybrid: BiT ResNet-26 stem as the patch embedding
    "vit_small_resnet26d_224": 1,  # hybrid: timm ResNet-26d feature stage as the patch embedding
    "vit_tiny_r_s16_p8_224": 1,  # hybrid: ResNet stem only, 2x2 patches of its feature map
    "flexivit_small": 1,  # FlexiViT: 240 px, patch 16 from a 32 px-trained embedding
    "vitamin_small_224": 1,  # hybrid: ViTamin MBConv stem ending at the token width (no projection), normed GeGLU
    "vit_base_mci_224": 1,  # hybrid: MobileCLIP conv stem without projection, no_embed_class
    "vit_small_patch16_18x2_224": 1,  # two parallel attention and MLP branches per block (ParallelThingsBlock)
    "vit_base_patch16_xp_224": 1,  # fused parallel block without qkv bias (separate mlp_bias), RMS q/k norm
    "vit_pwee_patch16_reg1_gap_256": 1,  # fused parallel block with qkv bias and LayerScale
    "vit_dwee_patch16_reg1_gap_256": 2,  # differential attention, lambda_init set by the layer index
    "vit_dpwee_patch16_reg1_gap_256": 2,  # fused parallel block with differential attention, one out_proj
    # timm's Eva class
    "eva02_tiny_patch14_224": 1,  # axial RoPE rescaled to a reference grid, q/v-bias attention, packed SwiGLU
    "eva02_base_patch16_clip_224": 1,  # separate q/k/v projections, SwiGLU and attention inner norms
    "vit_small_patch16_dinov3": 1,  # DINOv3 RoPE (centred coords, rotate-half), gamma LayerScale, registers
    "vit_small_patch16_rope_224": 1,  # RoPE (x, y channel order) on plain fused-qkv attention, no position table
    "vit_pe_core_tiny_patch16_384": 1,  # RoPE with grid offset, pre-norm, MAP pooling with its own heads
    "vit_small_patch16_rope_mixed_224": 2,  # RoPE-Mixed: learned frequencies per layer and head (rope.freqs)
    "eva02_enormous_patch14_clip_224": 1,  # res-post-norm Eva block
    "vit_large_patch16_sapiens2": 2,  # a full-head and a grouped-query block, biased q/k/v, attention-only LayerScale
}


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_representative_names_match_timm(name):
    result = validate(name, depth=REPRESENTATIVES[name])
    assert result.ok, result.reason
    assert result.worst <= TOL and len(result.block_diffs) == REPRESENTATIVES[name]


def test_sapiens2_training_mode_rescales_positions_like_timm():
    """In training, Sapiens2 multiplies its RoPE positions by one random factor per forward; drawn from the
    same seed, vitzoo's and timm's factors and features agree, and another seed gives other features."""
    name = "vit_large_patch16_sapiens2"
    torch.manual_seed(0)
    reference = timm.create_model(name, depth=2, num_kv_heads=(16, 8)).train()
    model = vitzoo.create_model(name, depth=2, attn={"kv_heads": (16, 8)}).train()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 48)

    def features(net: torch.nn.Module, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return net.forward_features(x)

    assert (features(reference, 5) - features(model, 5)).abs().max() <= TOL
    assert (features(model, 5) - features(model, 6)).abs().max() > 0.1


KWARGS = [
    dict(global_pool="avg", class_token=False, fc_norm=True, reg_tokens=2, no_embed_class=True),
    dict(init_values=1e-4, qk_norm=True, norm_layer="rmsnorm", act_layer="gelu_tanh", pre_norm=True),
    dict(mlp_layer=SwiGLU, act_layer="silu", proj_bias=False, qkv_bias=False, scale_attn_norm=True,
         scale_mlp_norm=True),
    dict(global_pool="avgmax", mlp_ratio=3.5, dynamic_img_size=True, final_norm=False),
    dict(global_pool="map", class_token=False, embed_norm_layer="layernorm", reg_tokens=1),
    dict(pos_embed="none", global_pool="", num_classes=0, block_fn=ResPostBlock),
    dict(global_pool="max", pool_include_prefix=True, act_layer="quick_gelu", img_size=96, patch_size=8),
    dict(block_fn=ParallelScalingBlock, qkv_bias=False, qk_norm=True, init_values=1e-4, global_pool="avg"),
    dict(attn_layer="diff", qk_norm=True, reg_tokens=1),
    dict(img_size=230, class_token=False, global_pool="avg"),  # timm drops the pixels past the last whole patch
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda kw: ",".join(kw))
def test_from_timm_reads_non_default_arguments(kwargs):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", depth=2, **kwargs).eval()
    model = vitzoo.from_timm(reference).eval()  # loads timm's weights with strict=True
    assert not model.training and model.spec.depth == 2
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert (model.forward_features(x) - reference.forward_features(x)).abs().max() <= TOL
        assert (model(x) - reference(x)).abs().max() <= TOL


def test_from_timm_spec_round_trips_through_the_registry():
    with torch.device("meta"):
        reference = timm.create_model("vit_so400m_patch14_siglip_224")
    spec = spec_from_timm(reference)
    assert int(spec.embed_dim * spec.mlp_ratio) == 4304
    registered = vitzoo.model_spec("vit_so400m_patch14_siglip_224")
    assert spec.replace(mlp_ratio=registered.mlp_ratio) == registered


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(block_fn=DiffParallelScalingBlock), r"blocks.0 is DiffParallelScalingBlock.*'block_fn'"),
        (dict(global_pool="prr"), r"global_pool is 'prr'.*'global_pool'"),
    ],
)
def test_from_timm_names_what_it_cannot_express(kwargs, message):
    with torch.device("meta"):
        reference = timm.create_model("vit_tiny_patch16_224", depth=1, **kwargs)
    with pytest.raises(ValueError, match=message):
        vitzoo.from_timm(reference)


def test_from_timm_refuses_other_families():
    with pytest.raises(ValueError, match="from_timm reads timm.s .*VisionTransformer.* models, got Linear"):
        vitzoo.from_timm(torch.nn.Linear(2, 2))


def test_mlp_ratio_reproduces_timm_hidden_width():
    for dim, hidden in [(1152, 4304), (1408, 6144), (1664, 8192), (832, 2176), (384, 1536)]:
        assert int(dim * mlp_ratio_for(hidden, dim)) == hidden


def test_new_blocks_compose_with_other_slots():
    """The blocks added for timm's families serve any spec, not only the models that need them."""
    model = vitzoo.create_model(
        "vit_tiny_patch16_224", depth=2, img_size=64, block=("respost", "parallel"),
        mlp={"name": ("swiglu_packed", "geglu"), "inner_norm": True, "bias": False},
        attn={"inner_norm": True, "proj_bias": False}, patch_embed={"norm": True},
        pool={"name": "avgmax", "include_prefix": True}, norm="rmsnorm", class_token=False, reg_tokens=1,
    ).eval()
    keys = model.state_dict()
    assert "patch_embed.norm.weight" in keys and "blocks.0.attn.norm.weight" in keys
    assert keys["blocks.0.mlp.fc2.weight"].shape == (192, 384) and "blocks.1.mlp.norm.weight" in keys
    assert "blocks.0.attn.proj.bias" not in keys and "blocks.0.mlp.fc1.bias" not in keys
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_validate_all_keeps_the_section_of_timms_own_tests(tmp_path, monkeypatch):
    """``validate --all`` rewrites its own report and keeps the section tests/upstream/run_timm_suite.py wrote."""
    out = tmp_path / "parity.md"
    section = validate_module.SUITE_HEADING + "\n\n| upstream test | passed |\n"
    out.write_text("# an older report\n\n" + section)
    monkeypatch.setattr(validate_module, "sweep_names", lambda sweep: [])
    args = argparse.Namespace(all=True, name=None, depth=None, out=str(out), classes=None)
    assert validate_module._cmd_validate(args) == 0
    text = out.read_text()
    assert text.startswith("# timm coverage") and "older report" not in text and "- **Beit: 0 / 0**" in text
    assert text.endswith("\n\n" + section)


def test_validate_all_reruns_chosen_classes_and_keeps_the_others(tmp_path, monkeypatch):
    """``--classes`` validates the names of those timm classes only; every other section comes from the kept results."""
    out = tmp_path / "parity.md"
    names = {"VisionTransformer": ["vit_a"], "Eva": ["eva_a"]}
    monkeypatch.setattr(validate_module, "sweep_names", lambda sweep: names.get(sweep.title, []))
    monkeypatch.setattr(validate_module, "validate", lambda name, depth: Validation(name, ok=True, depth=1))
    assert validate_module._cmd_validate(argparse.Namespace(all=True, name=None, depth=None, out=str(out),
                                                            classes=None)) == 0
    names.update(VisionTransformer=["vit_b"], Eva=["eva_b"])
    assert validate_module._cmd_validate(argparse.Namespace(all=True, name=None, depth=None, out=str(out),
                                                            classes="Eva")) == 0
    text = out.read_text()
    assert "`vit_a`" in text and "`vit_b`" not in text and "`eva_b`" in text and "`eva_a`" not in text
    assert "- **VisionTransformer: 1 / 1**" in text and "**2 / 2** timm" in text
    with pytest.raises(ValueError, match="no timm class 'Evaa' is swept; closest: Eva"):
        validate_module._cmd_validate(argparse.Namespace(all=True, name=None, depth=None, out=str(out),
                                                         classes="Evaa"))
