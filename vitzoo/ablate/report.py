"""The results folder of an ablation: tables for machines (CSV, JSON), for people (Markdown), and plots."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vitzoo.ablate import AblationConfig

# Per-run columns of results.csv, after the variant, seed and grid-field columns.
METRICS = ("params", "gflops", "train_img_s", "train_loss", "val_loss", "val_acc", "peak_mem_mb", "seconds", "steps")


def size_columns(config: AblationConfig) -> list[str]:
    """The accuracy columns of the evaluations at other sizes: ``val_acc@S`` for each of ``eval_sizes``."""
    return [f"val_acc@{size}" for size in config.eval_sizes]


def write_report(out: Path, config: AblationConfig, rows: Sequence[dict[str, Any]]) -> None:
    """results.csv, results.json, summary.md, loss_curves.png and acc_vs_params.png in ``out``."""
    columns = ["variant", "seed", *config.grid, *METRICS, *size_columns(config), "peak_mem_kind"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps([{k: r.get(k) for k in columns} for r in rows], indent=1))
    groups = group_by_variant(rows)
    (out / "summary.md").write_text(summary_markdown(config, groups))
    plot_loss_curves(groups, out / "loss_curves.png", config.model)
    plot_accuracy_vs_params(groups, out / "acc_vs_params.png", config.model)


def group_by_variant(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs per variant, variants in the order they first appear (the grid's order)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    return groups


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """``"0.912 ± 0.004"``; a single run has no spread to show."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_markdown(config: AblationConfig, groups: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table with one line per variant, mean ± std (sample std) over its seeds."""
    first = next(iter(groups.values()))[0]
    batch = (f"{config.max_tokens} patch tokens (NaFlex, budgets {', '.join(map(str, config.seq_lens))})"
             if config.naflex else f"batch {config.batch_size}")
    sizes = size_columns(config)
    lines = [
        f"# Ablation of `{config.model}` on {config.data}",
        "",
        f"{config.steps} steps x {batch}, AdamW lr {config.lr}, weight decay "
        f"{config.weight_decay}, seeds {', '.join(map(str, config.seeds))} (mean ± std over seeds); the same "
        f"data split, data order and initialisation seed for every variant."
        + (f" Fixed overrides: {', '.join(f'{k}={v}' for k, v in config.overrides.items())}." if config.overrides
           else ""),
        "",
        "| variant | params (M) | GFLOPs | train img/s | final train loss | val acc (%) | "
        + "".join(f"at {key.partition('@')[2]} px (%) | " for key in sizes) + "peak mem (MB) |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(sizes) + "---:|",
    ]
    for name, runs in groups.items():
        lines.append(
            f"| {name} | {runs[0]['params'] / 1e6:.3f} | {runs[0]['gflops']:.4f} | "
            f"{mean_std([r['train_img_s'] for r in runs], digits=0)} | {mean_std([r['train_loss'] for r in runs])} | "
            + "".join(f"{mean_std([r.get(key) for r in runs], scale=100, digits=1)} | " for key in ["val_acc", *sizes])
            + f"{runs[0]['peak_mem_mb']:.1f} |"
        )
    lines += ["", f"Peak memory: {first['peak_mem_kind']}. Plots: `loss_curves.png`, `acc_vs_params.png`.", ""]
    return "\n".join(lines)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Moving average (shorter at the start), so curves of noisy per-step losses can be told apart."""
    values = np.asarray(values, dtype=float)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (cumulative[1:] - cumulative[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot_loss_curves(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Training loss per step, one line per variant (mean over seeds, band = min..max)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, runs in groups.items():
        steps = min(len(r["losses"]) for r in runs)
        curves = np.stack([smooth(r["losses"][:steps], max(1, steps // 20)) for r in runs])
        x = np.arange(1, steps + 1)
        (line,) = ax.plot(x, curves.mean(0), label=name, linewidth=1.4)
        if len(runs) > 1:
            ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set(xlabel="step", ylabel="train loss (moving average)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_params(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Validation accuracy (mean ± std over seeds) against parameter count, one point per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, runs in groups.items():
        acc = [100 * r["val_acc"] for r in runs if r["val_acc"] is not None]
        params = runs[0]["params"] / 1e6
        ax.errorbar(params, np.mean(acc), yerr=np.std(acc, ddof=1) if len(acc) > 1 else None,
                    fmt="o", capsize=3, label=name)
    ax.set(xlabel="parameters (M)", ylabel="val accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first plot
    so that ``import vitzoo`` does not pay for matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
