"""Export to ONNX, torch.export and TorchScript: each file loads back within 1e-4 of eager, for every kind of
model in the registry, with dynamic batch and image sizes; wrong requests are refused with what to do.

Models are one block deep at two patches a side: exporting costs per operation, and one block holds every
operation a model has. Each ONNX file is also checked here on fresh images with ONNX Runtime, apart from
the check :func:`vitzoo.export` runs itself.
"""

from __future__ import annotations

import onnxruntime
import pytest
import torch

import vitzoo
from vitzoo.cli import main
from vitzoo.export import check_export, export

TOL = 1e-4
# One model per mechanism the registry's families combine: name -> spec overrides, export keywords. The
# Perception Encoder (position table and RoPE, MAP with a class token) is the dynamic export's model below.
FAMILIES: dict[str, tuple[dict, dict]] = {
    "vit_tiny_patch16_224": ({}, {}),  # plain ViT: class token, learned table, LayerNorm, GELU
    "vit_small_patch14_reg4_dinov2": ({}, {}),  # class + register tokens, table of the patches only, LayerScale
    "deit_tiny_distilled_patch16_224": ({}, {}),  # DeiT: distillation token and its head
    "vit_base_patch16_siglip_224": ({}, {}),  # SigLIP: attention pooling (MAP)
    "vit_base_patch16_clip_quickgelu_224": ({}, {}),  # CLIP: pre-norm, quick_gelu
    "eva02_tiny_patch14_224": ({}, {}),  # EVA-02: axial RoPE, SwiGLU, sub-LN attention
    "vit_small_patch16_rope_mixed_224": ({}, {}),  # ROPE-ViT: learned mixed rotary frequencies
    "vit_tiny_patch16_dinov3_qkvb": ({}, {}),  # DINOv3: rotary positions on [-1, 1], no table
    "vit_dpwee_patch16_reg1_gap_256": ({}, {}),  # no class token, average pooling, differential attention
    "vit_tiny_r_s16_p8_224": ({}, {}),  # hybrid: a ResNet stem makes the patches
    "vitamin_small_224": ({"embed_dim": 384}, {}),  # ViTamin: MBConv stem, GeGLU
    "aimv2_large_patch14_224": ({"embed_dim": 256, "num_heads": 4}, {}),  # AIMv2: RMSNorm, SwiGLU
    # a dynamic-size model exported at another size than its table's: the table resampled in the graph
    "vit_tiny_patch16_224 resampled": ({"dynamic_img_size": True}, {"img_size": 48}),
}


def tiny(name: str, **overrides) -> vitzoo.VisionTransformer:
    """``name`` one block deep, two patches a side, in eval mode."""
    patch = vitzoo.model_spec(name).patch_size
    return vitzoo.create_model(name, depth=1, img_size=2 * patch, **overrides).eval()


def onnx_run(path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def assert_close_to_eager(model, run, shape) -> None:
    images = torch.randn(shape)
    with torch.no_grad():
        assert (run(images) - model(images)).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_matches_eager_for_every_family(family, tmp_path):
    overrides, options = FAMILIES[family]
    model = tiny(family.split()[0], **overrides)
    path = export(model, tmp_path / "model.onnx", **options)
    size = (options["img_size"],) * 2 if "img_size" in options else model.spec.img_size
    assert_close_to_eager(model, lambda x: onnx_run(path, x), (2, 3, *size))


@pytest.mark.parametrize("name", ["vit_pe_core_tiny_patch16_384", "vit_tiny_patch16_dinov3_qkvb"])
def test_onnx_dynamic_batch_and_size(name, tmp_path):
    """Perception Encoder has both a position table, resampled in the graph, and axial RoPE, rebuilt in it;
    DINOv3 rotary positions on patch centres normalized by the grid, rebuilt in the graph."""
    model = tiny(name, dynamic_img_size=True)
    path = export(model, tmp_path / "model.onnx", dynamic_batch=True, dynamic_size=True)
    for shape in [(1, 3, 64, 48), (4, 3, 16, 32)]:
        assert_close_to_eager(model, lambda x: onnx_run(path, x), shape)


@pytest.mark.parametrize("name", ["qwen3_vit_88m_merge", "deepseek_vit_412m_enc"])
def test_vlm_projectors_export_with_a_dynamic_size(tmp_path, name):
    """The projectors read the patch grid from forward_features' (b, h, w, dim), so an export takes other sizes:
    Qwen's merger in steps of its 2x2 cells, DeepSeek's aligner any multiple of the patch (it pads the grid to
    whole 3x3 cells), non-square included."""
    model = tiny(name, dynamic_img_size=True)
    p = model.spec.patch_size * (2 if "merge" in name else 1)
    path = export(model, tmp_path / "m.pt2", "exported", dynamic_batch=True, dynamic_size=True, img_size=4 * p)
    loaded = torch.export.load(str(path)).module()
    assert_close_to_eager(model, loaded, (3, 3, 5 * p, 7 * p))  # torch.export takes a side of one cell as fixed


def test_exported_program_round_trips_with_dynamic_shapes(tmp_path):
    model = tiny("vit_tiny_patch16_224", dynamic_img_size=True)
    path = export(model, tmp_path / "model.pt2", "exported", dynamic_batch=True, dynamic_size=True)
    loaded = torch.export.load(str(path)).module()
    assert_close_to_eager(model, loaded, (3, 3, 48, 64))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "qwen3_vit_88m"])
