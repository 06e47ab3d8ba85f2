"""The benchmark harness runs end to end and reports every column; speed itself is never asserted."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys

import pytest
import timm
import torch

import vitzoo
from tests.conftest import timm_twin
from vitzoo import bench
from vitzoo.bench import COLUMNS, Mode, graph_breaks, make_step
from vitzoo.cli import main
from vitzoo.memory import peak_rss_bytes, peak_tensor_bytes


def _table(report: str) -> list[list[str]]:
    lines = [line for line in report.splitlines() if line.startswith("| model | compile")]
    assert len(lines) == 1, report
    start = report.splitlines().index(lines[0])
    table = []
    for line in report.splitlines()[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


@pytest.fixture
def one_block(monkeypatch):
    """The harness is what these tests check, not the model: its contenders get one block and the roof
    a 256^3 product, so bf16 rows stay quick on CPUs without bf16 units (one 2048^3 bf16 product can
    take seconds there)."""
    monkeypatch.setattr(bench, "create_model", functools.partial(bench.create_model, depth=1))
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=1))
    monkeypatch.setattr(bench, "gemm_roof", functools.partial(bench.gemm_roof, n=256))


def test_bench_command_reports_every_column(tmp_path, capsys, one_block):
    out = tmp_path / "report.md"
    code = main([
        "bench", "vit_tiny_patch16_224", "--batch-size", "2", "--rounds", "1", "--round-seconds", "0",
        "--compile", "off", "--device", "cpu", "--variants", "patch_embed=conv", "--out", str(out),
    ])
    assert code == 0
    report = out.read_text()
    assert report in capsys.readouterr().out
    assert "Machine:" in report and "Practical roof" in report
    header, rule, *rows = _table(report)
    assert tuple(header) == COLUMNS
    assert all(set(cell) <= set("-") and cell for cell in rule)
    # 2 dtypes x 2 steps x (vitzoo, its conv-patch variant, timm); no torchvision/HF twin exists for ViT-Ti
    impls = ("vitzoo", "timm", "vitzoo patch_embed=conv")
    assert len(rows) == 12
    seen = {(r[2], r[3], r[4]) for r in rows}
    assert seen == {(d, s, i) for d in ("fp32", "bf16") for s in ("infer", "train") for i in impls}
    for row in rows:
        cells = dict(zip(COLUMNS, row, strict=True))
        assert cells["model"] == "vit_tiny_patch16_224" and cells["compile"] == "eager"
        assert float(cells["img/s"]) > 0 and float(cells["GFLOP/s"]) > 0 and float(cells["% of roof"]) > 0
        ratio, spread = cells["vs timm [range]"].split(" ", 1)
        assert float(ratio) > 0 and spread.startswith("[") and spread.endswith("]")
        assert float(cells["tensor MiB"]) > 0 and float(cells["tensor vs timm"]) > 0
        if cells["impl"] == "timm":
            assert float(ratio) == 1.0


def test_bench_rejects_unknown_modes(capsys):
    with pytest.raises(SystemExit) as stopped:  # refused by the parser, as BenchConfig refuses it
        main(["bench", "vit_tiny_patch16_224", "--dtypes", "fp16", "--device", "cpu"])
    assert stopped.value.code == 2
    assert "argument --dtypes: BenchConfig.dtypes: expected a tuple of 'fp32' or 'bf16', got ('fp16',)" in (
        capsys.readouterr().err)


def test_training_step_updates_weights_and_memory_is_measured():
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=1)
    before = model.head.weight.detach().clone()
    step = make_step(model, Mode("train", "fp32", compiled=False), torch.randn(2, 3, 224, 224))
    tensors = peak_tensor_bytes(step, torch.device("cpu"))
    assert not torch.equal(before, model.head.weight)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    assert tensors > grads  # gradients and activations are both alive after the forward
    rss = peak_rss_bytes(step)
    assert rss is None or rss > 0


def test_tensor_peak_counts_allocations_while_they_live():
    mib = 2**18  # float32 elements in one MiB
    at_rest = torch.zeros(mib)

    def step() -> None:
        a = torch.ones(mib)  # 1 MiB
        b = torch.ones(2 * mib)  # 3 MiB live: the peak
        del a
        at_rest.view(-1, 2).t()  # views of a tensor that existed before: nothing new
        b.add_(1)  # in place: nothing new
        torch.ones(mib)  # 3 MiB live again, freed at once

    assert peak_tensor_bytes(step, torch.device("cpu")) == 3 * 2**20


_HELD_BLOCK = """
import ctypes, torch
from vitzoo.memory import reuse_freed_host_memory
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo
def mapped_while_held():
    block = torch.empty(48 << 20, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd  # bytes in blocks malloc mapped on their own
print(mapped_while_held() >= 48 << 20, reuse_freed_host_memory(), mapped_while_held() < 48 << 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_cpu_training_serves_large_blocks_from_the_heap():
    """A 48 MiB tensor (a large activation) is mapped afresh by default, from the heap after the setting
    that CPU training makes (in a fresh process: the setting is the whole process's)."""
    found = subprocess.run([sys.executable, "-c", _HELD_BLOCK], capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["True", "True", "True"]


def test_standard_vit_compiles_to_one_graph():
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=2)
    assert graph_breaks(model, model.pretrained_cfg["input_size"]) == (1, 0)


def test_hf_comparator_has_the_same_shape():
    pytest.importorskip("transformers")
    from vitzoo.bench import _hf_vit

    spec = vitzoo.model_spec("vit_tiny_patch16_224", depth=1)
    hf, ours = _hf_vit(spec), vitzoo.VisionTransformer(spec)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    assert hf(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_mfu_uses_the_given_or_datasheet_peak(monkeypatch, capsys, one_block):
    from vitzoo.bench import bf16_peak

    assert bf16_peak(torch.device("cpu")) is None
    assert bf16_peak(torch.device("cpu"), tflops=2.0) == 2e12
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bf16_peak(torch.device("cuda")) == peak

    assert main([
        "bench", "vit_tiny_patch16_224", "--batch-size", "1", "--rounds", "1", "--round-seconds", "0",
        "--compile", "off", "--device", "cpu", "--compare", "timm", "--steps", "infer", "--peak-tflops", "0.001",
    ]) == 0
    header, _, *rows = _table(capsys.readouterr().out)
    assert tuple(header) == (*COLUMNS, "MFU %")
    mfu = {row[2]: row[-1] for row in rows}
    assert mfu["fp32"] == "n/a" and float(mfu["bf16"]) > 0


def _step_peak(model, mode: Mode, batch: int = 4) -> int:
    step = make_step(model, mode, torch.randn(batch, 3, 224, 224))
    step()  # the optimizer's state exists from here on, as in a running training loop
    return peak_tensor_bytes(step, torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["infer", "train"])
def test_a_step_holds_no_more_tensor_memory_than_timm(kind, dtype):
    """The memory half of the performance contract, as exact byte counts (speed is only benchmarked)."""
    reference, ours = timm_twin("vit_tiny_patch16_224", depth=2)
    mode = Mode(kind, dtype, compiled=False)
    assert _step_peak(ours, mode) <= _step_peak(reference, mode)


def test_checkpointing_and_patch_dropout_cut_training_memory():
    train = Mode("train", "fp32", compiled=False)
    plain = _step_peak(vitzoo.create_model("vit_tiny_patch16_224", depth=4), train)
    checkpointed = vitzoo.create_model("vit_tiny_patch16_224", depth=4)
    checkpointed.set_grad_checkpointing(True)
    assert _step_peak(checkpointed, train) < 0.5 * plain
    assert _step_peak(vitzoo.create_model("vit_tiny_patch16_224", depth=4, patch_drop_rate=0.5), train) < 0.65 * plain
