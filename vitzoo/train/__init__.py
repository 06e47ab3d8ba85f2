"""Training: data sources, the optimizer recipe, and the loop shared by fine-tuning and ablations."""

from vitzoo.train.data import build_datasets, digits, image_transforms
from vitzoo.train.loop import TrainConfig, TrainResult, evaluate, fit
from vitzoo.train.recipe import build_optimizer, freeze_backbone, param_groups, warmup_cosine

__all__ = [
    "TrainConfig", "TrainResult", "build_datasets", "build_optimizer", "digits", "evaluate", "fit",
    "freeze_backbone", "image_transforms", "param_groups", "warmup_cosine",
]
