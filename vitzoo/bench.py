"""Speed and memory of vitzoo next to timm (and torchvision, HF transformers) in one process.

Speeds are compared only as ratios measured in the same process, interleaved (vitzoo, timm, timm, vitzoo, ...:
the order flips each round) over several rounds, so that clock boost, thermal state, other load and the caches one
leaves to the next hit every contender alike; each figure is a median over rounds. vitzoo and timm carry the same
weights (timm's random init copied with ``strict=True``); torchvision and HF build the same
architecture with their own init, which does not change speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo.arguments import add_options, best_device, parsed_fields
from vitzoo.card import count_macs
from vitzoo.errors import run_command
from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, check_fields, described
from vitzoo.inputs import available_device
from vitzoo.memory import peak_rss_bytes, peak_tensor_bytes
from vitzoo.registry import create_model, model_spec
from vitzoo.spec import ViTSpec

# timm names whose architecture torchvision ships under its own name.
TORCHVISION_TWINS = {
    "vit_base_patch16_224": "vit_b_16", "vit_base_patch32_224": "vit_b_32",
    "vit_large_patch16_224": "vit_l_16", "vit_large_patch32_224": "vit_l_32",
    "vit_huge_patch14_224": "vit_h_14",
}
COLUMNS = (
    "model", "compile", "dtype", "step", "impl", "img/s", "vs timm [range]", "GFLOP/s", "% of roof",
    "tensor MiB", "tensor vs timm", "RSS MiB", "RSS vs timm",
)
# Dense bf16 peak FLOP/s from the vendors' datasheets, for the MFU column; the first name that
# torch.cuda.get_device_name contains wins, so the more specific names come first.
DATASHEET_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
Step = Callable[[], None]
StepKind = Literal["infer", "train"]
Dtype = Literal["fp32", "bf16"]  # bf16: autocast
MEMORY_ROUNDS = 3  # resident-set measurements per contender; the median is reported


@dataclass(frozen=True)
class Mode:
    """One measured configuration: inference or training step, fp32 or bf16 autocast, eager or compiled."""

    step: StepKind
    dtype: Dtype
    compiled: bool


@dataclass
class BenchConfig:
    """What ``vitzoo bench`` measures, and for how long. Each field carries its default, range and help
    (:func:`vitzoo.fields.described`), which the constructor checks and the command offers as options."""

    models: tuple[str, ...] = described(("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"),
                                        "registry names to measure")
    batch_size: int = described(16, "images per step", AT_LEAST_ONE)
    rounds: int = described(5, "interleaved timing rounds; medians are reported", AT_LEAST_ONE)
    round_seconds: float = described(1.0, "least time each contender runs per round", NON_NEGATIVE)
    dtypes: tuple[Dtype, ...] = described(("fp32", "bf16"), "precisions to measure, comma-separated (bf16: autocast)")
    steps: tuple[StepKind, ...] = described(("infer", "train"), "what to time, comma-separated: infer (a forward) "
                                            "and train (forward, backward, AdamW)")
    compile: Literal["off", "on", "both"] = described("both", "measure eager, compiled (torch.compile) or both")
    compare: tuple[str, ...] = described(("timm", "torchvision", "hf"),
                                         "contenders besides vitzoo, comma-separated (torchvision and hf where they "
                                         "have the architecture and are installed)")
    variants: tuple[str, ...] = described((), "extra vitzoo contenders with one spec field changed, e.g. "
                                          "patch_embed=conv")
    device: str = described(help="cpu, cuda, cuda:N, ...", factory=best_device)
    threads: int = described(0, "torch CPU threads (0: torch's default)", NON_NEGATIVE)
    peak_tflops: float | None = described(None, "dense bf16 peak of the device for an MFU column (None: the "
                                          "datasheet figure of H100/H200/A100; none on CPU)", POSITIVE)
    out: str | None = described(None, "also write the Markdown report to this file")

    def __post_init__(self) -> None:
        check_fields(self)


class _Logits(nn.Module):
    """HF models return an output object; every contender must return the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def contenders(name: str, compare: Sequence[str], variants: Sequence[str] = ()) -> dict[str, nn.Module]:
    """vitzoo and timm with identical weights, plus the comparators that have this architecture.

    ``variants`` (``"patch_embed=conv"``) add vitzoo models with one spec field changed and the same
    weights, to measure what a block choice costs next to the default.
    """
    import timm

    ours = create_model(name)  # first: an unknown name gets vitzoo's error with the closest names
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False)
    found = {"vitzoo": ours, "timm": reference}
    for variant in variants:
        field, _, value = variant.partition("=")
        found[f"vitzoo {variant}"] = create_model(name, **{field: value})
    for impl in found:
        if impl.startswith("vitzoo"):
            found[impl].load_state_dict(reference.state_dict(), strict=True)
    model = found["vitzoo"]
    spec = model.spec
    if "torchvision" in compare and name in TORCHVISION_TWINS:
        import torchvision

        found["torchvision"] = torchvision.models.get_model(TORCHVISION_TWINS[name], num_classes=spec.num_classes)
    if "hf" in compare and name in TORCHVISION_TWINS and importlib.util.find_spec("transformers"):
        found["hf"] = _hf_vit(spec)
    return found


