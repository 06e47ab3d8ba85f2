"""Every entry of every slot table runs forward and backward; block-level properties."""

from __future__ import annotations

import pytest
import timm.layers
import torch
from torch import nn

import vitzoo
from tests.conftest import entry_changes
from vitzoo.blocks import SLOTS, register_block, slot_table
from vitzoo.blocks.position import LearnedPosition, resample_table
from vitzoo.spec import ViTSpec

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def _spec_for(slot: str, name: str) -> ViTSpec:
    changes = entry_changes(slot, name)
    if slot == "pool" and name == "none":
        changes["num_classes"] = 0
    keywords = getattr(slot_table(slot).get(name), "keywords", {})
    reduction = keywords.get("reduction")
    if reduction:  # a CNN stem: one patch per stem output stride, a 2 x 2 grid
        changes.update(patch_size=reduction, img_size=2 * reduction)
    if keywords.get("proj") is False:  # the stem ends at the token width
        changes["embed_dim"] = keywords["channels"]
    return ViTSpec(**SMALL).replace(**changes)


@pytest.mark.parametrize("slot,name", [(slot, name) for slot, table in SLOTS.items() for name in table])
def test_every_table_entry_trains(slot, name):
    torch.manual_seed(0)
    spec = _spec_for(slot, name)
    model = vitzoo.VisionTransformer(spec)
    x = torch.randn(3, 3, *spec.img_size)
    out = model(x)
    expected = {("pool", "none"): (3, 16, 32), ("pool", "cell_mean"): (3, 4, 5)}.get((slot, name), (3, 5))
    assert out.shape == expected and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def linear_and_conv(patch_size: int, in_chans: int, dim: int) -> tuple[nn.Module, nn.Module]:
    """The ``linear`` and ``conv`` patch embeddings carrying the same weights."""
    torch.manual_seed(0)
    linear = slot_table("patch_embed").get("linear")(patch_size, in_chans, dim, nn.LayerNorm)
    conv = slot_table("patch_embed").get("conv")(patch_size, in_chans, dim, nn.LayerNorm)
    conv.load_state_dict(linear.state_dict())
    return linear, conv


def test_patch_embed_entries_agree():
    linear, conv = linear_and_conv(8, 3, 16)
    x = torch.randn(2, 3, 32, 48)
    assert linear(x).shape == (2, 4, 6, 16)
    torch.testing.assert_close(linear(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_patch_embed_backward_matches_autograd_and_keeps_no_patch_copy(autocast):
    """The weight gradient re-cuts the patches from the image, so the only tensor saved for backward
    that is as large as the image is the image itself, and gradients equal plain autograd's."""
    from vitzoo.blocks.patch import patchify

    torch.manual_seed(0)
    embed = slot_table("patch_embed").get("linear")(4, 3, 16, nn.LayerNorm)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)

    def grads(forward):
        saved = []

        def keep(tensor):
            saved.append(tensor)
            return tensor

        embed.zero_grad()
        images.grad = None
        with (torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
              torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)):
            out = forward()
        out.float().square().sum().backward()
        grads = [images.grad, embed.proj.weight.grad, embed.proj.bias.grad]
        return out, [g.clone() for g in grads], saved

    def plain_autograd():
        return torch.nn.functional.linear(patchify(images, 4), embed.weight_matrix(), embed.proj.bias)

    out, got, saved = grads(lambda: embed(images))
    ref_out, want, _ = grads(plain_autograd)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    image_sized = [t for t in saved if t.numel() >= images.numel()]
    assert len(image_sized) == 1 and image_sized[0].data_ptr() == images.data_ptr()


def test_linear_patch_embed_supports_per_sample_gradients():
    """``torch.func.vmap(grad(...))`` over the custom backward gives the conv entry's per-sample gradients."""
    from torch.func import functional_call, grad, vmap

    linear, conv = linear_and_conv(4, 3, 8)
    images = torch.randn(5, 3, 8, 8)

    def per_sample(module):
        def loss(params, image):
            return functional_call(module, params, (image[None],)).square().sum()
        return vmap(grad(loss), in_dims=(None, 0))(dict(module.named_parameters()), images)

    got, want = per_sample(linear), per_sample(conv)
    assert got["proj.weight"].shape == (5, 8, 3, 4, 4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)


def test_per_layer_choices_build_those_blocks():
    spec = ViTSpec(**SMALL).replace(
        depth=4, mlp=("gelu", "gelu", "swiglu", "swiglu"), block=["prenorm", "parallel", "prenorm", "postnorm"]
    )
    model = vitzoo.VisionTransformer(spec)
    kinds = [(type(b).__name__, type(b.mlp).__name__) for b in model.blocks]
    assert kinds == [
        ("PreNormBlock", "Mlp"), ("ParallelBlock", "Mlp"), ("PreNormBlock", "GatedMlp"), ("PostNormBlock", "GatedMlp")
    ]
    model(torch.randn(1, 3, 32, 32)).sum().backward()


