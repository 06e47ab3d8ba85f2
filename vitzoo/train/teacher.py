"""A frozen teacher for distillation: found by name or path, fed images the way it was trained to see them.

``--teacher`` names a vitzoo registry model (with ``--teacher-pretrained`` its hub weights or a file), a
``save_pretrained`` folder, a ``vitzoo finetune`` run folder (its latest checkpoint) or one of its checkpoint
folders, or ``timm:NAME``, built with ``timm.create_model``. The teacher keeps its own preprocessing: the
student's batch, already cropped, flipped (and mixed) for the student and normalised with the student's
mean/std, is un-normalised, resized to the teacher's input size and normalised with the teacher's mean/std
(:func:`teacher_view`), on the batch tensor in the training process. So the teacher sees the student's crops
and augmentation, at its own resolution and colour statistics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.data import resolve_data_config
from torch import nn

from vitzoo.lora import folded_adapters
from vitzoo.migrate import spec_from_saved
from vitzoo.registry import create_model
from vitzoo.train.checkpoint import latest_checkpoint, load_checkpoint
from vitzoo.vit import VisionTransformer
from vitzoo.weights import WeightsError, load_weights, read_state_dict, to_timm_layout
from vitzoo.weights.export import is_pretrained_folder

TIMM_PREFIX = "timm:"
HEAD_WEIGHTS = ("head.weight", "head.fc.weight")  # a plain head, and the head of a model with a map readout


def teacher_view(images: torch.Tensor, student: dict[str, Any], teacher: dict[str, Any]) -> torch.Tensor:
    """The student's normalised batch as the teacher expects it: un-normalised with the student's mean/std,
    resized to the teacher's input size (its interpolation, antialiased) and normalised with the teacher's.
    ``student`` and ``teacher`` are data configs (``input_size``, ``mean``, ``std``, ``interpolation``); the
    batch comes back unchanged where they agree."""
    channels, height, width = teacher["input_size"]
    if images.shape[1] != channels:
        raise ValueError(f"the teacher takes {channels}-channel images and the student's batch has "
                         f"{images.shape[1]}; distill between models with the same input channels")
    same_stats = tuple(student["mean"]) == tuple(teacher["mean"]) and tuple(student["std"]) == tuple(teacher["std"])
    if same_stats and tuple(images.shape[-2:]) == (height, width):
        return images

    def stats(cfg: dict[str, Any], key: str) -> torch.Tensor:
        return rearrange(torch.tensor(cfg[key][:channels], dtype=images.dtype, device=images.device), "c -> 1 c 1 1")

    pixels = images * stats(student, "std") + stats(student, "mean")
    if tuple(pixels.shape[-2:]) != (height, width):
        mode = teacher.get("interpolation", "bicubic")
        smooth = mode in ("bilinear", "bicubic")
        pixels = F.interpolate(pixels, size=(height, width), mode=mode, antialias=smooth,
                               **({"align_corners": False} if smooth else {}))
    return (pixels - stats(teacher, "mean")) / stats(teacher, "std")


class Teacher:
    """A model that only predicts: eval mode, no gradients, its own preprocessing, fp32 or bf16 autocast."""

    def __init__(self, model: nn.Module, cfg: dict[str, Any], student_cfg: dict[str, Any], source: str,
                 dtype: Literal["fp32", "bf16"] = "fp32") -> None:
        self.model = model.eval().requires_grad_(False)
        self.cfg, self.student_cfg, self.source, self.dtype = cfg, student_cfg, source, dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 logits for a batch of the student's images."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            return self.model(teacher_view(images, self.student_cfg, self.cfg)).float()


def data_cfg(model: nn.Module) -> dict[str, Any]:
    """The preprocessing a teacher (vitzoo's or timm's) was trained with, read as timm reads it."""
    return resolve_data_config(model=model)


def load_teacher(source: str, pretrained: bool | str = False) -> nn.Module:
    """The teacher ``source`` names (see the module docstring), weights loaded, classifier as saved."""
    if source.startswith(TIMM_PREFIX):
        return _timm_teacher(source.removeprefix(TIMM_PREFIX), pretrained)
    path = Path(source)
    if "/" in source or path.exists():
        if pretrained is not False:
            raise ValueError(f"--teacher {source} is a path that brings its own weights; drop --teacher-pretrained "
                             f"(it goes with a registry name or timm:NAME)")
        return _teacher_from_path(path)
    if isinstance(pretrained, str):
        return create_model(source, pretrained=pretrained, num_classes=_head_rows(_timm_layout(pretrained), pretrained))
    return create_model(source, pretrained=pretrained)


def _teacher_from_path(path: Path) -> VisionTransformer:
    if is_pretrained_folder(path):
        return create_model(str(path))
    if (path / "run.json").is_file():
        checkpoint = latest_checkpoint(path / "checkpoints")
        if checkpoint is None:
            raise FileNotFoundError(f"the run {path} has no checkpoint yet; let it train, or point --teacher at "
                                    f"another run")
        return _from_run_checkpoint(checkpoint)
    if (path / "trainer.pt").is_file():
        return _from_run_checkpoint(path)
    if path.is_file():
        raise ValueError(f"--teacher {path} is a weights file, which does not say which model it belongs to; pass "
                         f"--teacher NAME --teacher-pretrained {path} (NAME: a registry name or timm:NAME)")
    raise FileNotFoundError(f"--teacher {path} is neither a save_pretrained folder, a vitzoo finetune run folder "
                            f"(run.json, checkpoints/) nor one of its checkpoints (trainer.pt)")


def _from_run_checkpoint(checkpoint: Path) -> VisionTransformer:
    """The model of a fine-tuning checkpoint: its exact spec, its run's preprocessing, its weights loaded strictly."""
    run_file = checkpoint.parent.parent / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(f"{checkpoint} lies outside its run folder (no {run_file}), which says how the model "
                                f"preprocesses images; point --teacher at the run folder or its checkpoint in place")
    run = json.loads(run_file.read_text())
    weights, trainer, _ = load_checkpoint(checkpoint)
    weights = folded_adapters(weights, trainer, checkpoint)  # a --lora run's checkpoint: the adapted model
    with torch.device("meta"):  # only the run's preprocessing config is needed
        cfg = create_model(run["model"], img_size=run.get("img_size"), **run.get("overrides", {})).pretrained_cfg
    model = VisionTransformer(spec_from_saved(trainer["spec"]), pretrained_cfg={**cfg, "file": str(checkpoint)})
    load_weights(model, weights, adapt=False)
    return model