def _hf_vit(spec: ViTSpec) -> nn.Module:
    """HF ``ViTForImageClassification`` of the same shape (class token, learned positions, pre-norm)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=spec.embed_dim, num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
        intermediate_size=int(spec.embed_dim * spec.mlp_ratio), image_size=spec.img_size[0],
        patch_size=spec.patch_size, num_labels=spec.num_classes, layer_norm_eps=spec.get("norm.eps"),
        attn_implementation="sdpa",
    )
    return _Logits(ViTForImageClassification(config))


def make_step(model: nn.Module, mode: Mode, images: torch.Tensor) -> Step:
    """One inference forward, or one training step (forward, backward, AdamW), as a closure."""
    device = images.device
    model.to(device).train(mode.step == "train")
    run = torch.compile(model) if mode.compiled else model
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=mode.dtype == "bf16")
    if mode.step == "infer":
        def infer() -> None:
            with torch.inference_mode(), torch.autocast(**amp):
                run(images)
        return infer
    # fused AdamW where torch has it for this device, else foreach: the same choice for every contender
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused, foreach=None if fused else True)
    with torch.no_grad():
        labels = torch.randint(0, model(images[:1]).shape[-1], images.shape[:1], device=device)

    def train() -> None:
        with torch.autocast(**amp):
            loss = F.cross_entropy(run(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Step, iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return time.perf_counter() - start


def gemm_roof(dtype: torch.dtype, device: torch.device, repeats: int = 10, budget_s: float = 2.0,
              n: int | None = None) -> float:
    """Dense matmul FLOP/s of this machine: the practical ceiling for a transformer's GEMMs.

    The best of up to ``repeats`` products of two ``n x n`` matrices, fewer where they would take more
    than ``budget_s``: a CPU without bf16 units needs seconds for one 2048^3 bf16 product.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    first = _timed(lambda: a @ b, 1, device)  # also the warm-up
    repeats = max(1, min(repeats, int(budget_s / first)))
    seconds = min(_timed(lambda: a @ b, 1, device) for _ in range(repeats))  # a roof is the best case
    return 2 * n**3 / seconds


def graph_breaks(model: nn.Module, input_size: tuple[int, ...]) -> tuple[int, int]:
    """(graphs, graph breaks) that dynamo makes of the model's forward; 1 and 0 mean one whole graph."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model.eval())(torch.randn(2, *input_size))
    return explained.graph_count, explained.graph_break_count


def measure(
    name: str, mode: Mode, config: BenchConfig, roof: dict[str, float], peak: float | None = None,
) -> list[dict]:
    """All contenders of one model in one mode: interleaved timing rounds, then memory; one row each."""
    device = torch.device(config.device)
    models = contenders(name, config.compare, config.variants)
    input_size = models["vitzoo"].pretrained_cfg["input_size"]
    flops = 2 * count_macs(models["vitzoo"], input_size)
    flops *= 3 if mode.step == "train" else 1  # backward costs about twice the forward
    images = torch.randn(config.batch_size, *input_size, device=device)
    steps = {impl: make_step(m, mode, images) for impl, m in models.items()}
    for step in steps.values():  # warm-up; compiles here
        step(), step()
    per_step = _timed(steps["timm"], 1, device)
    iters = max(1, math.ceil(config.round_seconds / per_step))
    seconds: dict[str, list[float]] = {impl: [] for impl in steps}
    for round_ in range(config.rounds):  # the order flips each round: whoever runs second inherits the first's caches
        for impl, step in list(steps.items())[:: -1 if round_ % 2 else 1]:
            seconds[impl].append(_timed(step, iters, device))
    tensors = {impl: peak_tensor_bytes(step, device) for impl, step in steps.items()}  # exact: measured once
    samples: dict[str, list[int | None]] = {impl: [] for impl in steps}
    if device.type == "cpu":
        for _ in range(MEMORY_ROUNDS):  # interleaved too: the heap's state drifts between measurements
            for impl, step in steps.items():
                samples[impl].append(peak_rss_bytes(step))
    rss = {impl: int(statistics.median(v)) if v and None not in v else None for impl, v in samples.items()}
    rows = []
    for impl, times in seconds.items():
        speed = config.batch_size * iters / statistics.median(times)
        ratios = [t / s for s, t in zip(times, seconds["timm"], strict=True)]
        rows.append({
            "model": name, "compile": "compiled" if mode.compiled else "eager", "dtype": mode.dtype,
            "step": mode.step, "impl": impl, "img/s": f"{speed:.1f}",
            "vs timm [range]": f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]",
            "GFLOP/s": f"{speed * flops / 1e9:.0f}",
            "% of roof": f"{100 * speed * flops / roof[mode.dtype]:.0f}",
            "MFU %": f"{100 * speed * flops / peak:.1f}" if peak and mode.dtype == "bf16" else "n/a",
            **_memory_cells(("tensor MiB", "tensor vs timm"), tensors[impl], tensors["timm"]),
            **_memory_cells(("RSS MiB", "RSS vs timm"), rss[impl], rss["timm"]),
        })
    del steps, models
    if mode.compiled:
        torch._dynamo.reset()
    return rows


def _memory_cells(columns: tuple[str, str], value: int | None, timm_value: int | None) -> dict[str, str]:
    """A memory figure in MiB and its ratio to timm's, "n/a" where it was not measured."""
    return {columns[0]: "n/a" if value is None else f"{value / 2**20:.1f}",
            columns[1]: f"{value / timm_value:.2f}" if value and timm_value else "n/a"}


