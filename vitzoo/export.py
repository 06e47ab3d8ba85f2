"""Export a model to ONNX, TorchScript or a ``torch.export`` program, checked against eager on load.

A file that loads but computes something else is worse than no file, and exporters fail quietly in
ways a successful export does not show (a size baked in where a dynamic one was asked for, an op
translated differently). So :func:`export` reloads what it wrote (ONNX Runtime on CPU,
``torch.export.load`` or ``torch.jit.load``), runs it on random images, and for dynamic exports on a
second batch size or image size too, and refuses the file when it differs from the eager model by more
than the tolerance.

Position tables are resampled with plain tensor ops (:func:`vitzoo.blocks.position.bicubic_weights`), so
a model exported at another size than its table's, or with a dynamic image size, exports to ONNX, which
has no antialiased bicubic resize.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.export import Dim

from vitzoo.arguments import (
    add_options,
    add_pretrained_option,
    add_set_option,
    parsed_fields,
    pretrained_value,
    spec_overrides,
)
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, check_fields, described
from vitzoo.registry import create_model
from vitzoo.vit import VisionTransformer

logger = logging.getLogger("vitzoo.export")

Format = Literal["onnx", "torchscript", "exported"]
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
ONNX_SINGLE_FILE_BYTES = 2**31  # protobuf's limit: larger ONNX models keep their weights in PATH.data
Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ExportConfig:
    """What ``vitzoo export`` writes. Each field carries its default, range and help
    (:func:`vitzoo.fields.described`), which the constructor checks and the command offers as options."""

    model: str = described(help="a registry name, name.tag or save_pretrained folder (see `vitzoo list`)")
    format: Format = described("onnx", "onnx (ONNX Runtime and other runtimes), torchscript (torch.jit.load) or "
                               "exported (torch.export .pt2, torch.export.load)")
    out: str | None = described(None, "file to write (None: the model's name with .onnx, .pt or .pt2, here)")
    dynamic_batch: bool = described(False, "accept any batch size, not only batch_size")
    dynamic_size: bool = described(False, "accept any image size that is a multiple of the patch size (a model "
                                   "built with dynamic_img_size=True; Qwen's merger: of two patches)")
    batch_size: int = described(2, "images in the example batch that the export traces and the check runs",
                                AT_LEAST_ONE)
    img_size: int | None = described(None, "export at this image size, the position table resampled once "
                                     "(None: the model's)", AT_LEAST_ONE)
    pretrained: bool | str = described(False, "True: the hub weights; a path: a file or save_pretrained folder")
    overrides: dict[str, Any] = described(help="spec fields, e.g. {'dynamic_img_size': True}", factory=dict)
    tolerance: float = described(1e-4, "largest max abs difference from eager accepted when the file is checked",
                                 POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self)


def _example_sizes(model: VisionTransformer, batch_size: int, img_size: tuple[int, int],
                   dynamic_batch: bool, dynamic_size: bool) -> list[tuple[int, int, int, int]]:
    """The input shapes the check runs: the traced one, then one with each dynamic dimension changed."""
    shapes = [(batch_size, model.spec.in_chans, *img_size)]
    if dynamic_batch or dynamic_size:
        p = _size_step(model)
        height, width = img_size
        shapes.append((batch_size + 1 if dynamic_batch else batch_size, model.spec.in_chans,
                       *((height + p, width + 2 * p) if dynamic_size else img_size)))
    return shapes


def _size_step(model: VisionTransformer) -> int:
    """The pixels a dynamic image side moves by: the patch size, times the cell side of a readout that needs
    whole cells of patches (Qwen's merger: 2)."""
    return model.spec.patch_size * getattr(model.attn_pool, "grid_multiple", 1)


def _dynamic_shapes(model: VisionTransformer, dynamic_batch: bool, dynamic_size: bool) -> dict[str, Any] | None:
    """The dimensions of ``images`` declared dynamic to the exporter: the batch, and the height and width as
    multiples of :func:`_size_step`."""
    if not (dynamic_batch or dynamic_size):
        return None
    dims: dict[int, Any] = {0: Dim("batch")} if dynamic_batch else {}
    if dynamic_size:
        p = _size_step(model)
        dims.update({2: p * Dim("rows"), 3: p * Dim("cols")})
    return {"images": dims}


def _check_dynamic_size(model: VisionTransformer, img_size: tuple[int, int], format: str) -> None:
    spec = model.spec
    if not spec.dynamic_img_size:
        raise ValueError(f"dynamic_size needs a model built with dynamic_img_size=True; this one takes only "
                         f"{spec.img_size[0]}x{spec.img_size[1]} images. Build it with "
                         f"vitzoo.create_model(name, dynamic_img_size=True), or on the command line add "
                         f"--set dynamic_img_size=true")
    if getattr(model.attn_pool, "reads_grid", False):
        raise ValueError(f"dynamic_size: pool={spec.pool.name!r} finds the patch grid from the number of "
                         f"tokens, which an export with a symbolic image size does not give; export at one size "
                         f"(img_size=...), or run the model eager, which takes any square size")
    p = _size_step(model)
    if img_size[0] % p or img_size[1] % p:
        why = f"patch_size={spec.patch_size}" + (f", times the cells pool={spec.pool.name!r} merges"
                                                 if p != spec.patch_size else "")
        raise ValueError(f"dynamic_size exports at a multiple of {p} pixels ({why}), got {img_size[0]}x{img_size[1]}; "
                         f"pass an img_size that is one")


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"format='onnx' needs {', '.join(missing)}: pip install 'vitzoo[export]' (or "
                                  f"pip install onnx onnxscript onnxruntime)")


