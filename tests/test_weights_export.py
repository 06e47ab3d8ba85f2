"""Adapting timm weights on load like timm does, tags, save_pretrained round trips, export to timm."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from PIL import Image

import vitzoo
from tests.conftest import WEIGHTS_NAME as NAME
from tests.conftest import fill_hub_cache
from vitzoo.weights import WeightsError
from vitzoo.weights.load import adapt_input_channels, resample_patch_kernel

TOL = 1e-4


def _same(ours: torch.nn.Module, theirs: torch.nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("changes", [
    dict(img_size=384), dict(img_size=288), dict(img_size=(224, 288)),
    dict(patch_size=8, img_size=96), dict(in_chans=1), dict(in_chans=5),
], ids=str)
def test_adapted_weights_match_timm(timm_weights, changes):
    """Position table resampled (384, 288, non-square), patch kernel resampled (FlexiViT) and input
    channels adapted: the vitzoo model equals timm's model loading the same file with the same change."""
    reference = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"file": str(timm_weights)},
                                  **changes)
    model = vitzoo.create_model(NAME, pretrained=str(timm_weights), **changes)
    _same(model, reference, model.pretrained_cfg["input_size"])


def test_kernel_adaptations_equal_timms_functions():
    kernel = torch.randn(16, 3, 16, 16)
    assert torch.equal(resample_patch_kernel(kernel, (8, 8)), timm.layers.resample_patch_embed(kernel, [8, 8]))
    for chans in (1, 2, 7):
        assert torch.equal(adapt_input_channels(kernel, chans), timm.models.adapt_input_conv(chans, kernel))


def test_pretrained_tag_reads_that_tags_hub_repo(tmp_path):
    """``name.tag`` picks timm's repo and class count for that tag, offline from the cache, like timm."""
    torch.manual_seed(0)
    in21k = timm.create_model(NAME, num_classes=21843)
    fill_hub_cache(tmp_path, f"timm/{NAME}.augreg_in21k", vitzoo.weights.write_state_dict(
        in21k.state_dict(), tmp_path / "in21k.safetensors"))
    script = textwrap.dedent(f"""
        import timm, torch, vitzoo
        ref = timm.create_model("{NAME}.augreg_in21k", pretrained=True).eval()
        ours = vitzoo.create_model("{NAME}.augreg_in21k", pretrained=True).eval()
        assert ours.num_classes == 21843 and ours.pretrained_cfg["hf_hub_id"] == "timm/{NAME}.augreg_in21k"
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            print((ours(x) - ref(x)).abs().max().item())
    """)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) <= TOL
    with pytest.raises(WeightsError, match=r"timm has no weights vit_tiny_patch16_224.nope; tags of .*augreg_in21k"):
        vitzoo.create_model(f"{NAME}.nope")


def test_save_pretrained_rebuilds_without_code(tmp_path):
    model = vitzoo.create_model(NAME, depth=2, mlp="swiglu", reg_tokens=2, num_classes=7).eval()
    folder = vitzoo.save_pretrained(model, tmp_path / "mine")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for rebuilt in (vitzoo.from_pretrained(folder), vitzoo.create_model(str(folder))):
        assert rebuilt.spec == model.spec and rebuilt.pretrained_cfg["architecture"] == NAME
        _same(rebuilt, model, (3, 224, 224))
    with pytest.raises(WeightsError, match="not a save_pretrained folder"):
        vitzoo.from_pretrained(tmp_path)


def test_export_loads_into_timm_strictly(tmp_path):
    model = vitzoo.create_model(NAME, depth=2)
    path = vitzoo.export_timm(model, tmp_path / "for_timm.safetensors")
    reference = timm.create_model(NAME, depth=2, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(path)})  # timm loads with strict=True
    _same(model, reference, (3, 224, 224))
    overlay = vitzoo.create_model(NAME, depth=2, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(path), "mean": [0.5] * 3})
    assert overlay.pretrained_cfg["mean"] == (0.5,) * 3  # as timm types it
    _same(overlay, model, (3, 224, 224))


def test_eval_transform_matches_timm():
    model = vitzoo.create_model("vit_base_patch16_clip_224", depth=1)
    reference = timm.create_model("vit_base_patch16_clip_224", depth=1)
    config = vitzoo.data_config(model)
    assert config == {k: v for k, v in timm.data.resolve_data_config(model=reference).items() if k in config}
    image = Image.fromarray(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8).numpy())
    ours, theirs = vitzoo.eval_transform(model)(image), timm.data.create_transform(**config)(image)
    assert ours.shape == (3, 224, 224) and (ours - theirs).abs().max() <= 1e-5
