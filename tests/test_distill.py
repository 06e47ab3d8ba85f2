"""Distillation: the student learns the teacher's function, DeiT's two heads, the teacher's own preprocessing,
gradient accumulation, exact resume, and the teachers that are refused.

The teacher is a pico ViT trained briefly on digits whose classifier rows are then rotated by one: it says
"the next digit". A student that learns from the labels cannot agree with it; only distillation can.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from torchvision.transforms import v2 as T

import vitzoo
from vitzoo.train import TrainConfig, fit
from vitzoo.train.checkpoint import latest_checkpoint
from vitzoo.train.data import build_datasets
from vitzoo.train.distill import DistillConfig, build_distillation, distillation_loss
from vitzoo.train.finetune import FinetuneConfig, add_arguments, finetune
from vitzoo.train.finetune import _config_from_args as config_from_args
from vitzoo.train.teacher import data_cfg, load_teacher, teacher_view
from vitzoo.weights import read_state_dict, save_pretrained, write_state_dict

PICO = dict(model="vit_pico_patch4_32", img_size=16)
STUDENT = dict(depth=1, embed_dim=32)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A save_pretrained folder: pico (one block, 16 px) trained 100 steps, its classes rotated by one."""
    root = tmp_path_factory.mktemp("teacher")
    finetune(FinetuneConfig(**PICO, overrides=dict(depth=1), out=str(root / "run"),
                            train=TrainConfig(steps=100, batch_size=32, lr=1e-3, warmup_steps=10)), progress=False)
    model = vitzoo.create_model("vit_pico_patch4_32", img_size=16, depth=1, num_classes=10)
    model.load_state_dict(read_state_dict(latest_checkpoint(root / "run" / "checkpoints") / "model.safetensors"))
    with torch.no_grad():
        for param in (model.head.weight, model.head.bias):
            param.copy_(param.roll(1, 0))
    return save_pretrained(model, root / "next_digit")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_the_student_learns_the_teachers_function(teacher, tmp_path, mode):
    """Over 60 steps the distillation loss falls and the student's top-1 comes to match the teacher's, which is
    not the labels' (its accuracy stays near chance); both are scalars of metrics.jsonl and metrics.csv."""
    out = tmp_path / mode
    finetune(FinetuneConfig(**PICO, overrides=STUDENT, out=str(out), eval_every=20,
                            train=TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5),
                            distillation=DistillConfig(teacher=str(teacher), distill=mode, distill_alpha=1.0)),
             progress=False)
    rows = _rows(out)
    first, last = rows[0], rows[-1]
    assert last["train_distill_loss"] < 0.9 * first["train_distill_loss"]
    assert last["val_distill_loss"] < first["val_distill_loss"]
    assert last["val_agreement"] > first["val_agreement"] + 0.1
    assert last["val_agreement"] > last["val_acc"] + 0.15
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_distill_loss", "val_distill_loss", "val_agreement"} <= set(header)
    assert json.loads((out / "summary.json").read_text())["val_agreement"] == last["val_agreement"]


def test_distillation_loss_is_hintons_and_deits():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    assert distillation_loss(teacher, teacher, "soft", 3.0).abs() < 1e-6
    soft = distillation_loss(student, teacher, "soft", 2.0)
    expected = sum((p * (p.log() - q.log())).sum() for p, q in zip(
        (teacher / 2).softmax(-1), (student / 2).softmax(-1), strict=True)) * 4 / len(student)
    torch.testing.assert_close(soft, expected)
    hard = distillation_loss(student, teacher, "hard", reduction="sum")
    torch.testing.assert_close(hard, torch.nn.functional.cross_entropy(student, teacher.argmax(-1), reduction="sum"))


