"""Foreign checkpoints (torchvision, HF transformers, JAX .npz, vit-pytorch) load and match the source model."""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import pytest
import timm
import torch
from torch import nn

import vitzoo
from vitzoo import VisionTransformer, ViTSpec
from vitzoo.weights import WeightsError, load_pretrained, spec_hints, to_timm_layout, write_state_dict
from vitzoo.weights.files import read_state_dict
from vitzoo.weights.load import mismatch_message

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
    model = VisionTransformer(ViTSpec(**SMALL).replace(**changes, **spec_hints(source, converted))).eval()
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


@pytest.mark.parametrize(("model_class", "config_class", "extra", "tokens"), [
    ("ViTForImageClassification", "ViTConfig", {}, {}),
    ("ViTForImageClassification", "ViTConfig", {"qkv_bias": False}, {}),
    ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {}, {"dist_token": True}),
    ("DeiTForImageClassification", "DeiTConfig", {}, {"reg_tokens": 1}),  # its distillation token: read by no head
], ids=["vit", "vit_no_qkv_bias", "deit_teacher", "deit"])
def test_huggingface_vit_and_deit(tmp_path, images, model_class, config_class, extra, tokens):
    """The converted checkpoint's spec hints (tokens, qkv bias, epsilon) with the sizes rebuild HF's model."""
    import transformers as hf

    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, num_labels=5, **extra)
    source = _randomize(getattr(hf, model_class)(getattr(hf, config_class)(**kwargs)))
    source.save_pretrained(tmp_path / "hf")  # the hub's file layout
    for path in (tmp_path / "hf" / "model.safetensors", tmp_path / "memory.safetensors"):
        if path.name == "memory.safetensors":  # transformers' in-memory layout, as a user's state_dict
            write_state_dict(source.state_dict(), path)
        model, report = _vitzoo_from(path)
        assert report[0].startswith("converted from the Hugging Face ViT/DeiT/DINOv2 layout")
        assert (model.spec.dist_token, model.spec.reg_tokens, model.spec.get("attn.qkv_bias")) == (
            tokens.get("dist_token", False), tokens.get("reg_tokens", 0), extra.get("qkv_bias", True))
        _assert_same_logits(model, lambda x: source(pixel_values=x).logits, images)


@pytest.mark.parametrize(("model_class", "extra", "changes"), [
    ("Dinov2Model", {}, {"mlp_ratio": 4.0}),
    ("Dinov2WithRegistersModel", {"num_register_tokens": 4, "use_swiglu_ffn": True},
     {"mlp": "swiglu_packed", "mlp_ratio": 5.5}),  # HF's SwiGLU hidden width: 88, packed as 176
], ids=["dinov2", "dinov2_reg_swiglu"])
def test_huggingface_dinov2(tmp_path, images, model_class, extra, changes):
    """HF DINOv2 backbones (LayerScale, registers, SwiGLU): the hub layout and the in-memory one convert, the
    hints give DINOv2's 1e-6 epsilon and its registers, and the normed tokens equal ``last_hidden_state``."""
    import transformers as hf

    config_class = getattr(hf, model_class.replace("Model", "Config"))
    source = _randomize(getattr(hf, model_class)(config_class(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, **extra)))
    source.save_pretrained(tmp_path / "hf")
    write_state_dict(source.state_dict(), tmp_path / "memory.safetensors")
    for path in (tmp_path / "hf" / "model.safetensors", tmp_path / "memory.safetensors"):
        model, report = _vitzoo_from(path, num_classes=0, block={"layer_scale": 1.0}, **changes)
        assert report[0] == "converted from the Hugging Face ViT/DeiT/DINOv2 layout; dropped embeddings.mask_token"
        assert (model.spec.get("norm.eps"), model.spec.reg_tokens) == (1e-6, extra.get("num_register_tokens", 0))
        _assert_same_logits(model.forward_features, lambda x: source(pixel_values=x).last_hidden_state, images)