def test_resampling_to_the_same_grid_is_identity():
    table = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(resample_table(table, (14, 14), (14, 14), 1), table)


@pytest.mark.parametrize("new_grid,num_prefix", [((24, 24), 1), ((18, 18), 1), ((12, 20), 0), ((20, 9), 5)])
def test_resampling_matches_timm(new_grid, num_prefix):
    table = torch.randn(1, num_prefix + 14 * 14, 16)
    ours = resample_table(table, (14, 14), new_grid, num_prefix)
    theirs = timm.layers.resample_abs_pos_embed(table, new_grid, (14, 14), num_prefix_tokens=num_prefix)
    assert ours.shape == (1, num_prefix + new_grid[0] * new_grid[1], 16)
    assert (ours - theirs).abs().max() <= 1e-5


def test_learned_position_resamples_in_forward():
    pos = LearnedPosition((4, 4), 8, num_prefix=1)
    table = pos.init_table()
    assert table.shape == (1, 17, 8)
    assert pos(table, (4, 4)) is table
    assert pos(table, (6, 2)).shape == (1, 13, 8)


def test_sincos_is_fixed_and_follows_the_grid():
    model = vitzoo.VisionTransformer(ViTSpec(**SMALL, pos_embed="sincos2d", dynamic_img_size=True))
    assert "pos_embed" not in model.state_dict()
    emb = model.position(None, (4, 4))
    assert emb.shape == (1, 17, 32) and torch.all(emb[:, 0] == 0)
    assert model(torch.randn(1, 3, 48, 32)).shape == (1, 5)


def test_drop_path_and_dropout_only_act_in_training():
    model = vitzoo.VisionTransformer(ViTSpec(**SMALL, drop={"path": 0.5, "proj": 0.3}, block={"layer_scale": 0.1}))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_unknown_block_lists_valid_names():
    with pytest.raises(ValueError, match="unknown mlp block 'swigl'; closest: swiglu"):
        slot_table("mlp").get("swigl")
    with pytest.raises(ValueError, match="unknown block slot"):
        slot_table("mlpp")


def test_registered_block_is_usable_by_name():
    @register_block("mlp", "squared_relu_test")
    class SquaredReluMlp(nn.Module):
        """fc1 -> relu^2 -> fc2 (Primer)."""

        def __init__(self, dim, hidden_dim, norm, drop):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)

        def forward(self, x):
            return self.fc2(self.fc1(x).relu().square())

    try:
        model = vitzoo.create_model("vit_tiny_patch16_224", mlp="squared_relu_test", depth=1)
        assert isinstance(model.blocks[0].mlp, SquaredReluMlp)
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        with pytest.raises(ValueError, match="already registered"):
            register_block("mlp", "squared_relu_test")(SquaredReluMlp)
        assert slot_table("mlp").describe()["squared_relu_test"] == "fc1 -> relu^2 -> fc2 (Primer)."
    finally:
        slot_table("mlp").unregister("squared_relu_test")


def test_patch_dropout_keeps_prefix_and_a_fraction_of_patches():
    model = vitzoo.VisionTransformer(ViTSpec(**SMALL, drop={"patch": 0.5}, reg_tokens=2))
    x = torch.randn(3, 3, 32, 32)
    model.train()
    tokens, _ = model._embed(x)
    assert tokens.shape == (3, 3 + 8, 32)
    full, _ = model.eval()._embed(x)
    assert torch.equal(tokens[:, :3], full[:, :3])
    assert all(any(torch.equal(t, f) for f in full[i, 3:]) for i in range(3) for t in tokens[i, 3:])
    model.train()(x).sum().backward()


@pytest.mark.parametrize("name", ["axial", "dinov3"])
def test_rope_scores_depend_on_relative_position_only(name):
    """RoPE (Su et al. 2021): q.k after rotation depends on the offset between two patches, not on where
    they are; prefix tokens are not rotated; a new grid is built on the fly."""
    from vitzoo.blocks.rope import rotate

    rope = slot_table("rope").get(name)(8, (4, 4), 1)
    tokens = torch.randn(2, 17, 8)
    q, k = (rotate(t.expand(17, 8), rope((4, 4))) for t in torch.randn(2, 1, 8))

    def at(r: int, c: int) -> int:
        return 1 + 4 * r + c

    assert torch.allclose(q[at(0, 0)] @ k[at(1, 2)], q[at(2, 1)] @ k[at(3, 3)], atol=1e-5)
    assert torch.equal(rotate(tokens, rope((4, 4)))[:, 0], tokens[:, 0])
    assert rope((2, 3)).cos.shape == (1 + 6, 8)
