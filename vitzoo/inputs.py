"""Inputs checked at the door: the images a model's forward accepts, the device a command runs on.

Images are checked on tensor metadata only (type, shape, dtype), never on values. A wrong input
should fail at the door with what to do, not as a matmul dtype error deep inside torch. The checks
read no tensor data and branch on nothing data-dependent, so ``torch.compile`` folds them into its
guards (one graph, no breaks) and they cost nothing at run time. Under ``torch.fx`` symbolic tracing the
model's check is one opaque node (:func:`checked_images`) that runs on the real input each time the traced
graph does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vitzoo.blocks.patch import autocast_casts


def check_images(images: Any, in_chans: int, dtype: torch.dtype) -> None:
    """Refuse anything but a float ``(B, in_chans, H, W)`` tensor of the model's weight ``dtype``.

    Under autocast any float dtype but float64 is fine: autocast casts inputs and weights alike.
    Nothing is converted silently: a uint8 image is refused because it also needs normalizing.
    """
    if not isinstance(images, torch.Tensor):
        hint = "convert it with torch.from_numpy(x)" if type(images).__module__ == "numpy" else "convert it first"
        raise TypeError(f"expected images as a torch.Tensor of shape (B, {in_chans}, H, W) and dtype {dtype}, "
                        f"got a {type(images).__module__}.{type(images).__name__}; {hint}")
    if images.ndim != 4 or images.shape[1] != in_chans:
        raise ValueError(f"expected images of shape (B, {in_chans}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected normalized float images of dtype {dtype}, got {images.dtype}; scale and "
                        f"normalize them first, e.g. (x.float() / 255 - mean) / std with the mean and std of "
                        f"model.pretrained_cfg (vitzoo.eval_transform(model) does this for PIL images)")
    if images.dtype != dtype and not autocast_casts(images):
        autocast = "" if images.dtype == torch.float64 else ", or run under torch.autocast"
        raise TypeError(f"this model's weights are {dtype}, got {images.dtype} images; convert the images with "
                        f"x.to({dtype}), or the model with model.to({images.dtype}){autocast}")


def check_image_size(
    height: int, width: int, patch_size: int, img_size: tuple[int, int] | None, crop_remainder: bool,
) -> None:
    """Refuse an image size the model does not take: another size than ``img_size`` (None: any size), or with
    any size a side that is not a multiple of ``patch_size`` unless the remainder is cropped."""
    p = patch_size
    if img_size is None:
        if (height % p or width % p) and not crop_remainder:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={p}; "
                             f"resize or pad each side to a multiple of {p}, or build the model with "
                             f"patch_embed={{'pad': True}} (timm's dynamic_img_pad) or crop_remainder=True")
    elif (height, width) != img_size:
        raise ValueError(
            f"this model expects {img_size[0]}x{img_size[1]} images, got {height}x{width}; "
            f"resize the input, build the model with img_size=({height}, {width}), "
            f"or pass dynamic_img_size=True to accept any multiple of {p}"
        )


def checked_images(
    images: Any, weight: torch.Tensor, in_chans: int, patch_size: int, img_size: tuple[int, int] | None,
    crop_remainder: bool,
) -> torch.Tensor:
    """``images`` once :func:`check_images` (against ``weight``'s dtype) and :func:`check_image_size` accept them.

    Returning the images makes the rest of the model depend on the check, so a ``torch.fx`` graph, where
    the model keeps this function as one opaque node (``torch.fx.wrap``), keeps it through dead-code
    elimination and checks each real input.
    """
    check_images(images, in_chans, weight.dtype)
    check_image_size(images.shape[-2], images.shape[-1], patch_size, img_size, crop_remainder)
    return images


def block_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Resolve timm-style block indices: None = all, int n = last n, sequence = those (negatives ok)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"asked for the last {indices} blocks of a {depth}-block model")
        return list(range(depth - indices, depth))
    resolved = [i + depth if i < 0 else i for i in indices]
    bad = [i for i, r in zip(indices, resolved, strict=True) if not 0 <= r < depth]
    if bad:
        raise ValueError(f"block indices {bad} out of range for a {depth}-block model")
    return resolved


def available_device(name: str) -> torch.device:
    """The device a command's ``--device`` names, refused at once when this machine lacks it (instead of
    a CUDA assertion from deep inside torch after the model is built)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use cpu, cuda, cuda:1, mps, ...") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "is_available"):
        count = backend.device_count() if backend.is_available() else 0
        if count <= (device.index or 0):
            raise ValueError(f"--device {name}: this machine has {count or 'no'} {device.type} device"
                             f"{'' if count == 1 else 's'} (torch.{device.type}.is_available() is "
                             f"{count > 0}); use --device cpu or a device it has")
    return device
