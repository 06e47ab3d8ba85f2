"""Segment Anything image encoders (timm's VisionTransformerSAM): windowed attention with decomposed relative
positions, the (1, h, w, dim) position table, the in-model neck; from_timm; SAM's own checkpoint layout."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models.vision_transformer_sam import checkpoint_filter_fn

import vitzoo
from vitzoo.registry import model_spec
from vitzoo.timm_compat import from_timm
from vitzoo.validate import reduced_depth
from vitzoo.weights import load_pretrained, spec_hints, to_timm_layout

NAMES = ["samvit_base_patch16", "samvit_base_patch16_224", "samvit_large_patch16", "samvit_huge_patch16"]
SMALL = dict(embed_dim=64, num_heads=4)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values for every tensor (timm starts the position and relative-position tables at zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def _pair(name: str, depth: int, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's model with random weights and vitzoo's loaded from it strictly, cut to ``depth`` on both sides."""
    ours, theirs = reduced_depth(model_spec(name), depth)
    reference = _randomize(timm.create_model(name, **theirs, **kwargs))
    model = vitzoo.create_model(name, **ours, **kwargs).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model, reference


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_timms_at_full_size(name):
    with torch.device("meta"):
        theirs, ours = timm.create_model(name).state_dict(), vitzoo.create_model(name).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name,img_size", [
    ("samvit_base_patch16", 240),  # 15 x 15 patches: 2 x 2 windows of 14, padded; conv neck, position table
    ("samvit_base_patch16_224", 224),  # one window, no position table, LayerNorm2d neck, a classifier
])
def test_outputs_are_timms(name, img_size):
    model, reference = _pair(name, 3, img_size=img_size, **SMALL)
    assert [b.attn.window for b in model.blocks] == [14, 14, 0]
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        features, expected = model.forward_features(x), reference.forward_features(x)
        _close(features, expected)  # the map (b, channels, h, w)
        _close(model.forward_head(features), reference.forward_head(expected))
        _close(model.forward_head(features, pre_logits=True), reference.forward_head(expected, pre_logits=True))
        for normed in (False, True):
            ours = model.forward_intermediates(x, indices=2, norm=normed, intermediates_only=True)
            theirs = reference.forward_intermediates(x, indices=2, norm=normed, intermediates_only=True)
            for a, b in zip(ours, theirs, strict=True):
                _close(a, b)
    assert model.num_features == reference.num_features
    assert model.pretrained_cfg["classifier"] == reference.pretrained_cfg["classifier"]


def test_reduced_depth_keeps_a_global_block_for_timm():
    ours, theirs = reduced_depth(model_spec("samvit_huge_patch16"), 2)
    assert ours["attn.window"] == (14, 0) and theirs == {"depth": 2, "global_attn_indexes": (1,)}


def test_prune_drops_the_neck_as_timm_does():
    model, reference = _pair("samvit_base_patch16", 3, img_size=96, **SMALL)
    taken = model.prune_intermediate_layers(1, prune_norm=True)
    assert taken == reference.prune_intermediate_layers(1, prune_norm=True)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        _close(model.forward_features(x), reference.forward_features(x))
    assert model.spec.features.name == "map" and model.num_features == 64


@pytest.mark.parametrize("name", NAMES)
def test_from_timm_reads_the_registry_spec(name):
    with torch.device("meta"):
        assert from_timm(timm.create_model(name)).spec == model_spec(name)


def test_from_timm_non_default_arguments():
    reference = _randomize(timm.create_model(
        "samvit_base_patch16", img_size=96, depth=3, window_size=4, global_attn_indexes=(1,), qk_norm=True,
        init_values=1e-3, global_pool="max", num_classes=7, neck_chans=32, mlp_ratio=3.0, **SMALL))
    model = from_timm(reference).eval()
    spec = model.spec
    assert (spec.get("attn.window"), spec.get("attn.qk_norm"), spec.pool.name) == ((4, 0, 4), True, "max")
    assert (spec.get("features.channels"), spec.num_classes, spec.get("block.layer_scale")) == (32, 7, 1e-3)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)  # 6 x 6 patches: windows of 4, padded to 8
    with torch.no_grad():
        _close(model(x), reference(x))


@pytest.mark.parametrize("kwargs,argument", [
    (dict(use_rope=True, use_rel_pos=False), "use_rope"), (dict(head_hidden_size=32), "head_hidden_size"),
])
def test_from_timm_refuses_what_vitzoo_cannot_express(kwargs, argument):
    reference = timm.create_model("samvit_base_patch16", img_size=64, depth=2, **SMALL, **kwargs)
    with pytest.raises(ValueError, match=f"timm argument '{argument}'"):
        from_timm(reference)


def test_windowed_attention_and_feature_maps_in_another_model():
    x = torch.randn(2, 3, 96, 96)
    small = dict(img_size=96, depth=2, class_token=False, pool="avg")
    model = vitzoo.create_model("vit_tiny_patch16_224", attn={"name": "windowed", "window": [4, 0]},
                                features="conv_neck", num_classes=5, **small)
    assert model.blocks[0].attn.rel_pos_h.shape == (7, 64) and model.blocks[1].attn.rel_pos_h.shape == (11, 64)
    assert model.forward_features(x).shape == (2, 256, 6, 6) and model(x).shape == (2, 5)
    model = vitzoo.create_model("vit_tiny_patch16_224", features="map", num_classes=0, **small)
    assert model.forward_features(x).shape == (2, 192, 6, 6) and model(x).shape == (2, 192)
    with pytest.raises(ValueError, match="class_token=False"):
        vitzoo.create_model("vit_tiny_patch16_224", attn="windowed")
    with pytest.raises(ValueError, match="use pool='avg'"):
        vitzoo.create_model("vit_tiny_patch16_224", features="norm_map")


TIMM_TO_SAM = ((r"^", "image_encoder."), (r"\.mlp\.fc([12])\.", r".mlp.lin\1."))  # timm's names -> SAM's release


def test_sam_release_checkpoint_loads_like_timm(tmp_path):
    """A file in the layout of SAM's ``sam_vit_*.pth`` (image encoder, prompt encoder, mask decoder): timm's own
    filter maps it back to timm's model exactly, and vitzoo converts it and gives timm's features."""
    model, reference = _pair("samvit_base_patch16", 3, img_size=96, **SMALL)
    upstream = {"prompt_encoder.point_embeddings.0.weight": torch.zeros(1, 256),
                "mask_decoder.iou_token.weight": torch.zeros(1, 256)}
    for key, tensor in reference.state_dict().items():
        for pattern, template in TIMM_TO_SAM:
            key = re.sub(pattern, template, key)
        upstream[key] = tensor
    timm_read = checkpoint_filter_fn(upstream, reference)
    assert timm_read.keys() == reference.state_dict().keys()
    converted, source, dropped = to_timm_layout(upstream)
    assert source == "sam" and sorted(dropped) == sorted(k for k in upstream if not k.startswith("image_encoder."))
    assert all(torch.equal(converted[k], v) for k, v in timm_read.items()) and converted.keys() == timm_read.keys()
    assert model.spec.replace(**spec_hints(source, converted)) == model.spec  # what the file implies is SAM's
    torch.save(upstream, tmp_path / "sam_vit_b.pth")
    fresh = vitzoo.VisionTransformer(model.spec).eval()
    report = load_pretrained(fresh, str(tmp_path / "sam_vit_b.pth")).adapted
    assert report[0].startswith("converted from the Segment Anything (sam_vit_*.pth) layout; dropped ")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        _close(fresh.forward_features(x), reference.forward_features(x))
