"""Models go where timm's ViTs go: torch.fx symbolic tracing (torchvision's feature extraction, timm's FX
tests) gives the eager outputs exactly, and torch.jit.script gives a module that saves and loads."""

from __future__ import annotations

import io
import warnings

import pytest
import timm
import torch
import torch.fx
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import vitzoo

SMALL = dict(depth=2, embed_dim=96, num_heads=4)
FAMILIES = {  # one model per family, at a small width and image size
    "plain": ("vit_tiny_patch16_224", dict(img_size=32)),
    "class_and_registers": ("vit_base_patch14_reg4_dinov2", dict(img_size=28)),
    "gap_no_class_token": ("vit_base_patch16_reg4_gap_256", dict(img_size=32)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32)),
    "map_siglip": ("vit_base_patch16_siglip_224", dict(img_size=32)),
    "eva02_rope": ("eva02_tiny_patch14_224", dict(img_size=28)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=32)),
    "hybrid_stem": ("vit_tiny_r_s16_p8_224", dict(img_size=32)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=32)),
}
# timm's tests/test_models.py traces with these
TIMM_TRACER = dict(leaf_modules=timm.models.get_notrace_modules(),
                   autowrap_functions=timm.models.get_notrace_functions(), param_shapes_constant=True)


def small_model(family: str, **changes) -> vitzoo.VisionTransformer:
    name, sizes = FAMILIES[family]
    return vitzoo.create_model(name, **SMALL, **sizes, **changes)


def images(model: vitzoo.VisionTransformer, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_trace_equals_eager_exactly(family):
    model = small_model(family).eval()
    x = images(model)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))


def test_fx_trace_of_a_dynamic_size_model_follows_the_input_size():
    model = vitzoo.create_model("eva02_tiny_patch14_224", **SMALL, img_size=28, dynamic_img_size=True).eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for size in ((28, 28), (42, 56)):
            x = torch.randn(2, 3, *size)
            assert torch.equal(traced(x), model(x))


def test_fx_graph_keeps_the_input_check():
    model = small_model("plain").eval()
    traced = torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match="this model expects 32x32 images, got 48x48"):
        traced(torch.randn(1, 3, 48, 48))
    with pytest.raises(TypeError, match="expected normalized float images"):
        traced(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("family", ["plain", "deit_distilled", "map_siglip", "rope_mixed", "hybrid_stem"])
def test_fx_backward_reaches_every_parameter(family):
    """timm's test_model_backward_fx: trace in train mode with timm's tracer settings, every parameter gets a
    gradient."""
    model = small_model(family, num_classes=42, drop={"path": 0.1}).train()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TIMM_TRACER)
    fx_model = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                        eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=TIMM_TRACER)
    outputs = torch.cat(list(fx_model(images(model)).values()))
    outputs.mean().backward()
    assert outputs.shape[-1] == 42
    assert [name for name, p in fx_model.named_parameters() if p.grad is None] == []


def test_feature_extractor_on_a_block_equals_forward_intermediates():
    model = small_model("class_and_registers").eval()
    x = images(model)
    extractor = create_feature_extractor(model, return_nodes={"blocks.0": "f"})
    with torch.no_grad():
        tokens = extractor(x)["f"]
        expected = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
    assert torch.equal(tokens[:, model.num_prefix_tokens:], expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", ["plain", "eva02_rope", "hybrid_stem"])
def test_torchscript_round_trip_equals_eager(family, tmp_path):
    model = small_model(family).train()
    scripted = torch.jit.script(model)
    assert model.training  # scripting traces in eval mode and leaves the model as it was
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save/load are deprecated in favour of export
        torch.jit.save(scripted, path)
        loaded = torch.jit.load(io.BytesIO(path.read_bytes()))
    x = images(model.eval(), batch=3)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
