"""Patch sequences: images at their own size, packed several to a row, give what each gives alone."""

from __future__ import annotations

import pytest
import torch

import vitzoo
from vitzoo.packing import budget_size, image_patches, output_order, pack_images

# one name per way a model adds positions: learned table with prefix rows, without (registers), RoPE axial,
# per-layer mixed RoPE, DINOv3 RoPE, EVA-02; pooling by token, distillation head, MAP, average
KINDS = ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2", "vit_small_patch16_rope_224",
         "vit_base_patch16_rope_mixed_224", "vit_large_patch16_dinov3", "eva02_tiny_patch14_224",
         "deit_tiny_distilled_patch16_224", "vit_base_patch16_siglip_224", "vit_base_patch16_rope_reg1_gap_256"]
GRIDS = [(2, 3), (4, 2), (1, 1), (3, 5), (6, 4)]  # five sizes, in patches


def _model(name: str) -> vitzoo.VisionTransformer:
    torch.manual_seed(0)
    return vitzoo.create_model(name, naflex=True, depth=2, embed_dim=96, num_heads=4).eval()


def _images(patch: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(3, h * patch, w * patch) for h, w in GRIDS]


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("seq_len", [None, 40], ids=["row_per_image", "packed"])
def test_packed_images_match_each_image_alone(name: str, seq_len: int | None) -> None:
    model = _model(name)
    images = _images(model.spec.patch_size)
    with torch.no_grad():
        alone = torch.cat([model(image[None]) for image in images])
        batch, placements = pack_images(images, model.spec.patch_size, seq_len=seq_len)
        packed = model(batch)
    assert ("patch_image" in batch) == (seq_len is not None)
    torch.testing.assert_close(packed, alone[output_order(placements)], rtol=0, atol=1e-4)


def test_packed_training_step_matches_gradients_of_each_image_alone() -> None:
    model = _model("vit_tiny_patch16_224").train()
    images = _images(16)
    batch, placements = pack_images(images, 16, seq_len=40)
    model(batch).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model(image[None]).sum() for image in images).backward()
    for name, param in model.named_parameters():
        scale = param.grad.abs().max().item()  # sums over thousands of tokens: float32 noise grows with them
        torch.testing.assert_close(packed[name], param.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_features_and_head_take_the_sequence_dict() -> None:
    model = _model("vit_small_patch14_reg4_dinov2")
    batch, _ = pack_images(_images(14), 14, seq_len=40)
    with torch.no_grad():
        features = model.forward_features(batch)
        assert features["patches"].shape == (5, 5 + 24, 96)  # 5 prefix tokens, the longest image has 24 patches
        assert features["patch_valid"].sum(1).tolist() == [h * w for h, w in GRIDS]
        torch.testing.assert_close(model.forward_head(features), model(batch))


def test_padding_rows_and_padding_patches_change_nothing() -> None:
    model = _model("vit_tiny_patch16_224")
    images = _images(16)
    with torch.no_grad():
        tight, placements = pack_images(images, 16, seq_len=40)
        loose, again = pack_images(images, 16, seq_len=64, rows=4)
        torch.testing.assert_close(model(tight)[torch.argsort(torch.tensor(output_order(placements)))],
                                   model(loose)[torch.argsort(torch.tensor(output_order(again)))])


def test_ordinary_weights_run_as_sequences_without_dynamic_size() -> None:
    """Patch sequences need no flag: a fixed-size model reads them with its own weights."""
    torch.manual_seed(0)
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=1).eval()
    image = torch.randn(3, 224, 224)
    batch, _ = pack_images([image], 16)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(image[None]), rtol=0, atol=1e-4)


def test_image_patches_are_row_major_with_coordinates() -> None:
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    patches, coords = image_patches(image, 2)
    assert patches.shape == (6, 12) and coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert patches[1].tolist()[:3] == image[:, 0, 2].tolist()  # (p, p, c): the channels of one pixel first


def test_budget_size_keeps_the_aspect_ratio_within_the_budget() -> None:
    assert budget_size(480, 640, 16, 256) == (208, 288)  # 13 x 18 = 234 patches, 4:3 kept as near as whole patches
    h, w = budget_size(100, 3000, 16, 64)
    assert (h // 16) * (w // 16) <= 64 and h == 16


@pytest.mark.parametrize(("batch", "problem"), [
    ({"patches": torch.zeros(1, 4, 768)}, "missing"),
    ({"patches": torch.zeros(1, 4, 700), "patch_coord": torch.zeros(1, 4, 2, dtype=torch.long),
      "patch_valid": torch.ones(1, 4, dtype=torch.bool)}, r"patches must be \(B, L, 768\)"),
    ({"patches": torch.zeros(1, 4, 768), "patch_coord": torch.zeros(1, 4, 2),
      "patch_valid": torch.ones(1, 4, dtype=torch.bool)}, "torch.long"),
    ({"patches": torch.zeros(1, 4, 768), "patch_coord": torch.zeros(1, 3, 2, dtype=torch.long),
      "patch_valid": torch.ones(1, 4, dtype=torch.bool)}, r"patch_coord must be \(1, 4, 2\)"),
])
def test_bad_sequence_batches_say_what_is_wrong(batch: dict, problem: str, bad_input) -> None:
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=1)
    with pytest.raises((KeyError, ValueError, TypeError), match=problem) as err:
        model(batch)
    given = ", ".join(f"{k}: {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in batch.items())
    bad_input("model(patch sequences)", given, str(err.value).strip('"'))


def test_pack_refuses_an_image_longer_than_a_row(bad_input) -> None:
    with pytest.raises(ValueError, match="more than seq_len=4") as err:
        pack_images([torch.zeros(3, 48, 32)], 16, seq_len=4)
    bad_input("pack_images", "a 48x32 image, patch 16, seq_len=4", str(err.value))


def test_hybrid_stems_refuse_patch_sequences(bad_input) -> None:
    model = vitzoo.create_model("vit_tiny_r_s16_p8_224", depth=1)
    batch, _ = pack_images([torch.zeros(3, 32, 32)], 32)
    with pytest.raises(ValueError, match="cannot embed patches one at a time") as err:
        model(batch)
    bad_input("model(patch sequences)", "vit_tiny_r_s16_p8_224 (ResNet stem)", str(err.value))


@pytest.mark.parametrize("name", vitzoo.list_models("naflexvit*"))
def test_naflexvit_names_are_timms(name: str) -> None:
    """timm's NaFlexVit checkpoints load unchanged, and images, timm's sequence batches and packed rows give
    timm's outputs (at a reduced size; docs/parity.md compares them at full width)."""
    import timm

    from vitzoo.validate import sequence_diffs

    small = dict(depth=1, embed_dim=64, num_heads=4)
    torch.manual_seed(0)
    reference = timm.create_model(name, **small).eval()
    model = vitzoo.create_model(name, **small).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert set(model.state_dict()) == set(reference.state_dict())
    assert model.pretrained_cfg["first_conv"] == reference.pretrained_cfg["first_conv"] == "embeds.proj"
    images = torch.randn(2, 3, 224, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-4)
    assert max(sequence_diffs(model, reference).values()) <= 1e-4