def test_huggingface_clip_and_siglip_image_towers(tmp_path, images):
    """HF CLIP's image tower with its projection (class token, pre-norm, no patch bias, 1e-5) and SigLIP's
    (no class token, attention-pooling head, 1e-6): the converted model's output equals HF's image
    embedding / pooled output, and its tokens SigLIP's ``last_hidden_state``."""
    import transformers as hf

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
    clip = _randomize(hf.CLIPVisionModelWithProjection(hf.CLIPVisionConfig(projection_dim=5, **sizes)))
    clip.save_pretrained(tmp_path / "clip")
    model, report = _vitzoo_from(tmp_path / "clip" / "model.safetensors", mlp="quick_gelu")
    assert report[0] == "converted from the Hugging Face CLIP/SigLIP vision tower layout"
    assert (model.spec.pre_norm, model.spec.get("patch_embed.bias"), model.spec.get("norm.eps")) == (True, False, 1e-5)
    _assert_same_logits(model, lambda x: clip(pixel_values=x).image_embeds, images)

    siglip = _randomize(hf.SiglipVisionModel(hf.SiglipVisionConfig(**sizes)))
    siglip.save_pretrained(tmp_path / "siglip")
    model, _ = _vitzoo_from(tmp_path / "siglip" / "model.safetensors", num_classes=0)
    spec = model.spec
    assert (spec.class_token, spec.pool.name, spec.get("norm.eps"), spec.mlp.name) == (False, "map", 1e-6,
                                                                                             "gelu_tanh")
    _assert_same_logits(model, lambda x: siglip(pixel_values=x).pooler_output, images)
    _assert_same_logits(model.forward_features, lambda x: siglip(pixel_values=x).last_hidden_state, images)


def test_huggingface_vit_model_without_head(tmp_path, images):
    """A headless ``ViTModel``: its pooler has no vitzoo counterpart and is dropped (and reported); the
    normed tokens equal HF's ``last_hidden_state``."""
    import transformers as hf

    source = _randomize(hf.ViTModel(hf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, image_size=32, patch_size=8)))
    source.save_pretrained(tmp_path / "hf")
    model, report = _vitzoo_from(tmp_path / "hf" / "model.safetensors", num_classes=0)
    assert report[0].endswith("dropped pooler.dense.bias, pooler.dense.weight")
    _assert_same_logits(model.forward_features, lambda x: source(pixel_values=x).last_hidden_state, images)


@pytest.mark.parametrize(("builder", "name"), [
    ("vit_b_16", "vit_base_patch16_224"), ("vit_b_32", "vit_base_patch32_224"),
    ("vit_l_16", "vit_large_patch16_224"), ("vit_l_32", "vit_large_patch32_224"),
    ("vit_h_14", "vit_huge_patch14_224"),
])
def test_torchvision_full_size_models_fit_the_registry(builder, name):
    """Every torchvision ViT, at full size on the ``meta`` device, converts to exactly the keys and
    shapes of the registry model of the same shape (the numerics are covered at small size above)."""
    import torchvision

    with torch.device("meta"):
        source = getattr(torchvision.models, builder)()
        model = vitzoo.create_model(name, num_classes=1000)
    converted, fmt, dropped = to_timm_layout(source.state_dict())
    assert (fmt, dropped) == ("torchvision", [])
    assert mismatch_message(model, converted) is None


