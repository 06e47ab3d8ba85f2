"""Foreign checkpoints (torchvision, HF transformers, JAX .npz, vit-pytorch) load and match the source model."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from vitzoo import VisionTransformer, ViTSpec
from vitzoo.weights import WeightsError, load_pretrained, spec_hints, to_timm_layout, write_state_dict
from vitzoo.weights.files import read_state_dict

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
TOL = 1e-4


def _randomize(model: nn.Module) -> nn.Module:
    """Random values everywhere: zero-initialised heads would make any comparison pass."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.2)
    return model.eval()


def _vitzoo_from(path, **changes) -> tuple[VisionTransformer, list[str]]:
    converted, source, _ = to_timm_layout(read_state_dict(path))
    model = VisionTransformer(ViTSpec(**{**SMALL, **changes, **spec_hints(source, converted)})).eval()
    return model, load_pretrained(model, str(path)).adapted


def _assert_same_logits(ours: nn.Module, theirs, x: torch.Tensor) -> None:
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff <= TOL, diff


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_torchvision_vit(tmp_path, images):
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    source = _randomize(TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                       mlp_dim=64, num_classes=5))
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    model, report = _vitzoo_from(tmp_path / "tv.pth")
    assert report[0] == "converted from the torchvision layout"
    _assert_same_logits(model, source, images)


@pytest.mark.parametrize("distilled", [False, True])
def test_huggingface_vit_and_deit(tmp_path, images, distilled):
    import transformers as hf

    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, num_labels=5)
    source = (hf.DeiTForImageClassificationWithTeacher(hf.DeiTConfig(**kwargs)) if distilled
              else hf.ViTForImageClassification(hf.ViTConfig(**kwargs)))
    source = _randomize(source)
    source.save_pretrained(tmp_path / "hf")  # the hub's file layout
    for path in (tmp_path / "hf" / "model.safetensors", tmp_path / "memory.safetensors"):
        if path.name == "memory.safetensors":  # transformers' in-memory layout, as a user's state_dict
            write_state_dict(source.state_dict(), path)
        model, report = _vitzoo_from(path, dist_token=distilled)
        assert report[0].startswith("converted from the Hugging Face ViT/DeiT layout")
        _assert_same_logits(model, lambda x: source(pixel_values=x).logits, images)


def test_big_vision_npz_loads_like_timm(tmp_path, images):
    """A JAX checkpoint with big_vision's names and shapes: timm's own npz reader is the reference."""
    d, heads, mlp, p = 32, 2, 64, 8
    rng = np.random.default_rng(0)
    arrays = {"cls": (1, 1, d), "embedding/kernel": (p, p, 3, d), "embedding/bias": (d,),
              "Transformer/posembed_input/pos_embedding": (1, 17, d), "Transformer/encoder_norm/scale": (d,),
              "Transformer/encoder_norm/bias": (d,), "head/kernel": (d, 5), "head/bias": (5,)}
    for i in range(2):
        block = f"Transformer/encoderblock_{i}/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays |= {f"{block}{norm}/scale": (d,), f"{block}{norm}/bias": (d,)}
        for part in ("query", "key", "value"):
            attn = f"{block}MultiHeadDotProductAttention_1/{part}/"
            arrays |= {attn + "kernel": (d, heads, d // heads), attn + "bias": (heads, d // heads)}
        arrays |= {f"{block}MultiHeadDotProductAttention_1/out/kernel": (heads, d // heads, d),
                   f"{block}MultiHeadDotProductAttention_1/out/bias": (d,),
                   f"{block}MlpBlock_3/Dense_0/kernel": (d, mlp), f"{block}MlpBlock_3/Dense_0/bias": (mlp,),
                   f"{block}MlpBlock_3/Dense_1/kernel": (mlp, d), f"{block}MlpBlock_3/Dense_1/bias": (d,)}
    np.savez(tmp_path / "augreg.npz", **{k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in arrays.items()})
    reference = timm.create_model("vit_tiny_patch16_224", **SMALL).eval()
    timm.models.vision_transformer._load_weights(reference, str(tmp_path / "augreg.npz"))
    model, report = _vitzoo_from(tmp_path / "augreg.npz")
    assert report[0] == "converted from the JAX/Flax big_vision .npz layout"
    _assert_same_logits(model, reference, images)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch(tmp_path, images, pool):
    from vit_pytorch import ViT

    source = _randomize(ViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, dim_head=16,
                            mlp_dim=64, pool=pool))
    torch.save(source.state_dict(), tmp_path / "lucid.pt")
    model, _ = _vitzoo_from(tmp_path / "lucid.pt")
    assert model.spec.class_token == (pool == "cls")
    _assert_same_logits(model, source, images)


def test_unknown_layout_names_the_closest_one():
    state_dict = {"encoder.layers.0.attn.weight": torch.zeros(2), "class_token": torch.zeros(1, 1, 2),
                  "conv_proj.weight": torch.zeros(2, 3, 1, 1)}
    with pytest.raises(WeightsError, match=r"unknown checkpoint layout.*Closest known layout: torchvision \(2 of 3 "
                                           r"keys match\); keys that match none of its names: encoder.layers.0"):
        to_timm_layout(state_dict)
