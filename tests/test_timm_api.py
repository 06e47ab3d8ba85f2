"""The rest of timm's model API: pretrained_cfg keys, features_only, pruning and create_model keywords,
each compared with what timm itself gives for the same name."""

from __future__ import annotations

import pytest
import timm
import torch

import vitzoo
from vitzoo.features import FeatureGetter

# one name per kind of model: plain, distilled, hybrid stem, EVA-02 with RoPE, MAP pooling, registers
NAMES = [
    "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_r26_s32_224",
    "eva02_tiny_patch14_224", "vit_base_patch16_siglip_224", "vit_small_patch14_reg4_dinov2",
]
CFG_KEYS = ("input_size", "fixed_input_size", "first_conv", "classifier", "pool_size", "num_classes", "crop_pct",
            "crop_mode", "interpolation", "mean", "std")


def twins(name: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    reference = timm.create_model(name, depth=2, **kwargs).eval()
    model = vitzoo.create_model(name, depth=2, **kwargs).eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_and_sizes_are_timms(name):
    reference, model = twins(name)
    assert {k: model.default_cfg[k] for k in CFG_KEYS} == {k: reference.default_cfg[k] for k in CFG_KEYS}
    assert model.head_hidden_size == reference.head_hidden_size == model.num_features
    assert model.feature_info == reference.feature_info


@pytest.mark.parametrize("name", NAMES)
def test_features_only_matches_timms_feature_wrapper(name):
    torch.manual_seed(0)
    reference = timm.create_model(name, depth=3, features_only=True, out_indices=(0, 2)).eval()
    model = vitzoo.create_model(name, depth=3, features_only=True, out_indices=(0, 2)).eval()
    assert isinstance(model, FeatureGetter)
    model.load_state_dict(reference.state_dict())  # the same keys: model.-prefixed, pruned as timm prunes
    assert model.feature_info.channels() == reference.feature_info.channels()
    assert model.feature_info.reduction() == reference.feature_info.reduction()
    assert model.feature_info.module_name() == reference.feature_info.module_name()
    assert not {"num_classes", "classifier"} & (model.default_cfg.keys() | reference.default_cfg.keys())
    x = torch.randn(1, *reference.default_cfg["input_size"])
    with torch.no_grad():
        for ours, theirs in zip(model(x), reference(x), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_features_options_norm_and_token_format():
    reference, _ = twins("vit_tiny_patch16_224")
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=2, features_only=True, out_indices=1, output_fmt="NLC",
                                feature_cfg=dict(norm=True)).eval()
    model.load_state_dict({f"model.{k}": v for k, v in reference.state_dict().items() if not k.startswith("head")})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        (ours,) = model(x)
        theirs = reference.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
    assert ours.shape == (1, 196, 192)
    torch.testing.assert_close(ours, theirs[0], atol=1e-5, rtol=1e-5)


def test_pruned_model_is_described_by_its_spec():
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=4, attn={"qk_norm": [False, True, False, True]})
    assert model.prune_intermediate_layers((0, -2)) == [0, 2]
    assert len(model.blocks) == 3 and model.spec.depth == 3 and model.spec.get("attn.qk_norm") == (False, True, False)
    assert model.spec.num_classes == 0 and model.spec.pool.name == "none"
    rebuilt = vitzoo.VisionTransformer(model.spec)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_reset_classifier_keeps_pretrained_cfg_and_takes_timms_empty_pool():
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    model.reset_classifier(0, "")
    assert model.pretrained_cfg["num_classes"] == 1000 and model.spec.pool.name == "none"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5, 192)


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_patch16_224", {}), ("vit_tiny_patch16_224", {"global_pool": ""}),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}), ("vit_base_patch16_siglip_224", {}),
    ("qwen3_vit_88m", {}), ("qwen3_vit_88m_merge", {}), ("qwen3_vit_88m_enc", {}),
    ("deepseek_vit_412m_align", {}), ("deepseek_vit_412m_enc", {}), ("gemma4_vit_167m_enc", {}),
])
def test_global_pool_is_timms_name(name: str, kwargs: dict) -> None:
    """``model.global_pool`` as timm's model of the name reads it, also after ``reset_classifier(0, '')``."""
    with torch.device("meta"):
        reference, model = timm.create_model(name, **kwargs), vitzoo.create_model(name, **kwargs)
    assert model.global_pool == reference.global_pool
    if hasattr(reference, "reset_classifier") and reference.global_pool in ("avg", "token"):
        reference.reset_classifier(0, "")
        model.reset_classifier(0, "")
        assert model.global_pool == reference.global_pool == ""


def test_timm_keywords_map_onto_the_spec():
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=1, act_layer="quick_gelu", norm_layer="rmsnorm",
                                pos_embed="learn", weight_init="", scriptable=True, exportable=True)
    assert (model.spec.mlp.name, model.spec.norm.name, model.spec.pos_embed.name) == ("quick_gelu", "rmsnorm",
                                                                                      "learned")
    gated = vitzoo.create_model("vit_medium_patch16_gap_256", depth=1, mlp="swiglu", act_layer=torch.nn.GELU)
    assert gated.spec.mlp.name == "geglu"


def test_dynamic_img_pad_pads_as_timm_does():
    torch.manual_seed(0)
    kwargs = dict(depth=2, dynamic_img_size=True, dynamic_img_pad=True)
    reference = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    model = vitzoo.create_model("vit_tiny_patch16_224", **kwargs).eval()
    assert model.spec.get("patch_embed.pad") and vitzoo.from_timm(reference).spec == model.spec
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_path_loads_after_building(timm_weights):
    model = vitzoo.create_model("vit_tiny_patch16_224", checkpoint_path=str(timm_weights))
    reference = timm.create_model("vit_tiny_patch16_224")
    reference.load_state_dict(vitzoo.weights.read_state_dict(timm_weights))
    assert torch.equal(model.pos_embed, reference.pos_embed)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(weight_init="jax"), "weight_init: vitzoo initialises as timm's default"),
    (dict(mlp_layer=torch.nn.Linear), "choose the mlp by name"),
    (dict(act_layer="silu"), "the 'gelu' MLP has no variant"),
    (dict(out_indices=1), "feature options apply with features_only=True"),
    (dict(features_only=True, feature_cls="hook"), "create_feature_extractor"),
    (dict(features_only=True, output_fmt="NHWC"), "ViT features come as NCHW or NLC"),
])
def test_timm_keywords_vitzoo_cannot_express_are_refused(kwargs, message, bad_input):
    with pytest.raises(ValueError, match=message) as err:
        vitzoo.create_model("vit_tiny_patch16_224", depth=1, **kwargs)
    bad_input("create_model", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()), str(err.value))


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_intern300m_patch14_448", "vit_base_patch16_224"])
def test_fixed_input_size_is_timms_also_for_models_that_take_any_size(name):
    """timm marks DINOv3 and InternViT fixed_input_size though they take any size, and its tests then feed
    them their own size only (a 384 input would not divide into InternViT's 14-pixel patches)."""
    small = dict(depth=1, embed_dim=64, num_heads=4)
    reference, model = timm.create_model(name, **small), vitzoo.create_model(name, **small)
    assert model.pretrained_cfg["fixed_input_size"] == reference.pretrained_cfg["fixed_input_size"]
    assert model.dynamic_img_size == reference.dynamic_img_size