def _write(model: VisionTransformer, path: Path, format: str, example: torch.Tensor,
           dynamic_shapes: dict[str, Any] | None) -> None:
    if format == "onnx":
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"], output_names=["logits"],
                          dynamic_shapes=dynamic_shapes, external_data=size >= ONNX_SINGLE_FILE_BYTES, verbose=False)
    elif format == "exported":
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes), str(path))
    else:
        torch.jit.save(torch.jit.script(model), str(path))


def _runner(path: Path, format: str) -> Runner:
    """The written file, loaded back as a function of images (outputs on the CPU)."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.cpu().numpy()})[0])
    loaded = torch.export.load(str(path)).module() if format == "exported" else torch.jit.load(str(path))
    return lambda x: loaded(x).cpu()


def check_export(model: VisionTransformer, path: str | Path, format: Format,
                 shapes: list[tuple[int, int, int, int]], tolerance: float = 1e-4, seed: int = 0) -> float:
    """Load the file ``model`` was exported to and run it on random images of each of ``shapes`` next to the
    eager model; the largest absolute difference. Raises ValueError naming the shape and the difference when
    it is over ``tolerance``, or when the file fails on a shape (a size the export baked in)."""
    run = _runner(Path(path), format)
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        images = torch.randn(shape, generator=generator).to(device=parameter.device, dtype=parameter.dtype)
        with torch.no_grad():
            expected = model(images).cpu()
        try:
            got = run(images)
        except Exception as err:  # any runtime's refusal, reported with the shape that caused it
            raise ValueError(f"the {format} file {path} fails on images of shape {shape}: "
                             f"{str(err).strip().splitlines()[-1]}") from err
        if got.shape != expected.shape:
            raise ValueError(f"the {format} file {path} gives an output of shape {tuple(got.shape)} for images of "
                             f"shape {shape}; eager gives {tuple(expected.shape)}")
        difference = (got.float() - expected.float()).abs().max().item()
        if not difference <= tolerance:
            raise ValueError(f"the {format} file {path} differs from eager by {difference:.3g} (max abs) on images "
                             f"of shape {shape}, more than the tolerance {tolerance:g}; do not use it")
        worst = max(worst, difference)
    return worst


def export(
    model_or_name: VisionTransformer | str, path: str | Path | None = None, format: Format = "onnx", *,
    dynamic_batch: bool = False, dynamic_size: bool = False, batch_size: int = 2, img_size: int | None = None,
    tolerance: float = 1e-4, **create_kwargs: Any,
) -> Path:
    """Write a model to ``path`` as ONNX (``.onnx``), TorchScript (``.pt``) or a ``torch.export`` program
    (``.pt2``), then load the file back and check it against the eager model (:func:`check_export`); the path.

    ``model_or_name`` is a model or what :func:`vitzoo.create_model` takes (``create_kwargs`` go there,
    e.g. ``pretrained=True``, ``dynamic_img_size=True``). ``dynamic_batch`` and ``dynamic_size`` declare the
    batch and the image size (multiples of the patch size) dynamic; ``img_size`` exports at another size
    (for a name, the model is built at that size, its position table resampled once). The model is
    exported in eval mode and left in the mode it was in.
    """
    if format not in SUFFIXES:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(SUFFIXES)}")
    if format == "onnx":
        _require_onnx()
    if isinstance(model_or_name, str):
        sizes = {"img_size": img_size} if img_size is not None else {}
        model = create_model(model_or_name, **sizes, **create_kwargs)
        name = Path(model_or_name).name
    elif create_kwargs:
        raise ValueError(f"{', '.join(create_kwargs)} build a model by name; with a model given, build it so")
    else:
        model, name = model_or_name, model_or_name.pretrained_cfg.get("architecture", "model")
    size = (img_size, img_size) if img_size is not None else tuple(model.spec.img_size)
    if dynamic_size:
        _check_dynamic_size(model, size, format)
    path = Path(path) if path is not None else Path(name + SUFFIXES[format])
    shapes = _example_sizes(model, batch_size, size, dynamic_batch, dynamic_size)
    parameter = next(model.parameters())
    # traced at the larger shape: a dynamic batch or grid traced at 1 would be fixed at 1
    example = torch.randn(shapes[-1], device=parameter.device, dtype=parameter.dtype)
    training = model.training
    model.eval()
    try:
        _write(model, path, format, example, _dynamic_shapes(model, dynamic_batch, dynamic_size))
        difference = check_export(model, path, format, shapes, tolerance)
    finally:
        model.train(training)
    logger.info("wrote %s (%s); on load it is within %.3g of eager (max abs) on images of shape %s", path, format,
                difference, ", ".join(str(s) for s in shapes))
    return path


def _config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(**{**parsed_fields(ExportConfig, args), "pretrained": pretrained_value(args),
                           "overrides": spec_overrides(args)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vitzoo export``: the fields of :class:`ExportConfig`, and ``--pretrained`` and ``--set``
    as ``vitzoo finetune`` has them."""
    add_options(p, ExportConfig, ["model", "format", "out", "dynamic_batch", "dynamic_size", "batch_size",
                                  "img_size"])
    add_pretrained_option(p, "export with")
    add_set_option(p, "override a spec field, e.g. --set dynamic_img_size=true (repeatable)")
    add_options(p, ExportConfig, ["tolerance"])


def run(config: ExportConfig) -> Path:
    """Export what ``config`` describes (``vitzoo export``)."""
    kwargs = {"pretrained": config.pretrained} if config.pretrained else {}
    return export(config.model, config.out, config.format, dynamic_batch=config.dynamic_batch,
                  dynamic_size=config.dynamic_size, batch_size=config.batch_size, img_size=config.img_size,
                  tolerance=config.tolerance, **kwargs, **config.overrides)


def _cmd_export(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(run(_config_from_args(args)))
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    """``vitzoo export``: a model to ONNX, TorchScript or torch.export, checked on load."""
    parser = sub.add_parser("export", help="write a model as ONNX, TorchScript or torch.export (.pt2), checked "
                            "against eager on load")
    add_arguments(parser)
    parser.set_defaults(func=_cmd_export)
