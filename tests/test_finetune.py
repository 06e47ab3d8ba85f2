"""Fine-tuning: exact resume after a real kill, torchrun with gloo, the recipe options, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitzoo
from tests.conftest import process_env
from vitzoo.train import TrainConfig, fit
from vitzoo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vitzoo.train.data import build_datasets, dataset_labels, labelled_subset, num_classes
from vitzoo.train.distributed import weights_digest
from vitzoo.train.finetune import FinetuneConfig, finetune
from vitzoo.train.mix import mix_batch
from vitzoo.weights import read_state_dict

TINY = ["--set", "embed_dim=32", "--set", "num_heads=2", "--set", "depth=2", "--set", "patch_size=4",
        "--img-size", "16", "--set", "drop_path_rate=0.1", "--set", "proj_drop_rate=0.1"]
TINY_SPEC = dict(embed_dim=32, num_heads=2, depth=2, patch_size=4)


def _train_cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitzoo.train", "vit_tiny_patch16_224", *TINY, "--batch-size", "32",
            "--ema-decay", "0.9", "--seed", "3", "--out", str(out), *extra]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(latest_checkpoint(out / "checkpoints") / "model.safetensors")


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after the first checkpoint (mid-epoch: 44 steps per epoch, checkpoints every 5), resume,
    and end bit-identical to a run that was never interrupted, EMA and dropout included."""
    steps = ["--steps", "150", "--checkpoint-every", "5", "--eval-every", "50"]
    killed = subprocess.Popen(_train_cli(tmp_path / "killed", *steps), env=process_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not pointer.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = load_checkpoint(latest_checkpoint(tmp_path / "killed" / "checkpoints"))[1]["step"]
    assert 0 < stopped_at < 150 and stopped_at % 44
    subprocess.run(_train_cli(tmp_path / "killed", *steps, "--resume"), env=process_env(), check=True,
                   capture_output=True)
    subprocess.run(_train_cli(tmp_path / "straight", *steps), env=process_env(), check=True, capture_output=True)
    resumed, straight = _final_weights(tmp_path / "killed"), _final_weights(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    for run in ("killed", "straight"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [50, 100, 150]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["weights_digest"] == json.loads(
        (tmp_path / "straight" / "summary.json").read_text())["weights_digest"]
    assert (tmp_path / "killed" / "curves.png").stat().st_size > 0
    assert (tmp_path / "killed" / "metrics.csv").read_text().startswith("step,epoch,train_loss")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_cpu_processes_end_identical_and_resume(tmp_path, strategy):
    """gloo on CPU, with an EMA of the weights (sharded like the model under FSDP); the ranks compare
    digests of their full weights at the end (summary.json). Resumed from its step-3 checkpoint (FSDP:
    each rank re-shards the full weights, optimizer state and EMA), the run ends bit-identical to the
    straight one, its EMA too."""
    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "vitzoo.train", "vit_tiny_patch16_224", *TINY, "--batch-size", "16", "--steps", "6",
           "--checkpoint-every", "3", "--eval-every", "3", "--ema-decay", "0.9", "--strategy", strategy,
           "--out", str(out)]
    done = subprocess.run(cmd, env=process_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = json.loads((out / "summary.json").read_text())
    assert straight["processes"] == 2 and straight["ranks_identical"] and straight["steps"] == 6
    assert straight["ema_val_acc"] is not None
    straight_ema = weights_digest(read_state_dict(out / "checkpoints" / "step_00000006" / "ema.safetensors"))

    (out / "checkpoints" / "latest").write_text("step_00000003")
    done = subprocess.run([*cmd, "--resume"], env=process_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["ranks_identical"] and resumed["weights_digest"] == straight["weights_digest"]
    assert weights_digest(read_state_dict(out / "checkpoints" / "step_00000006" / "ema.safetensors")) == straight_ema


@pytest.fixture(scope="module")
def digits_data():
    cfg = vitzoo.create_model("vit_tiny_patch16_224", img_size=16).pretrained_cfg
    return build_datasets("digits", cfg)


def _model(**changes):
    torch.manual_seed(0)
    return vitzoo.create_model("vit_tiny_patch16_224", img_size=16, num_classes=10, **{**TINY_SPEC, **changes})


def test_gradient_accumulation_matches_the_large_batch(digits_data):
    train, _ = digits_data
    base = TrainConfig(steps=3, batch_size=16, warmup_steps=1, grad_clip=None)
    big, small = _model(), _model()
    fit(big, train, None, base, progress=False)
    fit(small, train, None, replace(base, batch_size=8, accum_steps=2), progress=False)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_recipe_options_train(digits_data):
    """bf16 autocast, gradient checkpointing, label smoothing, layer decay, EMA and linear probing."""
    train, val = digits_data
    model = _model()
    model.set_grad_checkpointing(True)
    config = TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, amp=True, label_smoothing=0.1,
                         layer_decay=0.75, ema_decay=0.9, eval_every=30)
    result = fit(model, train, val, config, progress=False)
    assert sum(result.losses[-5:]) < sum(result.losses[:5]) and "ema_val_acc" in result.evals[-1]
    probe = _model()
    vitzoo.train.freeze_backbone(probe)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    fit(probe, train, None, TrainConfig(steps=2, batch_size=16, warmup_steps=1), progress=False)
    changed = {k for k, v in probe.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}


def test_paper_notebook_in_a_few_lines(tmp_path):
    """The origin notebook (ViT-B/16, dropout 0.1, 10 classes, Adam 3e-4, FakeData), at depth 1 and 32 px."""
    config = FinetuneConfig(
        model="vit_base_patch16_224", data="torchvision:FakeData", img_size=32, out=str(tmp_path),
        overrides=dict(depth=1, drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1),
        train=TrainConfig(steps=2, batch_size=8, optimizer="adam", lr=3e-4, weight_decay=0.0, warmup_steps=1),
    )
    summary = finetune(config, progress=False)
    assert summary["classes"] == 10 and summary["steps"] == 2 and 0.0 <= summary["val_acc"] <= 1.0


def test_finetune_leaves_the_callers_config_as_it_was(tmp_path):
    """The steps of ``epochs`` and the evaluation and checkpoint intervals are the run's, recorded in run.json;
    the config the caller passed (and may pass again) keeps its own values."""
    config = FinetuneConfig(model="vit_pico_patch4_32", img_size=16, out=str(tmp_path), epochs=0.05,
                            overrides=dict(depth=1, embed_dim=32), train=TrainConfig(batch_size=32, warmup_steps=1))
    before = deepcopy(config)
    summary = finetune(config, progress=False)
    assert config == before and config.train.steps == 300 and config.train.eval_every == 100
    run = json.loads((tmp_path / "run.json").read_text())["train"]
    assert summary["steps"] == run["steps"] == run["eval_every"] == run["checkpoint_every"] == 2  # 0.05 of 44


def _image_tree(root: Path, counts: dict[str, int]) -> None:
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (20, 20), (40 * i, 100, 200 if label == "a" else 0)).save(root / label / f"{i}.png")


def test_image_folder_without_split_is_split_per_class(tmp_path):
    _image_tree(tmp_path, {"a": 5, "b": 5})
    cfg = vitzoo.create_model("vit_tiny_patch16_224", img_size=16).pretrained_cfg
    train, val = build_datasets(str(tmp_path), cfg, val_fraction=0.4)
    assert (len(train), len(val), num_classes(train)) == (6, 4, 2)
    assert train[0][0].shape == (3, 16, 16)


def test_labels_per_class_trains_on_that_many_images_of_each_class(tmp_path, bad_input):
    """A few-label run draws the same images for the same seed, every class alike, the validation split untouched."""
    cfg = vitzoo.create_model("vit_pico_patch4_32", img_size=16).pretrained_cfg
    train, val = build_datasets("digits", cfg)
    subset = labelled_subset(train, 3, seed=0)
    labels = dataset_labels(subset)
    assert labels.bincount().tolist() == [3] * 10 and set(subset.indices) <= set(range(len(train)))
    assert subset.indices == labelled_subset(train, 3, seed=0).indices != labelled_subset(train, 3, seed=1).indices
    assert torch.equal(labels, torch.stack([train[i][1] for i in subset.indices]))
    with pytest.raises(ValueError, match="fewer than labels_per_class=500; ask for at most") as many:
        labelled_subset(train, 500, seed=0)
    bad_input("--labels-per-class", "500 (digits' classes hold about 144)", str(many.value))
    fake, _ = build_datasets("torchvision:FakeData", cfg)
    with pytest.raises(ValueError, match="FakeData has none") as unlabelled:
        labelled_subset(fake, 2, seed=0)
    bad_input("--labels-per-class", "2 with --data torchvision:FakeData", str(unlabelled.value))
    config = FinetuneConfig(model="vit_pico_patch4_32", img_size=16, out=str(tmp_path), labels_per_class=2,
                            overrides=dict(depth=1, embed_dim=32), train=TrainConfig(steps=1, batch_size=8))
    summary = finetune(config, progress=False)
    assert summary["train_images"] == 20 and len(val) == 359


def test_bad_input_says_what_is_wrong(tmp_path):
    cfg = vitzoo.create_model("vit_tiny_patch16_224", img_size=16).pretrained_cfg
    with pytest.raises(FileNotFoundError, match="missing does not exist; an ImageFolder dataset"):
        build_datasets(str(tmp_path / "missing"), cfg)
    _image_tree(tmp_path / "empty", {"a": 2})
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(ValueError, match="class folders without images in .*: b"):
        build_datasets(str(tmp_path / "empty"), cfg)
    _image_tree(tmp_path / "broken", {"a": 3, "b": 3})
    (tmp_path / "broken" / "a" / "1.png").write_bytes(b"not a png")
    train, _ = build_datasets(str(tmp_path / "broken"), cfg, val_fraction=0.34)
    with pytest.raises(ValueError, match=r"cannot read image .*1.png .*delete or replace it"):
        [train[i] for i in range(len(train))]
    config = FinetuneConfig(model="vit_tiny_patch16_224", num_classes=5, img_size=16, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="num_classes=5 but the data has 10 classes"):
        finetune(config, progress=False)


def test_entry_points_print_bad_input_without_a_traceback(tmp_path, capsys):
    from vitzoo.bench import main as bench_main
    from vitzoo.train.finetune import main as finetune_main

    assert finetune_main(["vit_pico_patch4_32", "--data", str(tmp_path / "missing")]) == 2
    assert "python -m vitzoo.train: " in (err := capsys.readouterr().err) and "missing does not exist" in err
    assert bench_main(["vit_smal_patch16_224", "--compile", "off", "--device", "cpu"]) == 2
    assert "closest: vit_small_patch16_224" in capsys.readouterr().err


def test_augmentation_is_the_same_with_workers_and_after_a_resume(tmp_path):
    """Random crops and flips are seeded per (seed, epoch, sample): training on augmented images with two
    loader workers ends bit-identical to training without workers (dropout on), and so does a run with
    workers resumed mid-epoch from its step-2 checkpoint."""
    cfg = _model().pretrained_cfg
    train, _ = build_datasets("torchvision:FakeData", cfg, train_pixels=True)  # as vitzoo finetune reads them
    config = TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2)

    def run(workers: int, run_dir=None, resume=False) -> dict[str, torch.Tensor]:
        model = _model(proj_drop_rate=0.1)
        fit(model, train, None, replace(config, num_workers=workers), progress=False, run_dir=run_dir, resume=resume)
        return model.state_dict()

    reference = run(0)
    assert weights_digest(run(2)) == weights_digest(reference)
    run(2, tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    assert weights_digest(run(2, tmp_path, resume=True)) == weights_digest(reference)


def test_uint8_training_batches_train_as_normalised_images_do():
    """``train_pixels``: the workers hand over uint8 crops (a quarter of the bytes) and fit normalises each batch
    where it trains, with the same multiply-add the per-image transform makes: the weights end bit-identical."""
    cfg = _model().pretrained_cfg
    weights = []
    for pixels in (False, True):
        train, val = build_datasets("torchvision:FakeData", cfg, train_pixels=pixels)
        assert (train[0][0].dtype, val[0][0].dtype) == (torch.uint8 if pixels else torch.float32, torch.float32)
        model = _model(proj_drop_rate=0.1)
        fit(model, train, None, TrainConfig(steps=3, batch_size=16, warmup_steps=1), progress=False)
        weights.append(weights_digest(model.state_dict()))
    assert weights[0] == weights[1]
    with pytest.raises(ValueError, match="pass one of them"):
        build_datasets("torchvision:FakeData", cfg, native=True, train_pixels=True)


def test_mixup_and_cutmix_blend_images_and_labels():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    mixed, targets = mix_batch(x, y, 5, mixup=0.8)
    lam = targets[0, 0].item()  # sample 0 keeps lam of itself (class 0) and takes 1 - lam of sample 3
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    assert targets[0, 3].item() == pytest.approx(1 - lam) and torch.allclose(targets.sum(1), torch.ones(4))
    torch.manual_seed(0)
    cut, targets = mix_batch(x, y, 5, cutmix=1.0)
    pasted = (cut == x.flip(0)).all(1)
    assert (pasted | (cut == x).all(1)).all() and 0 < pasted[0].float().mean() < 1
    assert pasted[0].float().mean().item() == pytest.approx(1 - targets[0, 0].item())
    with pytest.raises(ValueError, match="mixup: must be >= 0"):
        TrainConfig(mixup=-1)


def test_mixing_resumes_exactly(tmp_path, digits_data):
    """Mixup and CutMix draw from the generator checkpoints save: resumed from step 2, the run ends
    bit-identical to the straight one (and differs from the same run without mixing)."""
    train, _ = digits_data
    config = TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, mixup=0.8, cutmix=1.0,
                         label_smoothing=0.1)

    def run(config: TrainConfig, run_dir=None, resume=False) -> str:
        model = _model()
        fit(model, train, None, config, progress=False, run_dir=run_dir, resume=resume)
        return weights_digest(model.state_dict())

    straight = run(config, tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    assert run(config, tmp_path, resume=True) == straight != run(replace(config, mixup=0.0, cutmix=0.0))


def test_resume_refuses_another_models_checkpoint(tmp_path, digits_data):
    train, _ = digits_data
    config = TrainConfig(steps=2, batch_size=16, warmup_steps=1)
    fit(_model(), train, None, config, progress=False, run_dir=tmp_path)
    with pytest.raises(ValueError, match="written with other settings: spec.depth 2 → 3. A resumed run"):
        fit(_model(depth=3), train, None, replace(config, steps=4), progress=False, run_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="written with other settings: batch_size 16 → 8. A resumed run"):
        fit(_model(), train, None, replace(config, steps=4, batch_size=8), progress=False, run_dir=tmp_path,
            resume=True)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    weights = {"w": torch.ones(2)}
    save_checkpoint(tmp_path, 1, weights, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # no temporary left
    restored, trainer, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert trainer["step"] == 1 and torch.equal(restored["w"], weights["w"])
