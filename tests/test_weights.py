"""Weights: timm's files load unchanged, from a path or an offline hub cache; bad files are refused."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import huggingface_hub.constants
import pytest
import timm
import torch

import vitzoo
from tests.conftest import WEIGHTS_NAME as NAME
from tests.conftest import fill_hub_cache
from vitzoo.weights import WeightsError, load_weights, read_state_dict, write_state_dict

REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"



def test_pretrained_path_loads_timm_file(timm_weights):
    reference = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"file": str(timm_weights)}).eval()
    model = vitzoo.create_model(NAME, pretrained=str(timm_weights)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4
    assert model.pretrained_cfg["file"] == str(timm_weights)


def test_pretrained_true_reads_offline_hub_cache_like_timm(timm_weights, tmp_path):
    """Both libraries read the same cache in a fresh process with HF_HUB_OFFLINE=1; also at a new,
    non-square input size, where both resample the position table."""
    fill_hub_cache(tmp_path, REPO, timm_weights)
    script = textwrap.dedent(f"""
        import timm, torch, vitzoo
        for kw in ({{}}, {{"img_size": (192, 288), "num_classes": 10}}):
            torch.manual_seed(0)
            ref = timm.create_model("{NAME}", pretrained=True, **kw).eval()
            torch.manual_seed(0)
            ours = vitzoo.create_model("{NAME}", pretrained=True, **kw).eval()
            if "num_classes" in kw:
                ours.head.load_state_dict(ref.head.state_dict())
            x = torch.randn(2, 3, *ours.spec.img_size)
            with torch.no_grad():
                print(float((ours(x) - ref(x)).abs().max()))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    diffs = [float(line) for line in result.stdout.split()]
    assert len(diffs) == 2 and max(diffs) <= 1e-4


def test_missing_cache_entry_says_what_to_do(tmp_path):
    script = f"import vitzoo; vitzoo.create_model('{NAME}', pretrained=True)"
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "not in the local Hugging Face cache" in result.stderr and "pretrained=PATH" in result.stderr


def test_url_weights_come_from_torch_hub_cache_like_timm(tmp_path, monkeypatch):
    """Weights timm publishes only at a plain URL (the I-JEPA encoders) are looked for where timm keeps them,
    torch.hub's checkpoint folder; read in their release layout (``{"encoder": ...}`` with DDP's ``module.``
    prefix), the model equals timm's loaded from the same file. Offline and absent, the error says what to do."""
    url = "https://example.invalid/ijepa/IN1K-vit.t.16-300e.pth.tar"
    overlay = {"url": url, "hf_hub_id": None}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="not in torch.hub's cache .*pretrained=PATH"):
        vitzoo.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay)
    source = timm.create_model(NAME).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"encoder": {f"module.{k}": v for k, v in source.items()}, "epoch": 300},
               tmp_path / "hub" / "checkpoints" / "IN1K-vit.t.16-300e.pth.tar")
    reference = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    model = vitzoo.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-5


def test_adaptations_are_reported(timm_weights):
    model = vitzoo.create_model(NAME, img_size=320, num_classes=5)
    report = load_weights(model, read_state_dict(timm_weights))
    assert report.adapted == [
        "pos_embed: resampled (1, 197, 192) -> (1, 401, 192), grid 14x14 -> 20x20",
        "head.weight: dropped (1000, 192), new head for num_classes=5",
        "head.bias: dropped (1000,), new head for num_classes=5",
    ]
    model = vitzoo.create_model(NAME, img_size=64, patch_size=8, in_chans=1)
    assert load_weights(model, read_state_dict(timm_weights)).adapted == [
        "pos_embed: resampled (1, 197, 192) -> (1, 65, 192), grid 14x14 -> 8x8",
        "patch_embed.proj.weight: (192, 3, 16, 16) -> (192, 1, 8, 8), input channels 3 -> 1, "
        "patch 16x16 -> 8x8 resampled as in FlexiViT",
    ]


def test_truncated_file_is_refused(timm_weights, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(timm_weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        vitzoo.create_model(NAME, pretrained=str(broken))
    truncated_pickle = tmp_path / "broken.bin"
    torch.save({"a": torch.ones(3)}, truncated_pickle)
    truncated_pickle.write_bytes(truncated_pickle.read_bytes()[:50])
    with pytest.raises(WeightsError, match="truncated, corrupted, or contains code"):
        read_state_dict(truncated_pickle)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"pos_embed": _RunsCode()}))
    with pytest.raises(WeightsError, match="contains code"):
        read_state_dict(evil)
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_wrong_architecture_names_keys_and_leaves_model_unchanged(tmp_path):
    small = timm.create_model("vit_small_patch16_224", depth=2)
    other = write_state_dict(small.state_dict(), tmp_path / "s.safetensors")
    model = vitzoo.create_model(NAME, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_weights(model, read_state_dict(other))
    message = str(err.value)
    assert "shape differs" in message and "cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    write_state_dict({"a": torch.ones(2)}, target)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vitzoo.weights.files.save_file", crash)
    with pytest.raises(OSError):
        write_state_dict({"a": torch.zeros(2)}, target)
    assert torch.equal(read_state_dict(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