@pytest.mark.parametrize("cls", [True, False], ids=["token", "gap"])
def test_big_vision_npz_loads_like_timm(tmp_path, images, cls):
    """A JAX checkpoint with big_vision's names and shapes: timm's own npz reader is the reference.
    Without ``cls`` the checkpoint is a ``gap`` model: mean of the normed patch tokens."""
    d, heads, mlp, p = 32, 2, 64, 8
    rng = np.random.default_rng(0)
    arrays = {"embedding/kernel": (p, p, 3, d), "embedding/bias": (d,),
              "Transformer/posembed_input/pos_embedding": (1, 16 + cls, d), "Transformer/encoder_norm/scale": (d,),
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
    arrays |= {"cls": (1, 1, d)} if cls else {}
    np.savez(tmp_path / "augreg.npz", **{k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in arrays.items()})
    gap = {} if cls else dict(class_token=False, global_pool="avg", fc_norm=False)
    reference = timm.create_model("vit_tiny_patch16_224", **SMALL, **gap).eval()
    timm.models.vision_transformer._load_weights(reference, str(tmp_path / "augreg.npz"))
    model, report = _vitzoo_from(tmp_path / "augreg.npz")
    assert report[0] == "converted from the JAX/Flax big_vision .npz layout"
    _assert_same_logits(model, reference, images)


@pytest.mark.parametrize(("pool", "heads"), [("cls", 2), ("mean", 2), ("cls", 1)])
def test_vit_pytorch(tmp_path, images, pool, heads):
    """vit-pytorch's ViT is vitzoo's with eps 1e-5, no qkv bias and normed patch vectors; one head of
    width ``dim`` has no output projection there, the identity here."""
    from vit_pytorch import ViT

    source = _randomize(ViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=heads,
                            dim_head=32 // heads, mlp_dim=64, pool=pool))
    torch.save(source.state_dict(), tmp_path / "lucid.pt")
    model, _ = _vitzoo_from(tmp_path / "lucid.pt", num_heads=heads)
    assert model.spec.class_token == (pool == "cls")
    _assert_same_logits(model, source, images)


def test_vit_pytorch_with_narrow_heads_is_refused(tmp_path):
    from vit_pytorch import ViT

    torch.save(ViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=1, heads=2, dim_head=8,
                   mlp_dim=64).state_dict(), tmp_path / "lucid.pt")
    with pytest.raises(WeightsError, match=r"heads \* dim_head = 16 but dim = 32; .* dim_head = dim // heads"):
        to_timm_layout(read_state_dict(tmp_path / "lucid.pt"))


def test_unknown_layout_names_the_closest_one():
    state_dict = {"encoder.layers.0.attn.weight": torch.zeros(2), "class_token": torch.zeros(1, 1, 2),
                  "conv_proj.weight": torch.zeros(2, 3, 1, 1)}
    with pytest.raises(WeightsError, match=r"unknown checkpoint layout.*Closest known layout: torchvision \(2 of 3 "
                                           r"keys match\); keys that match none of its names: encoder.layers.0"):
        to_timm_layout(state_dict)


def test_create_model_follows_what_a_foreign_checkpoint_implies(tmp_path, caplog):
    """``create_model(name, pretrained=file)`` reads the file once and takes the spec fields it implies
    (HF's 1e-12 epsilon and qkv bias; vit-pytorch's mean pooling without a class token and normed
    patches): the model equals the source, with no hints passed by hand. An override still wins."""
    import transformers as hf
    from vit_pytorch import ViT

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    hf_model = _randomize(hf.ViTForImageClassification(hf.ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256, image_size=32,
        patch_size=4, num_labels=10, qkv_bias=False)))
    hf_model.save_pretrained(tmp_path / "hf")
    lucid = _randomize(ViT(image_size=32, patch_size=4, num_classes=10, dim=64, depth=4, heads=2, dim_head=32,
                           mlp_dim=256, pool="mean"))
    torch.save(lucid.state_dict(), tmp_path / "lucid.pt")

    with caplog.at_level("INFO", logger="vitzoo"):
        model = vitzoo.create_model("vit_pico_patch4_32", pretrained=str(tmp_path / "hf" / "model.safetensors"),
                                    num_classes=10).eval()
    assert (model.spec.get("norm.eps"), model.spec.get("attn.qkv_bias")) == (1e-12, False)
    assert "vit_pico_patch4_32: norm.eps=1e-12, as the checkpoint implies" in caplog.messages
    _assert_same_logits(model, lambda images: hf_model(pixel_values=images).logits, x)

    model = vitzoo.create_model("vit_pico_patch4_32", pretrained=str(tmp_path / "lucid.pt"), num_classes=10).eval()
    spec = model.spec
    assert (spec.class_token, spec.pool.name, spec.patch_embed.name) == (False, "avg", "linear_prenorm")
    _assert_same_logits(model, lucid, x)

    model = vitzoo.create_model("vit_pico_patch4_32", pretrained=str(tmp_path / "lucid.pt"), num_classes=10,
                                norm={"eps": 1e-6})
    assert (model.spec.get("norm.eps"), model.spec.class_token) == (1e-6, False)