def markdown_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Rows of string cells as a GitHub Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    """The machine and library versions, for the report's header."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        hardware = f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"
    versions = [f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    for package in ("timm", "torchvision", "transformers", "einops"):
        if importlib.util.find_spec(package):
            versions.append(f"{package} {__import__(package).__version__}")
    return f"{hardware}; Python {platform.python_version()}; " + ", ".join(versions)


def bf16_peak(device: torch.device, tflops: float | None = None) -> float | None:
    """The device's dense bf16 FLOP/s for MFU: ``tflops`` when given, else the datasheet figure of a
    known GPU, else None (CPUs publish no such figure; their roof is the measured GEMM rate)."""
    if tflops:
        return tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_PEAK.items() if key in name), None)


def run(config: BenchConfig) -> str:
    """The whole benchmark as a Markdown report: machine, GEMM roof, results, graph breaks."""
    device = available_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    for name in config.models:  # a misspelt name fails now, with the closest names, not after the roof
        model_spec(name)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    roof = {d: gemm_roof(dtypes[d], device) for d in config.dtypes}
    peak = bf16_peak(device, config.peak_tflops)
    result_columns = COLUMNS + ("MFU %",) if peak else COLUMNS
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[config.compile]
    rows = []
    for name in config.models:
        for compiled in compile_modes:
            for dtype in config.dtypes:
                for step in config.steps:
                    measured = measure(name, Mode(step, dtype, compiled), config, roof, peak)
                    print(*markdown_table(measured, result_columns).splitlines()[2:], sep="\n", file=sys.stderr,
                          flush=True)
                    rows += measured
    report = [
        f"Machine: {machine(device)}",
        "",
        "Practical roof (dense square matmul): "
        + ", ".join(f"{d} {flops / 1e9:.0f} GFLOP/s" for d, flops in roof.items())
        + (f"; MFU against a bf16 dense peak of {peak / 1e12:.0f} TFLOP/s" if peak else ""),
        "",
        markdown_table(rows, result_columns),
    ]
    if config.compile != "off":
        columns = ("model", "graphs", "graph breaks")
        breaks = []
        for name in config.models:
            model = create_model(name)
            breaks.append(dict(zip(columns, (name, *graph_breaks(model, model.pretrained_cfg["input_size"])),
                                   strict=True)))
        report += ["", "torch.compile of vitzoo's forward (`torch._dynamo.explain`):", "",
                   markdown_table(breaks, columns)]
    return "\n".join(report) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, the fields of :class:`BenchConfig` (shared by ``vitzoo bench`` and
    ``benchmarks/bench.py``); ``--device`` is checked when the benchmark starts."""
    parser.add_argument("models", nargs="*", default=BenchConfig.models,
                        help=f"registry names to measure (default: {' '.join(BenchConfig.models)})")
    add_options(parser, BenchConfig, [
        "batch_size", "rounds", "round_seconds", "dtypes", "steps", "compile", "compare", "variants", "device",
        "threads", "peak_tflops", "out",
    ])


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**{**parsed_fields(BenchConfig, args), "models": tuple(args.models)})


def _cmd_bench(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    report = run(config)
    print(report)
    if config.out:
        with open(config.out, "w") as out:
            out.write(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/bench.py``: the same benchmark without the ``vitzoo`` command."""
    parser = argparse.ArgumentParser(description="vitzoo vs timm, side by side in one process")
    add_arguments(parser)
    return run_command("benchmarks/bench.py", lambda: _cmd_bench(parser.parse_args(argv)))


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """``vitzoo bench``: the side-by-side benchmark against timm."""
    parser = sub.add_parser("bench", help="speed and memory side by side with timm (ratios, one process)")
    add_arguments(parser)
    parser.set_defaults(func=_cmd_bench)
