"""vitzoo models carry timm's exact state_dict and reproduce timm's outputs."""

from __future__ import annotations

import pytest
import timm
import torch

import vitzoo
from tests.conftest import CORE_MODELS, parity_depth, timm_twin

TOL = 1e-4


@pytest.mark.parametrize("name", CORE_MODELS)
def test_full_size_structure_matches_timm(name):
    """Same keys and shapes at full size; built on the meta device, so no memory or init cost."""
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
        model = vitzoo.create_model(name)
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == theirs
    assert model.num_classes == reference.num_classes
    assert model.pretrained_cfg["input_size"] == reference.pretrained_cfg["input_size"]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", CORE_MODELS)
def test_outputs_match_timm(name, images):
    depth = parity_depth(name)
    reference, model = timm_twin(name, **({"depth": depth} if depth else {}))
    x = images(model)
    with torch.no_grad():
        feats_ref, feats = reference.forward_features(x), model.forward_features(x)
        logits_ref, logits = reference.forward_head(feats_ref), model.forward_head(feats)
        pre_ref, pre = reference.forward_head(feats_ref, pre_logits=True), model.forward_head(feats, pre_logits=True)
        take = [0, -1]
        final_ref, inter_ref = reference.forward_intermediates(x, indices=take)
        final, inter = model.forward_intermediates(x, indices=take)
    assert torch.isfinite(logits).all()
    assert (feats - feats_ref).abs().max() <= TOL
    assert (logits - logits_ref).abs().max() <= TOL
    assert (pre - pre_ref).abs().max() <= TOL
    assert (final - final_ref).abs().max() <= TOL
    for ours, theirs in zip(inter, inter_ref, strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "deit_tiny_patch16_224"])
def test_intermediate_options_match_timm(name, images):
    reference, model = timm_twin(name, depth=3)
    x = images(model)
    options = dict(indices=2, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True)
    with torch.no_grad():
        theirs = reference.forward_intermediates(x, **options)
        ours = model.forward_intermediates(x, **options)
        layers_ref = reference.get_intermediate_layers(x, n=[0, 2], reshape=True)
        layers = model.get_intermediate_layers(x, n=[0, 2], reshape=True)
    for (o_x, o_prefix), (t_x, t_prefix) in zip(ours, theirs, strict=True):
        assert (o_x - t_x).abs().max() <= TOL and (o_prefix - t_prefix).abs().max() <= TOL
    for o, t in zip(layers, layers_ref, strict=True):
        assert o.shape == t.shape and (o - t).abs().max() <= TOL


def test_dynamic_img_size_matches_timm():
    reference, model = timm_twin("vit_small_patch16_224", depth=2, dynamic_img_size=True)
    x = torch.randn(1, 3, 160, 288)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= TOL


def test_distilled_training_returns_both_heads():
    reference, model = timm_twin("deit_tiny_distilled_patch16_224", depth=1)
    for m in (reference, model):
        m.set_distilled_training(True)
        m.train()
    x = torch.randn(2, 3, 224, 224)
    ours, theirs = model(x), reference(x)
    assert isinstance(ours, tuple) and len(ours) == 2
    for o, t in zip(ours, theirs, strict=True):
        assert (o - t).abs().max() <= TOL