TIMM_TO_SAPIENS2 = (  # timm's names written back in Meta's release layout (what timm's Sapiens2 loader maps)
    (r"^reg_token$", "storage_tokens"), (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"\.attn\.([qkv])_proj\.", r".attn.w\1."), (r"^blocks\.(\d+)\.gamma_1$", r"blocks.\1.attn.gamma.weight"),
    (r"\.mlp\.fc1\.", ".ffn.w12."), (r"\.mlp\.fc2\.", ".ffn.w3."),
    (r"^blocks\.(\d+)\.norm([12])\.", r"blocks.\1.ln\2."), (r"^norm\.", "ln1."),
)


def test_sapiens2_release_layout_loads_like_timm(tmp_path):
    """A checkpoint in Meta's Sapiens2 names: timm's own loader maps it back to timm's model exactly (so the
    layout is the one timm reads), and vitzoo converts it and gives timm's features."""
    from timm.models.eva import checkpoint_filter_fn

    torch.manual_seed(0)
    reference = _randomize(timm.create_model("vit_large_patch16_sapiens2", depth=2, num_kv_heads=(16, 8)))
    meta = {"mask_token": torch.zeros(1, 1024), "rope.periods": torch.ones(16)}
    for key, tensor in reference.state_dict().items():
        for pattern, template in TIMM_TO_SAPIENS2:
            key = re.sub(pattern, template, key)
        meta[key] = tensor
    timm_read = checkpoint_filter_fn(meta, reference)
    assert all(torch.equal(timm_read[k], v) for k, v in reference.state_dict().items())
    assert timm_read.keys() == reference.state_dict().keys()
    write_state_dict(meta, tmp_path / "sapiens2.safetensors")

    spec = vitzoo.model_spec("vit_large_patch16_sapiens2", depth=2, attn={"kv_heads": (16, 8)})
    model = VisionTransformer(spec).eval()
    report = load_pretrained(model, str(tmp_path / "sapiens2.safetensors")).adapted
    assert report[0] == "converted from the Meta Sapiens2 layout; dropped mask_token, rope.periods"
    _assert_same_logits(model.forward_features, reference.forward_features, torch.randn(1, 3, 64, 48))


def test_huggingface_dinov2_with_registers_loads_by_name(tmp_path):
    """The registry's DINOv2-with-registers model takes HF's checkpoint of the same size as it is: no
    overrides, strict load, and the normed tokens equal HF's ``last_hidden_state``."""
    import transformers as hf

    source = _randomize(hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14,
        num_register_tokens=4)))
    source.save_pretrained(tmp_path / "hf")
    model = vitzoo.create_model("vit_small_patch14_reg4_dinov2", pretrained=str(tmp_path / "hf")).eval()
    x = torch.randn(1, 3, 518, 518)
    _assert_same_logits(model.forward_features, lambda images: source(pixel_values=images).last_hidden_state, x)


def test_huggingface_siglip_full_model_loads_by_name(tmp_path, caplog):
    """A whole HF ``SiglipModel`` file (text tower included) builds the registry's SigLIP image tower: the text
    tower is dropped (summarised in the log), the tanh GELU comes from the hints, and the pooled output
    equals HF's image features."""
    import transformers as hf

    source = _randomize(hf.SiglipModel(hf.SiglipConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))))
    source.save_pretrained(tmp_path / "hf")
    with caplog.at_level("INFO", logger="vitzoo"):
        model = vitzoo.create_model("vit_base_patch16_siglip_224", pretrained=str(tmp_path / "hf")).eval()
    assert "vit_base_patch16_siglip_224: mlp='gelu_tanh', as the checkpoint implies" in caplog.messages
    assert any("; dropped logit_bias, logit_scale, text_model." in m and m.endswith("in all)") for m in caplog.messages)
    x = torch.randn(1, 3, 224, 224)
    _assert_same_logits(model, lambda images: source.vision_model(pixel_values=images).pooler_output, x)