def _timm_layout(path: str) -> dict[str, torch.Tensor]:
    return to_timm_layout(read_state_dict(path))[0]


def _head_rows(weights: dict[str, torch.Tensor], path: str) -> int:
    """The classes a weights file's classifier predicts; a file without one cannot teach."""
    key = next((k for k in HEAD_WEIGHTS if k in weights), None)
    if key is None:
        raise WeightsError(f"{path} holds no classifier ({' or '.join(HEAD_WEIGHTS)}), so it cannot teach classes; "
                           f"pass the weights of a model fine-tuned on the data")
    return weights[key].shape[0]


def _timm_teacher(name: str, pretrained: bool | str) -> nn.Module:
    """timm's ``name``: random, its hub weights (through the local Hugging Face cache) or a file's, head included."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"timm has no model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if not isinstance(pretrained, str):
        return timm.create_model(name, pretrained=pretrained)
    weights = read_state_dict(pretrained)
    model = timm.create_model(name, pretrained=False)
    classifier = model.pretrained_cfg.get("classifier", "head")
    key = f"{classifier if isinstance(classifier, str) else classifier[0]}.weight"
    if key not in weights:
        raise WeightsError(f"{pretrained} holds no {key}, the classifier of timm's {name}, so it cannot teach classes; "
                           f"pass the weights of that model fine-tuned on the data")
    if weights[key].shape[0] != model.num_classes:
        model.reset_classifier(weights[key].shape[0])
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{pretrained} does not fit timm's {name}: {str(err).splitlines()[0]} ...; pass the "
                           f"weights saved from that model") from None
    return model
