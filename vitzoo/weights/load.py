"""Putting a state_dict into a model: adapt what can be adapted, report it, refuse the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vitzoo.blocks.position import resample_table
from vitzoo.vit import VisionTransformer
from vitzoo.weights.files import StateDict, WeightsError

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


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
    """Fit a checkpoint to ``model``: resample the position table to its grid and drop a classifier
    of another size (the model keeps its freshly initialised head)."""
    spec, own = model.spec, model.state_dict()
    out, report = dict(state_dict), LoadReport()
    pos = out.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        n_prefix = 0 if spec.no_embed_class else spec.num_prefix_tokens
        old = _grid_of(pos.shape[1], n_prefix, spec.grid_size)
        out["pos_embed"] = resample_table(pos, old, spec.grid_size, n_prefix)
        report.adapted.append(f"pos_embed: resampled grid {old[0]}x{old[1]} -> {spec.grid_size[0]}x{spec.grid_size[1]}")
    for key in HEAD_KEYS:
        if key in out and (key not in own or out[key].shape != own[key].shape):
            report.adapted.append(
                f"{key}: dropped {tuple(out.pop(key).shape)}, new head for num_classes={spec.num_classes}"
            )
    return out, report


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