def test_a_deit_student_trains_its_distillation_head_from_the_teacher(teacher):
    """alpha=1 without weight decay: only the teacher teaches, so the class head stays as it was and the
    distillation head moves; in eval the model predicts with the mean of its two heads, as timm's does. The
    student (ImageNet mean/std) and the teacher (0.5/0.5) normalise differently; the teacher runs in bf16."""
    torch.manual_seed(0)
    student = vitzoo.create_model("deit_tiny_distilled_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=32,
                                  num_heads=2, num_classes=10)
    train, val = build_datasets("digits", student.pretrained_cfg)
    objective = build_distillation(DistillConfig(teacher=str(teacher), distill="hard", distill_alpha=1.0,
                                                 teacher_dtype="bf16"), student.pretrained_cfg, 10, "cpu")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = fit(student, train, val, TrainConfig(steps=4, batch_size=32, weight_decay=0.0, warmup_steps=1,
                                                  eval_every=4), progress=False, objective=objective)
    after = student.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in ("head.weight", "head.bias"))
    assert not torch.equal(after["head_dist.weight"], before["head_dist.weight"])
    assert len(result.terms["distill_loss"]) == 4 and "val_agreement" in result.evals[-1]
    student.eval()
    images = val[0][0][None]
    tokens = student.forward_features(images)
    torch.testing.assert_close(student(images), (student.head(tokens[:, 0]) + student.head_dist(tokens[:, 1])) / 2)


