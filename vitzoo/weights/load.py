"""Putting a state_dict into a model: adapt what can be adapted, report it, refuse the rest."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import resize_rel_pos_bias_table

from vitzoo.blocks.position import LearnedPosition
from vitzoo.blocks.projector import PROJECTORS
from vitzoo.vit import VisionTransformer, stored_name
from vitzoo.weights.files import StateDict, WeightsError

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
PATCH_KEY = "patch_embed.proj.weight"
REL_POS_TABLE = "relative_position_bias_table"  # the key ending of relative-position tables (BEiT, relpos ViTs)


@dataclass
class LoadReport:
    """What loading changed on the way in: one line per adapted or dropped tensor."""

    adapted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.adapted) if self.adapted else "loaded unchanged"


def _grid_of(n_tokens: int, n_prefix: int, like: tuple[int, int]) -> tuple[int, int]:
    """Grid of a saved position table: square unless the model's own aspect ratio fits."""
    n = n_tokens - n_prefix
    side = round(n**0.5)
    if side * side == n:
        return side, side
    h = round((n * like[0] / like[1]) ** 0.5)
    if h and n % h == 0:
        return h, n // h
    raise WeightsError(f"pos_embed holds {n} grid positions, which is no (h, w) grid vitzoo can infer")


def adapt_state_dict(model: VisionTransformer, state_dict: StateDict) -> tuple[StateDict, LoadReport]:
    """Fit a checkpoint to ``model``: resample the position table and relative-position tables to its grid, the
    patch kernel to its patch size and input channels, put a VLM tower's tensors under the classifier's
    ``checkpoint_prefix``, drop a VLM projector the model lacks and a classifier of another size (the model keeps
    its freshly initialised head): what timm's loaders of these models do."""
    spec, own = model.spec, model.state_dict()
    out, report = dict(state_dict), LoadReport()
    pos, position = out.get("pos_embed"), model.position
    if (pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape
            and isinstance(position, LearnedPosition)):
        old, new = _grid_of(pos.shape[1], position.num_prefix, position.grid_size), position.grid_size
        out["pos_embed"] = position.fitted(pos, old)
        report.adapted.append(f"pos_embed: resampled {tuple(pos.shape)} -> {tuple(out['pos_embed'].shape)}, "
                              f"grid {old[0]}x{old[1]} -> {new[0]}x{new[1]}")
    patch_key = stored_name(PATCH_KEY, spec)  # MlpMixer's stem.proj.weight, NaFlexVit's embeds.proj.weight
    kernel = out.get(patch_key)
    if kernel is not None and patch_key in own and kernel.shape != own[patch_key].shape:
        want, steps = own[patch_key].shape, []
        if kernel.shape[1] != want[1] and kernel.shape[1] == 3:
            kernel = adapt_input_channels(kernel, want[1])
            steps.append(f"input channels 3 -> {want[1]}")
        if kernel.shape[2:] != want[2:] and kernel.shape[:2] == want[:2]:
            steps.append(f"patch {kernel.shape[2]}x{kernel.shape[3]} -> {want[2]}x{want[3]} resampled as in FlexiViT")
            kernel = resample_patch_kernel(kernel, tuple(want[2:]))
        if kernel.shape == want:
            report.adapted.append(f"{patch_key}: {tuple(out[patch_key].shape)} -> {tuple(want)}, {', '.join(steps)}")
            out[patch_key] = kernel
    for key in [k for k in out if k.endswith(REL_POS_TABLE) and k in own and out[k].shape != own[k].shape]:
        table = out[key]  # laid out for another grid: resampled as timm does on load (square source grid)
        out[key] = resize_rel_pos_bias_table(table, new_window_size=spec.grid_size, new_bias_shape=own[key].shape)
        report.adapted.append(f"{key}: resampled {tuple(table.shape)} -> {tuple(own[key].shape)} for grid "
                              f"{spec.grid_size[0]}x{spec.grid_size[1]}")
    prefix = spec.get("pool.checkpoint_prefix")
    if prefix and not any(k.startswith(prefix) for k in out):  # a tower's weights for timm's classifier around it
        out = {prefix + k if k not in own and prefix + k in own else k: v for k, v in out.items()}
        report.adapted.append(f"the tower's tensors moved under {prefix!r}, where the classifier holds them")
    for name in PROJECTORS:  # a VLM projector the model was built without (a classifier name on a release file)
        extra = [k for k in out if k.startswith(f"{name}.")]
        if extra and not any(k.startswith(f"{name}.") for k in own):
            report.adapted.append(f"{name}: dropped ({len(extra)} tensors), this model has no {name}")
            out = {k: v for k, v in out.items() if k not in extra}
    for key in HEAD_KEYS:
        if key in out and (key not in own or out[key].shape != own[key].shape):
            report.adapted.append(
                f"{key}: dropped {tuple(out.pop(key).shape)}, new head for num_classes={spec.num_classes}"
            )
    return out, report


