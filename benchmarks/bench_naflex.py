"""Training speed on images of mixed sizes and aspect ratios: vitzoo's packed rows against one image per row (timm's
NaFlex batch, run by vitzoo and by timm's NaFlexVit) and against every image padded to the largest size, in one
process and interleaved like ``vitzoo bench``; see BENCHMARKS.md for results.

    python benchmarks/bench_naflex.py --model naflexvit_base_patch16_gap --images 8 --rounds 5

Each contender runs one training step (forward, cross-entropy, backward, fused AdamW) on the same images with the
same weights (timm's init, loaded with ``strict=True``). Speed is *real* patch tokens per second: the patches of
the images, not the padding a layout adds, so a layout that computes on padding is slower by what it wastes.
Speeds are compared as ratios to timm, each a median over interleaved rounds.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vitzoo import create_model
from vitzoo.bench import Step, _timed, machine, markdown_table
from vitzoo.packing import budget_size, output_order, pack_images

COLUMNS = ("layout", "impl", "rows x tokens", "padding %", "real tokens/s", "vs timm [range]")
BUDGETS = (64, 144, 256, 400)  # patches per image, drawn per image as NaFlex draws sequence lengths


def mixed_images(count: int, patch: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` images of random aspect ratios (1:3 to 3:1) at random patch budgets, sides multiples of ``patch``."""
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        aspect = math.exp(rng.uniform(-math.log(3), math.log(3)))
        h, w = budget_size(round(1000 * aspect), 1000, patch, rng.choice(BUDGETS))
        images.append(torch.randn(3, h, w))
    return images


def padded_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """The images zero-padded on the right and bottom to the largest height and width: one image batch."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    return torch.stack([F.pad(i, (0, width - i.shape[2], 0, height - i.shape[1])) for i in images])


def training_step(model: nn.Module, batch: torch.Tensor | dict, labels: torch.Tensor) -> Step:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    model.train()

    def step() -> None:
        F.cross_entropy(model(batch), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def contenders(name: str, images: list[torch.Tensor]) -> dict[tuple[str, str], tuple[Step, tuple[int, int]]]:
    """(layout, impl) -> (training step, (rows, tokens per row)), all on the same images, labels and weights."""
    torch.manual_seed(0)
    reference = timm.create_model(name, num_classes=10)
    models = {}
    for impl in ("vitzoo rows", "vitzoo packed", "vitzoo padded"):
        models[impl] = create_model(name, num_classes=10)
        models[impl].load_state_dict(reference.state_dict(), strict=True)
    p = models["vitzoo rows"].spec.patch_size
    labels = torch.randint(0, 10, (len(images),))
    rows, _ = pack_images(images, p)
    packed, placements = pack_images(images, p, seq_len=rows["patches"].shape[1])
    padded = padded_batch(images)
    grid = (padded.shape[2] // p) * (padded.shape[3] // p)
    prefix = models["vitzoo rows"].num_prefix_tokens
    per_row = packed["patch_image"].max().item() + 1
    row_shape = (len(images), prefix + rows["patches"].shape[1])
    return {
        ("one image per row", "timm"): (training_step(reference, rows, labels), row_shape),
        ("one image per row", "vitzoo"): (training_step(models["vitzoo rows"], rows, labels), row_shape),
        ("packed rows", "vitzoo"): (training_step(models["vitzoo packed"], packed, labels[output_order(placements)]),
                                    (packed["patches"].shape[0], per_row * prefix + packed["patches"].shape[1])),
        ("padded to the largest", "vitzoo"): (training_step(models["vitzoo padded"], padded, labels),
                                              (len(images), prefix + grid)),
    }


def measure(name: str, images: list[torch.Tensor], rounds: int, round_seconds: float) -> list[dict]:
    """One row per contender: real tokens/s and the speed ratio to timm, medians over interleaved rounds."""
    steps = contenders(name, images)
    device = torch.device("cpu")
    for step, _ in steps.values():  # warm-up
        step(), step()
    timm_key = ("one image per row", "timm")
    iters = max(1, math.ceil(round_seconds / _timed(steps[timm_key][0], 1, device)))
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, (step, _) in steps.items():
            seconds[key].append(_timed(step, iters, device))
    p = create_model(name).spec.patch_size
    real = sum((i.shape[1] // p) * (i.shape[2] // p) for i in images)
    rows = []
    for (layout, impl), times in seconds.items():
        n_rows, length = steps[(layout, impl)][1]
        ratios = [t / s for s, t in zip(times, seconds[timm_key], strict=True)]
        rows.append({
            "layout": layout, "impl": impl, "rows x tokens": f"{n_rows} x {length}",
            "padding %": f"{100 * (1 - real / (n_rows * length)):.0f}",
            "real tokens/s": f"{real * iters / statistics.median(times):.0f}",
            "vs timm [range]": f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]",
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="naflexvit_base_patch16_gap", help="a NaFlexVit name timm also has")
    parser.add_argument("--images", type=int, default=8, help="images per training step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    images = mixed_images(args.images, create_model(args.model).spec.patch_size)
    sizes = ", ".join(f"{i.shape[1]}x{i.shape[2]}" for i in images)
    print(f"{machine(torch.device('cpu'))}\n\n{args.model}, {args.images} images per step ({sizes}), fp32, "
          f"training step (forward, backward, fused AdamW)\n")
    print(markdown_table(measure(args.model, images, args.rounds, args.round_seconds), COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
