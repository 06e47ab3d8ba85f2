"""Training-step memory of LoRA and DoRA against full fine-tuning, counted exactly as BENCHMARKS.md's "Memory
knobs" table counts it (fp32, fused AdamW, :func:`vitzoo.memory.peak_tensor_bytes`); see BENCHMARKS.md for results.

    python benchmarks/bench_lora_memory.py vit_small_patch16_224 vit_base_patch16_224 --batch-size 16

Each setting trains the same randomly initialised model (1000 classes, the head trained fully as ``vitzoo
finetune --lora`` does). "step peak" is the most tensor memory one step (forward, cross-entropy, backward, AdamW,
zero_grad) holds beyond what exists before it; "held" is what exists before it: the weights and AdamW's two
moments per trained parameter, which is where LoRA saves most. Both are exact byte counts, so one measurement each.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from vitzoo import create_model
from vitzoo.bench import machine, markdown_table
from vitzoo.lora import LoraOptions, apply_lora, trainable_parameters
from vitzoo.memory import peak_tensor_bytes

COLUMNS = ("model", "setting", "trained params", "held MiB", "step peak MiB", "peak vs full", "held + peak MiB",
           "total vs full")
MiB = 2**20


def settings(rank: int) -> dict[str, LoraOptions | None]:
    everything = ("attn.qkv", "attn.proj", "mlp")
    return {
        "full fine-tuning": None,
        f"LoRA r={rank}, attn.qkv": LoraOptions(r=rank),
        f"LoRA r={rank}, attn.qkv,attn.proj,mlp": LoraOptions(r=rank, targets=everything),
        f"DoRA r={rank}, attn.qkv,attn.proj,mlp": LoraOptions(r=rank, targets=everything, dora=True),
    }


def measure(name: str, options: LoraOptions | None, batch_size: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(name).to(device).train()
    if options:
        apply_lora(model, options)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, fused=True)
    x = torch.randn(batch_size, 3, *model.spec.img_size, device=device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=device)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    held = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *state])
    return {"trained": trainable_parameters(model)[0], "held": held, "peak": peak_tensor_bytes(step, device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        full = None
        for setting, options in settings(args.rank).items():
            found = measure(name, options, args.batch_size, device)
            found["total"] = found["held"] + found["peak"]
            full = full or found
            rows.append({"model": name, "setting": setting, "trained params": f"{found['trained'] / 1e6:.2f} M",
                         "held MiB": f"{found['held'] / MiB:.1f}", "step peak MiB": f"{found['peak'] / MiB:.1f}",
                         "peak vs full": f"{found['peak'] / full['peak']:.2f}",
                         "held + peak MiB": f"{found['total'] / MiB:.1f}",
                         "total vs full": f"{found['total'] / full['total']:.2f}"})
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{machine(device)}; fp32, batch {args.batch_size}, fused AdamW\n")
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
