"""MAE pretraining: the masks, the loss, the encoder on visible patches, the run, its encoder file and its resume.

The runs use a one-block 32 px pico encoder with a one-block 32-wide decoder on digits, in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from einops import repeat

import vitzoo
from tests.conftest import killed_copy, process_env
from vitzoo import cli
from vitzoo.train.checkpoint import latest_checkpoint, load_checkpoint
from vitzoo.train.finetune import FinetuneConfig, build_model
from vitzoo.train.loop import TrainConfig
from vitzoo.train.mae import MaeOptions, MaskedAutoencoder, masked_patch_loss, patchify, random_masking, unpatchify
from vitzoo.train.pretrain import PretrainConfig, encoder_folder, pretrain
from vitzoo.weights import read_state_dict

PICO = {"depth": 1}
DECODER = MaeOptions(decoder_dim=32, decoder_depth=1, decoder_heads=2)
RUN = (30, {"eval_every": 10, "checkpoint_every": 15, "lr": 2e-3})  # steps and schedule of the pretraining run


def _config(out: Path, steps: int, train: dict) -> PretrainConfig:
    return PretrainConfig(model="vit_pico_patch4_32", overrides=PICO, out=str(out), mae=DECODER,
                          train=TrainConfig(steps=steps, batch_size=16, warmup_steps=2, **train))


@pytest.mark.parametrize("ratio, visible", [(0.75, 16), (0.6, 25)])
def test_masking_keeps_the_asked_share_per_image_and_follows_the_seed(ratio, visible):
    masking = random_masking(8, 64, ratio, torch.Generator().manual_seed(3))
    assert masking.keep.shape == (8, visible)
    assert (masking.mask.sum(dim=1) == 64 - visible).all()
    assert not masking.mask.gather(1, masking.keep).any()  # the kept patches are the unmasked ones, each once
    assert all(len(set(row.tolist())) == visible for row in masking.keep)
    again = random_masking(8, 64, ratio, torch.Generator().manual_seed(3))
    other = random_masking(8, 64, ratio, torch.Generator().manual_seed(4))
    assert torch.equal(again.keep, masking.keep) and torch.equal(again.restore, masking.restore)
    assert not torch.equal(other.keep, masking.keep)


def test_the_loss_counts_masked_patches_only():
    target = torch.randn(2, 4, 12)
    mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    pred = target + torch.where(mask[..., None], 2.0, 0.0)  # off by 2 on every masked pixel, exact elsewhere
    assert masked_patch_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(4.0)
    noisy = pred + torch.where(mask[..., None], 0.0, 100.0)  # visible patches far off: no change
    assert masked_patch_loss(noisy, target, mask, norm_pix=False).item() == pytest.approx(4.0)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert masked_patch_loss(normed, target, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_patchify_round_trips():
    images = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(images, 4), (2, 3), 4), images)


@pytest.mark.parametrize("overrides", [{}, {"rope": "axial", "reg_tokens": 2}])
def test_the_encoder_on_visible_patches_sees_them_at_their_places(overrides):
    """Keeping every patch in a shuffled order gives forward_features' tokens in that order: positions (and
    rotary angles) follow each patch, prefix tokens stay in front."""
    torch.manual_seed(0)
    model = vitzoo.create_model("vit_pico_patch4_32", depth=2, **overrides).eval()
    images, prefix = torch.randn(2, 3, 32, 32), model.num_prefix_tokens
    keep = torch.stack([torch.randperm(64) for _ in range(2)])
    full = model.forward_features(images)
    visible = model.forward_visible(images, keep)
    assert torch.allclose(visible[:, :prefix], full[:, :prefix], atol=1e-5)
    shuffled = full[:, prefix:].gather(1, repeat(keep, "b k -> b k d", d=full.shape[-1]))
    assert torch.allclose(visible[:, prefix:], shuffled, atol=1e-5)
    assert model.forward_visible(images, keep[:, :16]).shape == (2, prefix + 16, model.embed_dim)


@pytest.mark.parametrize("name, why", [
    ("vit_relpos_base_patch16_224", "relative-position table laid out for the full patch grid"),
    ("mixer_b16_224", "token-mixing MLP sized for the full token count"),
    ("vit_small_r26_s32_224", "convolutional stem that sees across patch borders"),
])
def test_an_encoder_that_cannot_be_masked_is_refused(name, why, tmp_path, bad_input):
    with torch.device("meta"), pytest.raises(ValueError, match=why):
        MaskedAutoencoder(vitzoo.create_model(name, num_classes=0))
    with pytest.raises(ValueError) as err:
        pretrain(PretrainConfig(model=name, out=str(tmp_path / "run")))
    message = bad_input("vitzoo pretrain", f"{name} (MAE)", str(err.value))
    assert why in message and name in message and "pick a model" in message
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished 30-step run, evaluated every 10 steps, checkpoints at steps 15 and 30."""
    out = tmp_path_factory.mktemp("mae") / "run"
    pretrain(_config(out, *RUN), progress=False)
    return out


