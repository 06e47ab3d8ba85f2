"""Gemma 4 vision towers (timm's Gemma4VitClassifier / Gemma4VitEncoder): keys at full size, outputs at small size
(clamps and standardization at values that change the output), the new entries in another model, from_timm."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import vitzoo
from tests.conftest import meta_twins
from vitzoo.registry import list_models
from vitzoo.timm_compat import from_timm
from vitzoo.validate import _shapes, _structure_problem

NAMES = [n for n in list_models() if n.startswith("gemma4_vit_")]
# the same small architecture on both sides: 2 blocks of width 64, 2 heads, 6 x 6 patches, tables of 32 rows
OURS = {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 1.5, "img_size": 96, "pos_embed": {"size": 32}}
THEIRS = {"depth": 2, "embed_dim": 64, "num_heads": 2, "head_dim": 32, "intermediate_size": 96,
          "position_embedding_size": 32}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Finite clamp ranges (timm starts them at +-inf) and a standardization that is not the identity."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("input_min", "input_max")):
                buffer.fill_(-2.0 if name.endswith("min") else 2.0)
            elif name.endswith(("output_min", "output_max")):
                buffer.fill_(-0.5 if name.endswith("min") else 0.5)
            elif name.endswith(("std_bias", "std_scale")):
                buffer.normal_()
    return model


def test_family_names() -> None:
    assert sorted(NAMES) == ["gemma4_vit_167m", "gemma4_vit_167m_enc", "gemma4_vit_570m", "gemma4_vit_570m_enc"]


@pytest.mark.parametrize("name", NAMES)
def test_keys_and_shapes_match_timm(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, model = meta_twins(name)
    assert not _structure_problem(_shapes(reference), _shapes(model))


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_timm(name: str) -> None:
    torch.manual_seed(0)
    reference = _perturbed(timm.create_model(name, **THEIRS)).eval()
    model = vitzoo.create_model(name, **OURS).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4
        assert (model.forward_features(x) - reference.forward_features(x)).abs().max() <= 1e-4


def test_entries_in_another_model() -> None:
    x, small = torch.rand(1, 3, 96, 96), {"depth": 2, "img_size": 96, "num_classes": 10}
    gemma_like = {"attn": "normed_qkv", "mlp": "geglu_tanh_proj", "block": "sandwich", "rope": "axial_split",
                  "patch_embed": "signed_linear", "pos_embed": "axis_tables"}
    model = vitzoo.create_model("vit_tiny_patch16_224", **gemma_like, **small)  # with its class token
    assert model(x).shape == (1, 10)
    keys = model.state_dict()
    assert "patch_embed.position_embedding_table" in keys and "blocks.1.norm4.weight" in keys
    assert "blocks.0.attn.o_proj.linear.weight" in keys and "blocks.0.mlp.gate_proj.linear.weight" in keys
    cells = vitzoo.create_model("vit_tiny_patch16_224", class_token=False, pool={"name": "cell_mean", "cell": 2},
                                **{**small, "num_classes": 0})
    assert cells(x).shape == (1, 9, 192)
    with pytest.raises(ValueError, match="class_token=False"):
        vitzoo.create_model("vit_tiny_patch16_224", pool="cell_mean", **small)
    with pytest.raises(ValueError, match="not divisible by the cell"):
        vitzoo.create_model("vit_tiny_patch16_224", class_token=False, pool="cell_mean", depth=1, img_size=64)
    dynamic = vitzoo.create_model("vit_tiny_patch16_224", class_token=False, pool="cell_mean", depth=1, img_size=96,
                                  dynamic_img_size=True, num_classes=0)
    assert dynamic(torch.rand(1, 3, 144, 144)).shape == (1, 9, 192)  # another square size: its own grid
    with pytest.raises(ValueError, match="not divisible by the cell"):
        dynamic(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match="feed square images"):
        dynamic(torch.rand(1, 3, 96, 144))


def test_rotation_matches_timm() -> None:
    """axial_split turns q as timm's Gemma 4 2-D RoPE does (x first, rotate-half in each half of the head)."""
    from timm.models.gemma4_vit import Gemma4RotaryEmbedding2D, apply_multidimensional_rope

    from vitzoo.blocks.rope import AxialSplitRope, RopeOptions, rotate

    q = torch.randn(1, 3 * 5, 2, 24)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None]
    cos, sin = Gemma4RotaryEmbedding2D(24)(q, coords)
    expected = apply_multidimensional_rope(q, cos, sin)
    rotation = AxialSplitRope(24, (3, 5), 0, options=RopeOptions(xy=True))((3, 5))
    ours = rotate(q.transpose(1, 2), rotation).transpose(1, 2)
    assert (ours - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("name,kwargs", [
    ("gemma4_vit_167m", {"num_classes": 5, "norm_eps": 1e-5, "rope_theta": 50.0, "final_norm": False}),
    ("gemma4_vit_570m", {"standardize": True, "use_clipped_linears": True, "drop_path_rate": 0.1}),
    ("gemma4_vit_570m_enc", {"pooling_kernel_size": 2}),
    ("gemma4_vit_167m_enc", {"global_pool": "avg", "standardize": False}),
    ("gemma4_vit_167m", {"num_classes": 5, "global_pool": ""}),  # each token normed and classified
])
def test_from_timm_round_trip(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    reference = _perturbed(timm.create_model(name, **{**THEIRS, **kwargs})).eval()
    reference.pretrained_cfg = {**reference.pretrained_cfg, "input_size": (3, 96, 96)}
    model = from_timm(reference).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4
    rebuilt = vitzoo.VisionTransformer(vitzoo.ViTSpec.from_dict(model.spec.to_dict()))
    rebuilt.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("kwargs,argument", [
    ({"num_kv_heads": 1}, "num_kv_heads"), ({"encoder_pool": "soft"}, "encoder_pool"),
    ({"head_dim": 16}, "head_dim"),
])
def test_from_timm_refuses_what_it_cannot_express(kwargs: dict, argument: str) -> None:
    reference = timm.create_model("gemma4_vit_167m", **{**THEIRS, **kwargs})
    with pytest.raises(ValueError, match=argument):
        from_timm(reference)


@pytest.mark.parametrize("name,clamp,standardize", [
    ("gemma4_vit_167m", True, False),  # the classifier: the tower's tensors go under "encoder."
    ("gemma4_vit_570m_enc", False, True),
])
def test_release_layout_loads_like_timm(tmp_path, name: str, clamp: bool, standardize: bool) -> None:
    """Gemma 4's vision tower as transformers saves it (``model.vision_tower.*`` of Gemma4ForConditionalGeneration,
    written here by transformers' own Gemma4VisionModel, with the language model and the projector beside it):
    timm's loader reads it to timm's model, and ``create_model(pretrained=FILE)`` converts it and gives timm's
    outputs."""
    from timm.models.gemma4_vit import checkpoint_filter_fn_classifier, checkpoint_filter_fn_encoder
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    from vitzoo.weights import write_state_dict

    torch.manual_seed(0)
    config = Gemma4VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32, position_embedding_size=32,
                                use_clipped_linears=clamp, standardize=standardize)
    tower = _perturbed(Gemma4VisionModel(config))
    with torch.no_grad():
        for name_, tensor in tower.named_parameters():  # norms away from their start, so a swap would show
            tensor.normal_(std=0.3 if name_.endswith("proj.linear.weight") else 1.0)
    upstream = {"model.language_model.embed_tokens.weight": torch.randn(10, 8),
                "model.embed_vision.embedding_projection.weight": torch.randn(8, 64),
                **{f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}}
    write_state_dict(upstream, tmp_path / "gemma4.safetensors")

    reference = timm.create_model(name, **THEIRS).eval()
    read = (checkpoint_filter_fn_encoder if name.endswith("_enc") else checkpoint_filter_fn_classifier)(
        upstream, reference)
    reference.load_state_dict(read, strict=True)
    model = vitzoo.create_model(name, pretrained=str(tmp_path / "gemma4.safetensors"), **OURS).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4