def test_the_teacher_sees_its_own_normalisation_and_size(tmp_path):
    """Digits normalised for the student, un-normalised and normalised again for the teacher, are the digits
    normalised for the teacher; a timm teacher at 160 px with ImageNet statistics gets its batch at 160 px,
    resized from the student's pixels, and its logits are timm's for that batch."""
    student_cfg = vitzoo.create_model("vit_pico_patch4_32", img_size=16, depth=1).pretrained_cfg
    imagenet_cfg = {**student_cfg, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    (as_student, _), (as_teacher, _) = (build_datasets("digits", cfg)[0][0] for cfg in (student_cfg, imagenet_cfg))
    assert not torch.allclose(as_student, as_teacher)
    torch.testing.assert_close(teacher_view(as_student[None], student_cfg, imagenet_cfg), as_teacher[None])
    same = as_student[None]
    assert teacher_view(same, student_cfg, student_cfg) is same  # nothing to change: the batch itself

    torch.manual_seed(0)
    reference = timm.create_model("test_efficientnet", num_classes=10).eval()
    weights = write_state_dict(reference.state_dict(), tmp_path / "teacher.safetensors")
    objective = build_distillation(DistillConfig(teacher="timm:test_efficientnet", teacher_pretrained=str(weights)),
                                   student_cfg, 10, "cpu")
    seen = []
    objective.teacher.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = torch.stack([build_datasets("digits", student_cfg)[1][i][0] for i in range(4)])
    logits = objective.teacher(batch)
    pixels = T.functional.resize(batch * 0.5 + 0.5, [160, 160], interpolation=T.InterpolationMode.BICUBIC,
                                 antialias=True)
    expected = T.functional.normalize(pixels, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert seen[0].shape == (4, 3, 160, 160) and data_cfg(reference)["input_size"] == (3, 160, 160)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(expected), atol=1e-4, rtol=1e-4)


def test_every_kind_of_teacher_loads_its_own_weights(teacher, tmp_path):
    """A finetune run folder (its latest checkpoint), one of its checkpoints, a save_pretrained folder and a
    registry name with a weights file: each teacher comes with the classifier it was saved with."""
    run = teacher.parent / "run"
    checkpoint = latest_checkpoint(run / "checkpoints")
    saved = read_state_dict(checkpoint / "model.safetensors")
    for source in (run, checkpoint):
        model = load_teacher(str(source))
        assert model.pretrained_cfg["input_size"] == (3, 16, 16) and model.num_classes == 10
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert torch.equal(load_teacher(str(teacher)).head.bias, saved["head.bias"].roll(1, 0))
    torch.manual_seed(0)
    weights = vitzoo.create_model("vit_pico_patch4_32", num_classes=7).state_dict()
    model = load_teacher("vit_pico_patch4_32", str(write_state_dict(weights, tmp_path / "pico.safetensors")))
    assert model.num_classes == 7 and all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_gradient_accumulation_matches_the_large_batch(teacher):
    student_cfg = vitzoo.create_model("vit_pico_patch4_32", img_size=16).pretrained_cfg
    train, _ = build_datasets("digits", student_cfg)
    objective = build_distillation(DistillConfig(teacher=str(teacher)), student_cfg, 10, "cpu")
    base = TrainConfig(steps=3, batch_size=16, warmup_steps=1, grad_clip=None)
    models = []
    for config in (base, replace(base, batch_size=8, accum_steps=2)):
        torch.manual_seed(0)
        models.append(vitzoo.create_model("vit_pico_patch4_32", img_size=16, num_classes=10, **STUDENT))
        fit(models[-1], train, None, config, progress=False, objective=objective)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def _distilled_run(out: Path, teacher: Path, **changes) -> FinetuneConfig:
    return FinetuneConfig(**PICO, overrides=STUDENT, out=str(out), eval_every=2, checkpoint_every=3,
                          train=TrainConfig(steps=6, batch_size=32, warmup_steps=1, mixup=0.8, cutmix=1.0,
                                            keep_checkpoints=3),
                          distillation=DistillConfig(teacher=str(teacher), **changes))


def test_resume_is_exact_and_refuses_another_teacher(teacher, tmp_path, bad_input):
    """A run cut back to its step-3 checkpoint resumes to the uninterrupted run's weights and rows (the
    distillation loss of step 4 averages steps 3 and 4, across the resume). Another teacher is refused, and
    so is the same teacher folder holding other weights; the teacher is in no checkpoint."""
    mine = tmp_path / "teacher"
    shutil.copytree(teacher, mine)
    out = tmp_path / "run"
    straight = finetune(_distilled_run(out, mine), progress=False)
    rows = _rows(out)
    checkpoints = out / "checkpoints"
    assert set(read_state_dict(checkpoints / "step_00000006" / "model.safetensors")) == set(
        vitzoo.create_model("vit_pico_patch4_32", img_size=16, num_classes=10, **STUDENT).state_dict())
    shutil.rmtree(checkpoints / "step_00000006")
    (checkpoints / "latest").write_text("step_00000003")
    resumed = finetune(replace(_distilled_run(out, mine), resume=True), progress=False)
    assert resumed["weights_digest"] == straight["weights_digest"] and _rows(out) == rows

    (checkpoints / "latest").write_text("step_00000003")
    with pytest.raises(ValueError, match="distill 'soft' → 'hard'") as refused:
        finetune(replace(_distilled_run(out, mine, distill="hard"), resume=True), progress=False)
    bad_input("vitzoo finetune --resume", "--distill hard (started with soft)", str(refused.value))
    other = vitzoo.from_pretrained(mine)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    save_pretrained(other, mine)
    with pytest.raises(ValueError, match="teacher_weights") as refused:
        finetune(replace(_distilled_run(out, mine), resume=True), progress=False)
    bad_input("vitzoo finetune --resume", "--teacher FOLDER whose weights changed since the run started",
              str(refused.value))


def test_a_teacher_of_other_classes_is_refused_before_training(tmp_path, bad_input):
    out = tmp_path / "run"
    config = FinetuneConfig(**PICO, overrides=STUDENT, out=str(out),
                            distillation=DistillConfig(teacher="vit_pico_patch4_32"))
    with pytest.raises(ValueError, match="predicts 1000 classes and digits has 10") as refused:
        finetune(config, progress=False)
    bad_input("vitzoo finetune", "--teacher vit_pico_patch4_32 (1000 classes) on digits (10)", str(refused.value))
    assert not (out / "run.json").exists()
    with pytest.raises(ValueError, match="weights file") as refused:
        build_distillation(DistillConfig(teacher=str(write_state_dict({}, tmp_path / "w.safetensors"))), {}, 10, "cpu")
    bad_input("vitzoo finetune", "--teacher FILE.safetensors", str(refused.value))


def test_command_line_options(bad_input):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["vit_pico_patch4_32", "--teacher", "timm:vit_tiny_patch16_224", "--teacher-pretrained",
                              "--distill", "hard", "--distill-alpha", "1", "--teacher-dtype", "bf16"])
    assert config_from_args(args).distillation == DistillConfig(
        teacher="timm:vit_tiny_patch16_224", teacher_pretrained=True, distill="hard", distill_alpha=1.0,
        teacher_dtype="bf16")
    with pytest.raises(ValueError, match="--distill-alpha set without a teacher") as refused:
        config_from_args(parser.parse_args(["vit_pico_patch4_32", "--distill-alpha", "0.7"]))
    bad_input("vitzoo finetune", "--distill-alpha 0.7 without --teacher", str(refused.value))
    with pytest.raises(ValueError, match="naflex"):
        FinetuneConfig(model="vit_pico_patch4_32", train=TrainConfig(naflex=True),
                       distillation=DistillConfig(teacher="x"))
