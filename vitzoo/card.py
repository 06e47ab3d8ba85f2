"""A model's card: what it is, how big, how costly, and where its weights come from."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitzoo.registry import create_model, model_entry
from vitzoo.spec import ViTSpec


def count_macs(model: torch.nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass on one image (timm's "GMACs" convention).

    Counted by torch's ``FlopCounterMode``; on the ``meta`` device nothing is computed, so even the
    largest models are counted in about a second.
    """
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, *input_size, device=device))
    return counter.get_total_flops() // 2


def model_card(name: str, **overrides: Any) -> dict[str, Any]:
    """Facts about a registry model: size, cost at its input size, provenance, non-default spec."""
    entry = model_entry(name)
    with torch.device("meta"):
        model = create_model(name, **overrides).eval()
    spec = model.spec
    defaults = ViTSpec().to_dict()
    return {
        "name": name,
        "family": entry.family,
        "paper": entry.paper,
        "notes": entry.notes,
        "input_size": model.pretrained_cfg["input_size"],
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "gmacs": round(count_macs(model, model.pretrained_cfg["input_size"]) / 1e9, 3),
        "tokens": spec.num_prefix_tokens + spec.grid_size[0] * spec.grid_size[1],
        "weights": entry.pretrained_cfg.get("hf_hub_id", ""),
        "top1": entry.pretrained_cfg.get("top1"),
        "spec": {k: v for k, v in spec.to_dict().items() if defaults.get(k) != v},
    }


def format_card(card: dict[str, Any]) -> str:
    """The card as aligned ``key: value`` lines for a terminal."""
    lines = [f"{card['name']}  ({card['family']})"]
    rows = [
        ("input size", "x".join(map(str, card["input_size"]))),
        ("params", f"{card['params_m']:.2f} M"),
        ("GMACs", f"{card['gmacs']:.2f}  (GFLOPs = 2 x GMACs)"),
        ("tokens", str(card["tokens"])),
        ("weights", card["weights"] or "none published"),
        ("ImageNet top-1", f"{card['top1']}" if card["top1"] is not None else "n/a"),
        ("paper", card["paper"]),
        ("notes", card["notes"]),
        ("spec", ", ".join(f"{k}={v}" for k, v in card["spec"].items())),
    ]
    lines += [f"  {key:<15} {value}" for key, value in rows if value]
    return "\n".join(lines)
