"""Inference speed of an exported model in ONNX Runtime (CPU) next to vitzoo eager and vitzoo under
torch.compile, in one process and interleaved like ``vitzoo bench``; see BENCHMARKS.md for results.

    python benchmarks/bench_export.py vit_small_patch16_224 vit_base_patch16_224 --batch-size 8 --rounds 5

The ONNX file is written by :func:`vitzoo.export` (and so checked against eager on load) at a fixed batch
size; every contender runs the same images with the same weights and as many threads. Speeds are
compared as ratios to vitzoo eager, each a median over interleaved rounds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch

from vitzoo import create_model, export
from vitzoo.bench import Step, _timed, machine, markdown_table

COLUMNS = ("model", "impl", "img/s", "vs eager [range]")


def _inference(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> Step:
    def step() -> None:
        with torch.no_grad():
            model(images)

    return step


def contenders(name: str, batch_size: int, folder: Path) -> dict[str, Step]:
    """One inference step per contender, as closures over the same images and weights."""
    model = create_model(name).eval()
    images = torch.randn(batch_size, *model.pretrained_cfg["input_size"])
    path = export(model, folder / f"{name}.onnx", batch_size=batch_size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    return {"vitzoo eager": _inference(model, images), "vitzoo compiled": _inference(torch.compile(model), images),
            "onnxruntime": lambda: session.run(None, feed)}


def measure(name: str, batch_size: int, rounds: int, round_seconds: float, folder: Path) -> list[dict]:
    """One row per contender: img/s and the speed ratio to vitzoo eager, medians over interleaved rounds."""
    steps = contenders(name, batch_size, folder)
    device = torch.device("cpu")
    for step in steps.values():  # warm-up; compiles here
        step(), step()
    iters = max(1, math.ceil(round_seconds / _timed(steps["vitzoo eager"], 1, device)))
    seconds: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            seconds[impl].append(_timed(step, iters, device))
    rows = []
    for impl, times in seconds.items():
        ratios = [eager / own for own, eager in zip(times, seconds["vitzoo eager"], strict=True)]
        rows.append({"model": name, "impl": impl, "img/s": f"{batch_size * iters / statistics.median(times):.1f}",
                     "vs eager [range]": f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"})
    torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; medians are reported")
    parser.add_argument("--round-seconds", type=float, default=1.0, help="least time per contender and round")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += measure(name, args.batch_size, args.rounds, args.round_seconds, Path(folder))
    print(f"Machine: {machine(torch.device('cpu'))}, onnxruntime {onnxruntime.__version__}\n")
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
