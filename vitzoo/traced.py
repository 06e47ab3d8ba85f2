"""TorchScript for vitzoo models: ``torch.jit.script(model)`` compiles a trace at the model's input size.

The blocks are einops patterns and Python over a spec, which the TorchScript subset does not cover, so
:meth:`VisionTransformer.__prepare_scriptable__ <vitzoo.vit.VisionTransformer.__prepare_scriptable__>`
hands ``torch.jit.script`` a ``torch.jit.trace`` of the model instead. The result runs, saves with
``torch.jit.save`` and loads with ``torch.jit.load`` like any script module, at any batch size; a model built
for one image size takes that size, one built with ``dynamic_img_size`` takes any (square ones where its readout
reads cells of the patch grid).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class TracedModel(nn.Module):
    """A ``torch.jit.trace`` of a model behind a forward that TorchScript can compile.

    ``torch.jit.script`` compiles a module it is given, and cannot compile a traced module itself; it can
    compile one that calls it. The state_dict keys are the model's with the prefix ``model.``.
    """

    def __init__(self, traced: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.model = traced

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def trace_at_input_size(model: nn.Module) -> TracedModel:
    """``model`` traced in eval mode on one image of its ``img_size`` (see below), its weights shared, its mode
    restored.

    The trace records the computation for that size: the checks and branches that depend on the image size
    run once while tracing. A model that takes any size (``dynamic_img_size``) is traced six patches a side
    larger instead: at its own size there is no position table or rotary grid to resize, and a trace that
    records no resizing takes that size only; with the resizing recorded on traced sizes it takes any. torch's
    TracerWarnings about them are expected, and so is the deprecation of ``torch.jit.trace`` behind the
    ``torch.jit.script`` call that asked for it: both are silenced here.
    """
    spec = model.spec
    ref = next(model.parameters())
    size = spec.img_size
    if spec.dynamic_img_size:  # a model of any size: traced at another one
        size = tuple(side + 6 * spec.patch_size for side in size)
    example = torch.randn(1, spec.in_chans, *size, device=ref.device, dtype=ref.dtype)
    training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", r"`torch\.jit\.trace", FutureWarning)
            traced = torch.jit.trace(model, example)
    finally:
        model.train(training)
    return TracedModel(traced)