def test_the_mae_loss_falls_on_digits(pretrained):
    rows = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["val_loss"] < 0.85 * rows[0]["val_loss"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all("val_acc" not in r for r in rows)  # no labels, no accuracy: the best checkpoint has the lowest loss
    trainer = load_checkpoint(latest_checkpoint(pretrained / "checkpoints"))[1]
    assert trainer["best"] == {"step": 30, "val_loss": rows[-1]["val_loss"]}


def test_the_encoder_loads_strictly_into_the_registry_model_and_finetune(pretrained, tmp_path):
    folder = encoder_folder(pretrained)
    weights = read_state_dict(folder / "model.safetensors")
    assert not any(k.startswith(("decoder", "head", "encoder.")) for k in weights)
    plain = vitzoo.create_model("vit_pico_patch4_32", num_classes=0, **PICO)
    plain.load_state_dict(weights, strict=True)
    trained = read_state_dict(latest_checkpoint(pretrained / "checkpoints") / "model.safetensors")
    assert all(torch.equal(weights[k], trained[f"encoder.{k}"]) for k in weights)
    loaded = vitzoo.create_model("vit_pico_patch4_32", pretrained=str(folder), num_classes=10, **PICO)
    model = build_model(FinetuneConfig(model="vit_pico_patch4_32", pretrained=str(folder), overrides=PICO), 10)
    for built in (loaded, model):
        state = built.state_dict()
        assert all(torch.equal(state[k], weights[k]) for k in weights) and state["head.weight"].shape == (10, 64)
    out = tmp_path / "ft"
    assert cli.main(["finetune", "vit_pico_patch4_32", "--pretrained", str(folder), "--set", "depth=1", "--steps",
                     "2", "--batch-size", "32", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["pretrained"] == str(folder)



def test_a_killed_pretraining_resumes_bit_identically(pretrained, tmp_path, bad_input):
    run = killed_copy(pretrained, tmp_path / "run", 15, outputs=("encoder",))
    config = replace(_config(run, *RUN), resume=True)
    with pytest.raises(ValueError) as err:
        pretrain(replace(config, mae=replace(DECODER, mask_ratio=0.5)), progress=False)
    message = bad_input("vitzoo pretrain --resume", "--mask-ratio 0.5 (started with 0.75)", str(err.value))
    assert "mask_ratio 0.75 → 0.5" in message
    pretrain(config, progress=False)
    assert (run / "metrics.jsonl").read_text() == (pretrained / "metrics.jsonl").read_text()
    resumed, straight = (read_state_dict(latest_checkpoint(r / "checkpoints") / "model.safetensors")
                         for r in (run, pretrained))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    encoders = [read_state_dict(encoder_folder(r) / "model.safetensors") for r in (run, pretrained)]
    assert all(torch.equal(encoders[0][k], encoders[1][k]) for k in encoders[1])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_pretrains_an_encoder_whose_readout_mae_never_runs(tmp_path, strategy):
    """Two gloo processes on an encoder with an attention pool, which MAE leaves untrained (frozen: DDP would
    otherwise wait for its gradients); under FSDP the encoder folder is written from the gathered weights. The
    ranks end identical and the encoder loads strictly."""
    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitzoo",
           "pretrain", "vit_pico_patch4_32", "--set", "depth=1", "--set", "pool=map", "--decoder-dim", "32",
           "--decoder-depth", "1", "--decoder-heads", "2", "--steps", "2", "--batch-size", "8", "--strategy",
           strategy, "--out", str(out)]
    done = subprocess.run(cmd, env=process_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ranks_identical"]
    initial = vitzoo.create_model("vit_pico_patch4_32", num_classes=0, depth=1, pool="map")
    encoder = read_state_dict(encoder_folder(out) / "model.safetensors")
    initial.load_state_dict(encoder, strict=True)