TIMM_TO_OPENAI_CLIP = (  # timm's names written back in OpenAI CLIP's (what timm's own CLIP loader maps)
    (r"^patch_embed\.proj\.", "conv1."), (r"^pos_embed$", "positional_embedding"), (r"^norm_pre\.", "ln_pre."),
    (r"^norm\.", "ln_post."), (r"^cls_token$", "class_embedding"), (r"^blocks\.", "transformer.resblocks."),
    (r"\.norm([12])\.", r".ln_\1."), (r"\.attn\.qkv\.", ".attn.in_proj_"), (r"\.attn\.proj\.", ".attn.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."), (r"\.mlp\.fc2\.", ".mlp.c_proj."),
)


def test_openai_clip_layout_loads_like_timm(tmp_path, images):
    """An OpenAI CLIP / OpenCLIP checkpoint (image tower under ``visual.``, plus a text tower): timm's own
    CLIP loader maps it back to timm's model exactly, and vitzoo converts it, drops the text tower and
    gives timm's image embedding."""
    from timm.models.vision_transformer import _convert_openai_clip

    reference = _randomize(timm.create_model("vit_base_patch16_clip_224", **SMALL, pre_norm=True))
    openai = {"positional_embedding": torch.zeros(77, 8), "logit_scale": torch.ones(())}  # text-tower keys
    for key, tensor in reference.state_dict().items():
        if key == "head.bias":
            continue
        for pattern, template in TIMM_TO_OPENAI_CLIP:
            key = re.sub(pattern, template, key)
        openai[f"visual.{key}"] = tensor
    openai["visual.proj"] = openai.pop("visual.head.weight").T.contiguous()
    openai["visual.class_embedding"] = openai["visual.class_embedding"].reshape(-1)
    openai["visual.positional_embedding"] = openai["visual.positional_embedding"][0]
    with torch.no_grad():
        reference.head.bias.zero_()
    timm_read = _convert_openai_clip(openai, reference)
    assert all(torch.equal(timm_read[k], v) for k, v in reference.state_dict().items())
    torch.save(openai, tmp_path / "open_clip_pytorch_model.bin")

    model, report = _vitzoo_from(tmp_path / "open_clip_pytorch_model.bin")
    assert report[0] == "converted from the OpenAI CLIP / OpenCLIP layout; dropped positional_embedding, logit_scale"
    assert (model.spec.pre_norm, model.spec.get("patch_embed.bias"), model.spec.get("norm.eps")) == (True, False, 1e-5)
    _assert_same_logits(model, reference, images)


def test_open_clip_timm_tower_loads(tmp_path, images):
    """OpenCLIP with a timm image tower (SigLIP-style: attention pooling, a bias-free projection): the trunk
    keys load as they are, the projection becomes the head, the text tower is dropped."""
    reference = _randomize(timm.create_model("vit_base_patch16_siglip_224", **{**SMALL, "num_classes": 0}))
    proj = torch.randn(5, 32)
    checkpoint = {f"visual.trunk.{k}": v for k, v in reference.state_dict().items()}
    checkpoint |= {"visual.head.proj.weight": proj, "text.token_embedding.weight": torch.zeros(10, 8),
                   "logit_scale": torch.ones(())}
    write_state_dict(checkpoint, tmp_path / "open_clip_model.safetensors")
    model, report = _vitzoo_from(tmp_path / "open_clip_model.safetensors")
    assert report[0] == ("converted from the OpenCLIP with a timm image tower layout; "
                         "dropped logit_scale, text.token_embedding.weight")
    assert (model.spec.class_token, model.spec.pool.name) == (False, "map")
    pooled = partial(reference.forward_head, pre_logits=True)
    _assert_same_logits(model, lambda x: pooled(reference.forward_features(x)) @ proj.T, images)
