"""Relative-position ViTs: timm's Beit (BEiT, BEiT v2) and VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers.pos_embed_rel import gen_relative_position_index
from timm.models.vision_transformer_relpos import ResPostRelPosBlock

import vitzoo
from vitzoo.blocks.relpos import relative_index
from vitzoo.packing import pack_images
from vitzoo.timm_compat import from_timm

TOL = 1e-4
BEIT = ["beit_base_patch16_224", "beit_base_patch16_384", "beit_large_patch16_224", "beit_large_patch16_384",
        "beit_large_patch16_512", "beitv2_base_patch16_224", "beitv2_large_patch16_224"]
RELPOS = ["test_vit_relpos", "vit_relpos_base_patch16_224", "vit_relpos_base_patch16_cls_224",
          "vit_relpos_base_patch16_clsgap_224", "vit_relpos_base_patch16_plus_240", "vit_relpos_base_patch16_rpn_224",
          "vit_relpos_base_patch32_plus_rpn_256", "vit_relpos_medium_patch16_224", "vit_relpos_medium_patch16_cls_224",
          "vit_relpos_medium_patch16_rpn_224", "vit_relpos_small_patch16_224", "vit_relpos_small_patch16_rpn_224",
          "vit_srelpos_medium_patch16_224", "vit_srelpos_small_patch16_224"]


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """timm starts tables, q/v biases and LayerScale at zero or 1e-6, which would hide them: random values instead
    (norm weights near 1)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "table" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def assert_twin(reference: torch.nn.Module, model: torch.nn.Module) -> None:
    """``model`` holds ``reference``'s weights and gives its features and logits (fp32, <= TOL)."""
    x = torch.randn(2, 3, *reference.patch_embed.img_size)
    with torch.no_grad():
        feats, feats_ref = model.forward_features(x), reference.forward_features(x)
        logits, logits_ref = model.forward_head(feats), reference.forward_head(feats_ref)
    assert (feats - feats_ref).abs().max() <= TOL
    assert (logits - logits_ref).abs().max() <= TOL


@pytest.fixture
def no_init(monkeypatch):
    """Truncated-normal init does nothing: on the meta device there are no values, and torch's meta kernels for it
    cost more than building the model."""
    for module in (torch.nn.init, timm.models.beit, timm.models.vision_transformer):
        monkeypatch.setattr(module, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)


@pytest.mark.usefixtures("no_init")
@pytest.mark.parametrize("name", BEIT + RELPOS)
def test_full_size_structure_matches_timm(name):
    with torch.device("meta"):
        reference, model = timm.create_model(name), vitzoo.create_model(name)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    for key in ("input_size", "mean", "std", "crop_pct"):
        assert model.pretrained_cfg[key] == pytest.approx(reference.pretrained_cfg[key])
    assert model.pretrained_cfg.get("hf_hub_id") == reference.pretrained_cfg.get("hf_hub_id")


@pytest.mark.parametrize("name,sizes", [
    ("test_vit_relpos", {}),                                # relpos_mlp, LayerScale, average pooling with fc_norm
    ("vit_relpos_medium_patch16_cls_224", {"img_size": 96}),  # class token (no bias on it), token pooling
    ("vit_relpos_small_patch16_rpn_224", {"img_size": 96}),   # res-post-norm blocks, norm before average pooling
    ("vit_srelpos_small_patch16_224", {"img_size": 96}),      # one MLP shared by all blocks (attn_bias)
    ("beit_base_patch16_224", {"img_size": 96, "embed_dim": 192, "num_heads": 3}),  # BEiT: q/v biases, class rows
])
def test_outputs_match_timm(name, sizes):
    torch.manual_seed(0)
    reference = randomized(timm.create_model(name, depth=2, **sizes).eval())
    model = vitzoo.create_model(name, depth=2, **sizes).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert_twin(reference, model)


def test_relative_index_is_timms():
    for grid, prefix in (((3, 5), 0), ((4, 4), 1), ((2, 3), 1)):
        assert torch.equal(relative_index(grid, prefix), gen_relative_position_index(grid, class_token=bool(prefix)))


@pytest.mark.parametrize("changes", [
    {"attn": "relpos_bias"}, {"attn": {"name": "relpos_mlp", "mode": "swin"}}, {"attn": "beit"},
    {"attn_bias": "relpos_mlp"}, {"attn_bias": "relpos_bias", "attn": "relpos_mlp"},
])
def test_entries_work_in_other_models(changes):
    model = vitzoo.create_model("vit_pico_patch4_32", **changes)
    out = model(torch.randn(2, 3, 32, 32))
    out.square().mean().backward()
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


