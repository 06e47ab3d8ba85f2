"""Low-rank adapters on a model's linears: LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024).

``apply_lora(model, LoraOptions(...))`` freezes every weight and swaps the chosen linears for
:class:`LoraLinear`, which keeps the linear's own ``weight`` and ``bias`` (so their keys stay timm's) and
adds ``lora_A``, ``lora_B`` and, for DoRA, ``lora_magnitude``. A fused projection (timm's ``attn.qkv``)
gets one low-rank pair per chosen part, so q and v can be adapted without k, which a single pair over
the fused linear cannot do. ``lora_B`` starts at zero: the adapted model starts as the base model.
``merge_lora`` folds the adapters into the weights and gives back plain linears, a state_dict in
timm's layout again; ``save_lora``/``load_lora`` keep the trained tensors alone, with the options.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from safetensors import SafetensorError, safe_open
from torch import nn

from vitzoo.fields import AT_LEAST_ONE, POSITIVE, RATE, check_fields, described, field_types, parse_text
from vitzoo.migrate import spec_from_saved
from vitzoo.train.checkpoint import read_trainer_state
from vitzoo.vit import VisionTransformer
from vitzoo.weights.files import StateDict, WeightsError, read_state_dict, write_state_dict

TARGETS = {
    "attn.qkv": "q, k and v of each attention: one pair each (a fused qkv linear is taken apart in thirds)",
    "attn.q": "the queries alone", "attn.k": "the keys alone", "attn.v": "the values alone",
    "attn.proj": "each attention's output projection",
    "mlp": "every linear of each block's MLP (fc1/fc2, or a gated MLP's)",
    "head": "the classifier (head, head_dist), adapted instead of trained fully",
}
# an attention projection, fused (qkv, qk, kv) or one of its own (q, k_proj, Gemma's v_proj.linear), in a block
_PROJECTION = re.compile(r"(?:^|\.)\d+\.attn\.(?P<parts>qkv|qk|kv|q|k|v)(?:_proj)?(?:\.linear)?$")
_WHOLE = {
    "attn.proj": re.compile(r"(?:^|\.)\d+\.attn\.(?:proj|o_proj(?:\.linear)?)$"),
    "mlp": re.compile(r"(?:^|\.)\d+\.mlp\..+$"),
    "head": re.compile(r"^head(?:_dist)?(?:\.fc)?$"),
}


@dataclass(frozen=True)
class LoraOptions:
    """Which linears get adapters and how; ``vitzoo finetune --lora r=8,alpha=16,targets=attn.qkv,mlp``."""

    r: int = described(8, "rank of each adapter", AT_LEAST_ONE)
    alpha: float = described(16, "the adapter's output is scaled by alpha / r", POSITIVE)
    dropout: float = described(0.0, "dropout on the adapter's input (0: off)", RATE)
    dora: bool = described(False, "DoRA: a trained magnitude per output row times the adapted row's direction")
    targets: tuple[str, ...] = described(("attn.qkv",), "the linears to adapt: " + ", ".join(TARGETS))
    train_head: bool | None = described(None, "train the classifier fully (a new head for new classes must); "
                                        "None: unless head is among targets")

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets: {', '.join(map(repr, unknown)) or 'none given'}; valid: "
                             f"{', '.join(TARGETS)} (attn.qkv: a pair each for q, k and v; mlp: every linear of "
                             f"a block's MLP; head: adapters on the classifier)")
        if self.train_head and "head" in self.targets:
            raise ValueError("LoRA: head is among targets (adapters on a frozen head) and train_head=true (the "
                             "head trained fully); drop one")

    @property
    def trains_head(self) -> bool:
        return self.train_head if self.train_head is not None else "head" not in self.targets

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def parse_lora(text: str) -> LoraOptions:
    """``r=8,alpha=16,dropout=0.1,dora=true,targets=attn.qkv,attn.proj,mlp`` as options (empty: the defaults).

    The items are ``NAME=VALUE``; a bare item after ``targets=`` is one more target.
    """
    types = field_types(LoraOptions)
    given: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = item.partition("=")
        if eq and name.strip() in types and name.strip() not in given:
            given[name.strip()] = [value.strip()]
        elif eq:
            problem = "is given twice" if name.strip() in given else f"is unknown; the options are {', '.join(types)}"
            raise ValueError(f"--lora: {name.strip()!r} {problem}; e.g. --lora r=8,alpha=16,targets=attn.qkv,mlp")
        elif list(given)[-1:] == ["targets"]:
            given["targets"].append(item)
        else:
            raise ValueError(f"--lora: {item!r} is not NAME=VALUE; the options are {', '.join(types)}, and only "
                             f"targets takes several values (targets=attn.qkv,mlp)")
    values = {name: tuple(parts) if name == "targets" else parse_text(parts[0], types[name])
              for name, parts in given.items()}
    return LoraOptions(**values)


class LoraLinear(nn.Linear):
    """A frozen linear plus ``scale * B A`` on its input, per part: the output rows of a fused linear split
    into ``parts`` equal parts, of which ``chosen`` are adapted (``lora_A`` is ``(chosen, r, in)``,
    ``lora_B`` ``(chosen, rows, r)``). With DoRA, each adapted row is ``m * (W + scale B A) / ||W + scale B A||``,
    the norm not differentiated (DoRA's section 4.3), ``m`` (``lora_magnitude``) starting at ``||W||``; it is
    one flat vector so that the recipe leaves it out of weight decay, as it does norms' scales."""

    def __init__(self, base: nn.Linear, parts: int, chosen: tuple[int, ...], options: LoraOptions) -> None:
        nn.Module.__init__(self)  # the base's own tensors, not new ones
        if base.out_features % parts:
            raise ValueError(f"a fused linear of {base.out_features} outputs does not split in {parts} parts")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.parts, self.chosen, self.scale = parts, chosen, options.alpha / options.r
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        bound = 1 / math.sqrt(self.in_features)  # peft's kaiming_uniform_(a=sqrt(5)) on each (r, in) matrix
        a = torch.empty(len(chosen), options.r, self.in_features, **like)
        self.lora_A = nn.Parameter(a.uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(len(chosen), self.out_features // parts, options.r, **like))
        magnitude = None
        if options.dora:
            with torch.no_grad():
                magnitude = nn.Parameter(rearrange(self._rows(self.weight).norm(dim=-1), "p o -> (p o)"))
        self.register_parameter("lora_magnitude", magnitude)
        self.lora_dropout = nn.Dropout(options.dropout) if options.dropout else nn.Identity()

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The chosen parts' rows of a ``(out, in)`` weight as ``(chosen, rows, in)`` (a view when all are chosen)."""
        parts = rearrange(weight, "(p o) i -> p o i", p=self.parts)
        return parts if len(self.chosen) == self.parts else parts[list(self.chosen)]

    def _gain(self, rows: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              magnitude: torch.Tensor) -> torch.Tensor:
        """DoRA's ``m / ||W + scale B A||`` per adapted row, ``(chosen, rows)``."""
        adapted = rows + einsum(lora_B, lora_A, "p o r, p r i -> p o i") * self.scale
        return rearrange(magnitude, "(p o) -> p o", p=len(self.chosen)) / adapted.norm(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        low = einsum(h, self.lora_A, "... i, p r i -> ... p r")
        delta = einsum(low, self.lora_B, "... p r, p o r -> ... p o") * self.scale
        if self.lora_magnitude is not None:
            rows = self._rows(self.weight)
            gain = self._gain(rows, self.lora_A.detach(), self.lora_B.detach(), self.lora_magnitude)
            base = einsum(h, rows, "... i, p o i -> ... p o")  # (gain - 1) base + gain delta, one tensor kept
            delta = gain * (base + delta) - base
        if len(self.chosen) < self.parts:  # the parts left alone get nothing added
            zero = torch.zeros_like(delta[..., 0, :])
            delta = torch.stack([delta[..., self.chosen.index(k), :] if k in self.chosen else zero
                                 for k in range(self.parts)], dim=-2)
        return out + rearrange(delta, "... p o -> ... (p o)")

    def fold(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             magnitude: torch.Tensor | None) -> torch.Tensor:
        """The plain weight that computes what this layer computes in eval mode, from its tensors (or a state
        dict's copies of them)."""
        rows = self._rows(weight) + einsum(lora_B, lora_A, "p o r, p r i -> p o i") * self.scale
        if magnitude is not None:
            rows = rows * rearrange(self._gain(self._rows(weight), lora_A, lora_B, magnitude), "p o -> p o 1")
        parts = rearrange(weight, "(p o) i -> p o i", p=self.parts)
        merged = parts.index_copy(0, torch.tensor(self.chosen, device=weight.device), rows.to(weight.dtype))
        return rearrange(merged, "p o i -> (p o) i")

    def extra_repr(self) -> str:
        parts = f", parts={list(self.chosen)} of {self.parts}" if self.parts > 1 else ""
        return (f"{super().extra_repr()}, r={self.lora_A.shape[1]}, scale={self.scale:g}{parts}"
                f"{', dora' if self.lora_magnitude is not None else ''}")


def _sites(model: nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{linear name: (parts, chosen parts)}`` for ``targets``; refuses a target that matches no linear."""
    letters = {t: set(t.removeprefix("attn.")) for t in targets if t in ("attn.qkv", "attn.q", "attn.k", "attn.v")}
    wanted = set().union(*letters.values())
    sites, hits = {}, dict.fromkeys(targets, 0)
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            raise ValueError(f"{name} has LoRA adapters already; merge_lora(model) first, or start from a fresh model")
        if type(module) is not nn.Linear:  # subclasses (a linear across tokens) compute something else
            continue
        if (found := _PROJECTION.search(name)) and (chosen := tuple(
                i for i, letter in enumerate(found["parts"]) if letter in wanted)):
            sites[name] = (len(found["parts"]), chosen)
            for target, parts in letters.items():
                hits[target] += bool(parts & set(found["parts"]))
        for target in set(targets) & set(_WHOLE):
            if _WHOLE[target].search(name):
                sites[name] = (1, (0,))
                hits[target] += 1
    missing = [t for t, n in hits.items() if not n]
    if missing:
        linears = sorted({re.sub(r"\.\d+\.", ".N.", n) for n, m in model.named_modules() if type(m) is nn.Linear})
        raise ValueError(f"LoRA targets {', '.join(missing)} match no linear layer of this model; its linears are "
                         f"{', '.join(linears[:16]) or 'none'}; pick targets among {', '.join(TARGETS)}")
    return sites


def apply_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """Freeze every parameter of ``model``, put adapters on the linears ``options.targets`` name (in place) and
    train the classifier fully when ``options.trains_head``; returns ``model``."""
    sites = _sites(model, options.targets)
    model.requires_grad_(False)
    for name, (parts, chosen) in sites.items():
        owner, _, child = name.rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, child, LoraLinear(getattr(parent, child), parts, chosen, options))
    if options.trains_head:
        for name in ("head", "head_dist"):
            if getattr(model, name, None) is not None:
                getattr(model, name).requires_grad_(True)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module, state_dict: StateDict | None = None) -> StateDict:
    """The tensors :func:`apply_lora` left trainable (the adapters, and the head when it trains), from
    ``state_dict`` (e.g. full weights gathered under FSDP) or the model's own."""
    source = model.state_dict() if state_dict is None else state_dict
    return {name: source[name].detach() for name, p in model.named_parameters() if p.requires_grad}


def merged_state_dict(model: nn.Module, state_dict: StateDict | None = None) -> StateDict:
    """``model``'s (or its ``state_dict``'s) weights with the adapters folded in: timm's keys and shapes."""
    source = model.state_dict() if state_dict is None else state_dict
    merged = {k: v for k, v in source.items() if not k.rpartition(".")[2].startswith("lora_")}
    for name, layer in lora_layers(model).items():
        merged[f"{name}.weight"] = layer.fold(source[f"{name}.weight"], source[f"{name}.lora_A"],
                                              source[f"{name}.lora_B"], source.get(f"{name}.lora_magnitude"))
    return merged


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put a plain ``nn.Linear`` back (in place); every parameter is
    trainable again, as in a fresh model. Returns ``model``, whose state_dict is timm's layout again."""
    for name, layer in lora_layers(model).items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.fold(layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude))
        plain.bias = layer.bias
        owner, _, child = name.rpartition(".")
        setattr(model.get_submodule(owner), child, plain)
    return model.requires_grad_(True)


def save_lora(model: nn.Module, path: str | os.PathLike, options: LoraOptions,
              state_dict: StateDict | None = None) -> Path:
    """Write the trained tensors (:func:`lora_state_dict`) to one safetensors file, atomically, the options in
    its header; :func:`load_lora` puts them on a fresh model of the same architecture."""
    return write_state_dict(lora_state_dict(model, state_dict), path,
                            metadata={"format": "pt", "lora": json.dumps(options.to_dict())})


def read_lora_options(path: str | os.PathLike) -> LoraOptions:
    """The options a :func:`save_lora` file was written with."""
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("lora")
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err})") from None
    if text is None:
        raise WeightsError(f"{path} holds no LoRA options in its header; it was not written by save_lora")
    return _saved_options(json.loads(text), path)


def _saved_options(values: dict[str, Any], where: str | os.PathLike) -> LoraOptions:
    """The options as a file stored them (``LoraOptions.to_dict``)."""
    unknown = set(values) - {f.name for f in fields(LoraOptions)}
    if unknown:
        raise WeightsError(f"{where}: LoRA options {sorted(unknown)} are unknown to this vitzoo; upgrade it")
    return LoraOptions(**{**values, "targets": tuple(values["targets"])})


def has_adapters(state_dict: StateDict) -> bool:
    """Whether ``state_dict`` holds LoRA adapters beside its weights (a checkpoint of a ``--lora`` run)."""
    return any(key.endswith(".lora_A") for key in state_dict)


def folded_adapters(state_dict: StateDict, trainer: dict[str, Any], where: str | os.PathLike) -> StateDict:
    """The weights of a training checkpoint (``where``) with any LoRA adapters folded in: timm's keys and shapes,
    as the run's ``merged/`` folder holds them at its end. ``trainer``: the checkpoint's trainer state, whose run
    settings name the options and whose spec the architecture; the adapters are placed on a model on the meta
    device, which holds no weights, only the layout of each adapted linear."""
    if not has_adapters(state_dict):
        return state_dict
    options = (trainer.get("run_settings") or {}).get("lora")
    if not options:
        raise WeightsError(f"{where} holds LoRA adapters, but its trainer state names no LoRA options; load the "
                           f"run's merged/ folder")
    with torch.device("meta"):
        model = apply_lora(VisionTransformer(spec_from_saved(trainer["spec"])), _saved_options(options, where))
    return merged_state_dict(model, state_dict)


def fold_run_checkpoint(state_dict: StateDict, path: str | os.PathLike) -> StateDict:
    """``state_dict``, read from ``path``, with the adapters folded in where it is a checkpoint of a ``--lora`` run
    (the folder or its ``model.safetensors``; :func:`folded_adapters`, with the folder's ``trainer.pt``); other
    weights as they are. What ``pretrained=<checkpoint folder>`` loads."""
    if not has_adapters(state_dict):
        return state_dict
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (folder / "trainer.pt").is_file():
        raise WeightsError(f"{path} holds LoRA adapters (lora_A, lora_B) but no trainer.pt beside it that says how "
                           f"they were trained; load the run's merged/ folder, or the checkpoint folder it came from")
    return folded_adapters(state_dict, read_trainer_state(folder), folder)


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapters (and a trained head) from :func:`save_lora` on ``model``, a fresh model of the architecture
    they were trained on (its base weights loaded); returns ``model``, adapted."""
    options = read_lora_options(path)
    apply_lora(model, options)
    tensors, wanted = read_state_dict(path), lora_state_dict(model)
    wrong = sorted(set(tensors) ^ set(wanted)) or [k for k in wanted if tensors[k].shape != wanted[k].shape]
    if wrong:
        raise WeightsError(f"{path} does not fit this model: {', '.join(wrong[:8])} differ in name or shape; load "
                           f"it on the architecture (and num_classes) it was trained on")
    model.load_state_dict(tensors, strict=False)
    return model
