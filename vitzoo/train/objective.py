"""What a training step minimises, and what evaluation measures besides the labels' loss and accuracy.

The plain objective is the cross-entropy of the model's logits to the (possibly mixed, possibly smoothed)
targets. A richer one (distillation from a teacher, :mod:`vitzoo.train.distill`) subclasses it: it may ask
the model for another output in training (:meth:`Objective.prepare`), add terms to the loss that the run
logs as ``train_<name>`` (the mean over the steps since the previous evaluation), add validation figures
``val_<name>`` summed over the validation batches, and name settings of its own that a checkpoint records,
so a resume with other ones is refused (:mod:`vitzoo.train.settings`). An objective without labels (a masked
autoencoder's, :mod:`vitzoo.train.mae`) says its model predicts no classes: evaluation then measures only its
own figures, ``val_loss`` among them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def label_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy in fp32 to class indices or to rows of class probabilities (mixup, cutmix)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


class Objective:
    """Cross-entropy to the targets; the base of objectives that add terms, figures and settings."""

    # the validation figures :meth:`val_sums` adds up, divided by the number of images at the end
    val_names: tuple[str, ...] = ()
    # whether the model's output is class logits, which evaluation scores against the labels as ``val_loss``
    # (cross-entropy) and ``val_acc`` (top-1); without, ``val_loss`` must be one of :attr:`val_names`
    classifies: bool = True

    @property
    def settings(self) -> dict[str, Any]:
        """What else defines the run's result (recorded in checkpoints, refused on resume if changed)."""
        return {}

    def prepare(self, model: nn.Module) -> None:
        """Set the model up for training under this objective, before it is wrapped or compiled."""

    def loss(self, output: Any, images: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss to minimise, the terms to log by name) of one micro-batch."""
        return label_loss(output, targets, label_smoothing), {}

    def val_sums(self, images: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The sums of :attr:`val_names` over one validation batch from the model's output (in eval mode)."""
        return output.new_zeros(0, dtype=torch.float64)
