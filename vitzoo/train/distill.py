"""Knowledge distillation: the student learns from a frozen teacher's predictions as well as from the labels.

Soft distillation (Hinton et al. 2015) matches the student's temperature-softened distribution to the
teacher's: ``KL(softmax(t / T) || softmax(s / T)) * T^2`` (the ``T^2`` keeps its gradients on the scale of
the label loss), averaged over the batch. Hard distillation (DeiT, Touvron et al. 2021) is the cross-entropy
to the teacher's top-1 class. Either is mixed with the label loss: ``(1 - alpha) * label + alpha * distill``.

A student with a distillation token (DeiT's ``head_dist``, the ``deit_*_distilled_*`` names) is trained as in
DeiT: its class head learns from the labels, its distillation head from the teacher (alpha 0.5: the average
of the two losses), and in evaluation it predicts with the mean of both heads, as timm's model does.

The teacher sees the images the student trains on: the student's crop, flip and mixup/cutmix blend, put into
the teacher's own size and normalisation (:mod:`vitzoo.train.teacher`). The label loss uses the mixed targets,
the distillation loss the teacher's prediction for the mixed image, as DeiT does. The teacher is not part of
the student's checkpoints; its settings and a digest of its weights are, so a resume with another teacher is
refused.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo.arguments import add_options, parsed_fields
from vitzoo.fields import NON_NEGATIVE, POSITIVE, check_fields, described
from vitzoo.train.distributed import weights_digest
from vitzoo.train.objective import Objective, label_loss
from vitzoo.train.teacher import Teacher, data_cfg, load_teacher


@dataclass
class DistillConfig:
    """Which teacher the student learns from and how; no teacher: plain training on the labels."""

    teacher: str | None = described(None, "distil from this teacher: a registry name, a save_pretrained folder, "
                                    "a finetune run folder or checkpoint, or timm:NAME")
    teacher_pretrained: bool | str = described(False, "the teacher's weights (registry name or timm:NAME): True "
                                               "for the hub's (through the local cache), or a file")
    distill: Literal["soft", "hard"] = described("soft", "soft: KL to the teacher's softened distribution; hard: "
                                                 "cross-entropy to its top-1 class (DeiT)")
    distill_alpha: float = described(0.5, "weight of the distillation loss against the label loss, in [0, 1]",
                                     NON_NEGATIVE)
    distill_temperature: float = described(2.0, "softmax temperature of soft distillation", POSITIVE)
    teacher_dtype: Literal["fp32", "bf16"] = described("fp32", "the teacher's precision (bf16: autocast)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.distill_alpha > 1:
            raise ValueError(f"distill_alpha={self.distill_alpha} must be in [0, 1]: the share of the distillation "
                             f"loss, the labels' being 1 - distill_alpha")
        changed = [f.name for f in fields(self) if f.name != "teacher" and getattr(self, f.name) != f.default]
        if self.teacher is None and changed:
            raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in changed)} set without a teacher; "
                             f"name one with --teacher")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mode: Literal["soft", "hard"],
                      temperature: float = 1.0, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Soft: ``KL(softmax(teacher / T) || softmax(student / T)) * T^2`` per image; hard: cross-entropy to the
    teacher's top-1 class. Mean or sum over the batch, in fp32."""
    student, teacher = student.float(), teacher.float()
    if mode == "hard":
        return F.cross_entropy(student, teacher.argmax(-1), reduction=reduction)
    per_class = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                         reduction="none", log_target=True)
    total = per_class.sum() * temperature**2
    return total if reduction == "sum" else total / len(student)


class Distillation(Objective):
    """The label loss mixed with a distillation loss from ``teacher``; logs ``train_distill_loss`` and the
    validation figures ``val_distill_loss`` and ``val_agreement`` (how often the student's top-1 class is the
    teacher's)."""

    val_names = ("val_distill_loss", "val_agreement")

    def __init__(self, teacher: Teacher, config: DistillConfig) -> None:
        self.teacher, self.config = teacher, config

    @property
    def settings(self) -> dict[str, Any]:
        # the teacher's weights, besides its name: a run folder or file named as before may hold others by now
        return {"teacher_weights": weights_digest(self.teacher.model.state_dict())}

    def prepare(self, model: nn.Module) -> None:
        if getattr(model, "head_dist", None) is not None:
            model.set_distilled_training(True)  # (class logits, distillation logits) in training

    def loss(self, output: Any, images: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cls, dist = output if isinstance(output, tuple) else (output, output)
        config = self.config
        distill = distillation_loss(dist, self.teacher(images), config.distill, config.distill_temperature)
        loss = (1 - config.distill_alpha) * label_loss(cls, targets, label_smoothing) + config.distill_alpha * distill
        return loss, {"distill_loss": distill.detach()}

    def val_sums(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        teacher = self.teacher(images)
        config = self.config
        return torch.stack([
            distillation_loss(logits, teacher, config.distill, config.distill_temperature, reduction="sum"),
            (logits.argmax(-1) == teacher.argmax(-1)).sum(),
        ]).double().cpu()


def build_distillation(config: DistillConfig, student_cfg: dict[str, Any], classes: int, device: str,
                       data: str = "the data") -> Distillation | None:
    """The distillation objective of a run (None without a teacher), its teacher on ``device``; a teacher that
    predicts other classes than the data's is refused."""
    if config.teacher is None:
        return None
    model = load_teacher(config.teacher, config.teacher_pretrained)
    if model.num_classes != classes:
        raise ValueError(f"the teacher {config.teacher} predicts {model.num_classes} classes and {data} has {classes}; "
                         f"a teacher must be trained on the same classes, in the same order (e.g. a vitzoo finetune "
                         f"run on this data: --teacher <its run folder>)")
    teacher = Teacher(model.to(device), data_cfg(model), student_cfg, config.teacher, config.teacher_dtype)
    return Distillation(teacher, config)


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """``--teacher``, ``--teacher-pretrained [PATH|true]`` and the distillation options of :class:`DistillConfig`."""
    add_options(parser, DistillConfig, ["teacher"])
    parser.add_argument("--teacher-pretrained", nargs="?", const="true", default=None, metavar="PATH|true",
                        help="the teacher's weights (with a registry name or timm:NAME): true (or no value) for the "
                             "hub's, through the local cache, or a weights file")
    add_options(parser, DistillConfig, ["distill", "distill_alpha", "distill_temperature", "teacher_dtype"])


def distill_config_from_args(args: argparse.Namespace) -> DistillConfig:
    given = args.teacher_pretrained
    pretrained = False if given is None else True if given.lower() in ("true", "hub") else given
    return DistillConfig(**parsed_fields(DistillConfig, args, exclude={"teacher_pretrained"}),
                         teacher_pretrained=pretrained)