def resample_patch_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A patch-embedding kernel for another patch size that sees a resized patch as the old kernel saw
    the original: the pseudo-inverse of bicubic resizing (FlexiViT, Beyer et al. 2023; timm's numerics)."""
    old_h, old_w = weight.shape[-2:]
    basis = rearrange(torch.eye(old_h * old_w), "n (h w) -> n 1 h w", h=old_h)
    resized = F.interpolate(basis, size=size, mode="bicubic", antialias=True, align_corners=False)
    pinv = torch.linalg.pinv(rearrange(resized, "n 1 h w -> (h w) n"))  # (old cells, new cells)
    flat = rearrange(weight.float(), "o i h w -> o i (h w)") @ pinv
    return rearrange(flat, "o i (h w) -> o i h w", h=size[0]).to(weight.dtype)


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An RGB patch kernel for ``in_chans`` inputs: summed over RGB for one channel (grayscale sees the
    same response), else RGB repeated and scaled by ``3 / in_chans`` (timm's ``adapt_input_conv``)."""
    if in_chans == 1:
        return weight.float().sum(dim=1, keepdim=True).to(weight.dtype)
    repeats = math.ceil(in_chans / 3)
    return (weight.float().repeat(1, repeats, 1, 1)[:, :in_chans] * (3 / in_chans)).to(weight.dtype)


def mismatch_message(model: torch.nn.Module, state_dict: StateDict, limit: int = 10) -> str | None:
    """Keys and shapes that differ between ``model`` and ``state_dict``, or None when they match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for title, items in (("missing from checkpoint", missing), ("not in model", unexpected), ("shape differs", shapes)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more)
    return "; ".join(parts)


def load_weights(model: VisionTransformer, state_dict: StateDict, adapt: bool = True) -> LoadReport:
    """Load ``state_dict`` strictly, after adapting it (see :func:`adapt_state_dict`) if asked.

    Any remaining difference raises :class:`WeightsError` naming the keys and shapes, before a
    single tensor is copied, so a failed load leaves the model as it was.
    """
    report = LoadReport()
    if adapt:
        state_dict, report = adapt_state_dict(model, state_dict)
    own = model.state_dict()
    kept_head = {k: own[k] for k in HEAD_KEYS if k in own and k not in state_dict}
    state_dict = {**state_dict, **kept_head}
    problem = mismatch_message(model, state_dict)
    if problem:
        raise WeightsError(
            f"checkpoint does not fit {model.pretrained_cfg.get('architecture', 'this model')}: {problem}. "
            "Build the model the checkpoint was saved from, or convert the checkpoint first."
        )
    model.load_state_dict(state_dict, strict=True)
    return report


def load_weights_partial(model: VisionTransformer, state_dict: StateDict) -> LoadReport:
    """Load what still fits a model whose blocks were swapped (``mlp="swiglu"``, ``reg_tokens=4``...).

    For ablations that start from a pretrained checkpoint: after :func:`adapt_state_dict`, every
    tensor whose name and shape match is copied; the report names each model tensor left at its
    fresh initialisation ("new") and each checkpoint tensor nothing used ("dropped"). A position
    table laid out for other prefix tokens (``reg_tokens=4`` on a model without registers) is dropped.
    """
    try:
        state_dict, report = adapt_state_dict(model, state_dict)
    except WeightsError:
        pos = state_dict["pos_embed"]
        state_dict, report = adapt_state_dict(model, {k: v for k, v in state_dict.items() if k != "pos_embed"})
        report.adapted.append(f"pos_embed: dropped {tuple(pos.shape)}, laid out for other prefix tokens")
    own = model.state_dict()
    fits = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    report.adapted += [f"{k}: new {tuple(v.shape)}, not in the checkpoint in this shape" for k, v in own.items()
                       if k not in fits and k not in HEAD_KEYS]
    report.adapted += [f"{k}: dropped {tuple(v.shape)}, not in this model in this shape"
                       for k, v in state_dict.items() if k not in fits]
    model.load_state_dict(fits, strict=False)
    return report