def test_shared_mlp_takes_any_grid():
    """A shared MLP over offsets is computed for the grid of the images fed (timm rebuilds it the same way)."""
    model = vitzoo.create_model("vit_pico_patch4_32", attn_bias="relpos_mlp", dynamic_img_size=True)
    assert model(torch.randn(1, 3, 24, 40)).shape == (1, model.num_classes)


def test_refusals():
    with pytest.raises(ValueError, match="dynamic_img_size=False"):
        vitzoo.create_model("vit_pico_patch4_32", attn="relpos_mlp", dynamic_img_size=True)
    with pytest.raises(ValueError, match="grid=.* differs"):
        vitzoo.create_model("vit_pico_patch4_32", attn={"name": "beit", "grid": (3, 3)})
    table = vitzoo.create_model("vit_pico_patch4_32", attn_bias="relpos_bias", dynamic_img_size=True)
    with pytest.raises(ValueError, match="laid out for a \\(8, 8\\) patch grid"):
        table(torch.randn(1, 3, 24, 40))
    images = [torch.randn(3, 16, 16), torch.randn(3, 8, 12)]
    for changes in ({"attn": "relpos_bias"}, {"attn_bias": "relpos_mlp"}):
        model = vitzoo.create_model("vit_pico_patch4_32", **changes)
        with pytest.raises(ValueError, match="not patch sequences"):
            model(pack_images(images, 4)[0])


@pytest.mark.parametrize("name,kwargs", [
    ("test_vit_relpos", dict(depth=2, rel_pos_type="bias", class_token=True, global_pool="token", fc_norm=False,
                             qkv_bias=True, qk_norm=True)),
    ("test_vit_relpos", dict(depth=2, rel_pos_type="mlp_swin", rel_pos_dim=32, img_size=(96, 128),
                             block_fn=ResPostRelPosBlock, global_pool="")),
    ("vit_srelpos_small_patch16_224", dict(depth=2, embed_dim=96, num_heads=3, rel_pos_type="bias", img_size=64,
                                           class_token=True)),
    ("beit_base_patch16_224", dict(depth=2, embed_dim=96, num_heads=3, img_size=(64, 96), use_abs_pos_emb=True,
                                   global_pool="token", scale_mlp=True, qkv_bias=False)),
    ("beit_base_patch16_224", dict(depth=2, embed_dim=96, num_heads=3, img_size=64, use_rel_pos_bias=False,
                                   use_abs_pos_emb=True, init_values=None, swiglu_mlp=True)),
])
def test_from_timm_with_non_default_arguments(name, kwargs):
    torch.manual_seed(0)
    reference = randomized(timm.create_model(name, **kwargs).eval())
    assert_twin(reference, from_timm(reference).eval())


def test_from_timm_refuses_beits_shared_table():
    with torch.device("meta"):
        reference = timm.create_model("beit_base_patch16_224", depth=1, use_shared_rel_pos_bias=True)
    with pytest.raises(ValueError, match="use_shared_rel_pos_bias"):
        from_timm(reference)


def test_tables_resampled_on_load_as_timm_does():
    """Weights of a 64-pixel BEiT in a 96-pixel one: each table resampled to the new grid as timm's loader does."""
    from timm.models.beit import checkpoint_filter_fn

    from vitzoo.weights import load_weights

    sizes = dict(depth=1, embed_dim=96, num_heads=3)
    torch.manual_seed(0)
    weights = randomized(timm.create_model("beit_base_patch16_224", img_size=64, **sizes)).state_dict()
    reference = timm.create_model("beit_base_patch16_224", img_size=96, **sizes).eval()
    reference.load_state_dict(checkpoint_filter_fn(weights, reference))
    model = vitzoo.create_model("beit_base_patch16_224", img_size=96, **sizes).eval()
    assert "blocks.0.attn.relative_position_bias_table: resampled" in str(load_weights(model, weights))
    assert_twin(reference, model)


def test_beits_own_release_layout_loads(tmp_path):
    """A checkpoint as BEiT's own code saves it (unilm: under "model", with the relative-position index buffers
    timm recomputes) loads into the registry model as it is."""
    from timm.models.beit import checkpoint_filter_fn

    sizes = dict(depth=2, embed_dim=96, num_heads=3, img_size=64)
    torch.manual_seed(0)
    reference = randomized(timm.create_model("beit_base_patch16_224", **sizes)).eval()
    upstream = dict(reference.state_dict())
    for i in range(2):
        upstream[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    assert checkpoint_filter_fn({"model": upstream}, reference).keys() == reference.state_dict().keys()
    torch.save({"model": upstream}, tmp_path / "beit_unilm.pth")
    model = vitzoo.create_model("beit_base_patch16_224", pretrained=str(tmp_path / "beit_unilm.pth"), **sizes).eval()
    assert_twin(reference, model)