def test_torchscript_of_a_dynamic_size_model_takes_any_size(tmp_path, name):
    """The script of a ``dynamic_img_size`` model is a trace at a size other than its own, which records the
    position resizing, so it takes other sizes (the export checks a non-square one)."""
    model = tiny(name, dynamic_img_size=True)
    path = export(model, tmp_path / "m.pt", "torchscript", dynamic_batch=True, dynamic_size=True)
    p = model.spec.patch_size
    assert_close_to_eager(model, torch.jit.load(str(path)), (3, 3, 5 * p, 3 * p))


def test_torchscript_round_trips(tmp_path):
    model = tiny("vit_tiny_patch16_224")
    path = export(model, tmp_path / "model.pt", "torchscript")
    assert_close_to_eager(model, torch.jit.load(str(path)), (2, 3, 32, 32))


def test_the_check_on_load_refuses_a_file_that_differs(tmp_path):
    model = tiny("vit_tiny_patch16_224")
    path = export(model, tmp_path / "model.pt2", "exported")
    with torch.no_grad():
        model.head.bias.add_(1.0)  # eager now computes something else than the file
    with pytest.raises(ValueError, match=r"differs from eager by 1 \(max abs\) on images of shape \(2, 3, 32, 32\)"):
        check_export(model, path, "exported", [(2, 3, 32, 32)])
    with pytest.raises(ValueError, match=r"fails on images of shape \(3, 3, 32, 32\)"):  # traced at a batch of 2
        check_export(model, path, "exported", [(3, 3, 32, 32)])


def test_the_command_exports_a_name_end_to_end(tmp_path, capsys):
    out = tmp_path / "pico.pt2"
    assert main(["export", "vit_pico_patch4_32", "--format", "exported", "--dynamic-batch", "--set", "depth=1",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model = vitzoo.create_model("vit_pico_patch4_32", depth=1)
    loaded = torch.export.load(str(out)).module()
    images = torch.randn(5, 3, 32, 32)
    assert loaded(images).shape == model(images).shape


def test_wrong_requests_are_refused_with_what_to_do(tmp_path, capsys, bad_input):
    model = tiny("vit_tiny_patch16_224")
    with pytest.raises(ValueError) as refused:
        export(model, tmp_path / "model.tflite", "tflite")
    message = bad_input("vitzoo.export", 'format="tflite"', str(refused.value))
    assert "onnx, torchscript, exported" in message
    with pytest.raises(ValueError) as refused:
        export(model, tmp_path / "model.onnx", dynamic_size=True)
    message = bad_input("vitzoo.export", "dynamic_size=True on a fixed-size model", str(refused.value))
    assert "dynamic_img_size=True" in message and "32x32" in message
    assert main(["export", "vit_pico_patch4_32", "--dynamic-size", "--out", str(tmp_path / "p.onnx")]) == 2
    message = bad_input("vitzoo export", "--dynamic-size on a fixed-size model", capsys.readouterr().err)
    assert "--set dynamic_img_size=true" in message
    assert not (tmp_path / "p.onnx").exists()
    pooled = vitzoo.create_model("gemma4_vit_167m_enc", depth=1, img_size=48)  # its readout needs the grid's sides
    with pytest.raises(ValueError, match="finds the patch grid from the number of tokens"):
        export(pooled, tmp_path / "m.pt2", "exported", dynamic_size=True)
    with pytest.raises(ValueError, match=r"multiple of 32 pixels \(patch_size=16, times the cells pool='merger'"):
        export(tiny("qwen3_vit_88m_merge", dynamic_img_size=True), tmp_path / "m.pt2", "exported", dynamic_size=True,
               img_size=48)
    with pytest.raises(SystemExit):
        main(["export", "vit_pico_patch4_32", "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_a_model_given_takes_no_build_keywords(tmp_path):
    with pytest.raises(ValueError, match="dynamic_img_size build a model by name"):
        export(tiny("vit_tiny_patch16_224"), tmp_path / "m.onnx", dynamic_img_size=True)


def test_export_leaves_the_model_in_its_mode(tmp_path):
    model = tiny("vit_tiny_patch16_224").train()
    export(model, tmp_path / "model.pt2", "exported")
    assert model.training
