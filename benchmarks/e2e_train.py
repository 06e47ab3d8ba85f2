"""End-to-end training speed: ``vitzoo finetune`` against timm's own trainer on the same JPEGs, model and recipe.

    python benchmarks/e2e_train.py --out e2e.md          # defaults: vit_tiny_patch16_224, batch 64, 2 workers

timm's trainer is its ``train.py``, vendored unchanged as ``benchmarks/upstream/timm_train.py`` from
https://github.com/huggingface/pytorch-image-models at commit aa4b5850c1543fa488abf260f18390eda46cf85d (see
``benchmarks/upstream/README.md``); it runs against the installed timm. The script writes a deterministic
ImageFolder of smooth, natural-looking JPEGs (``train/`` and ``val/``), then runs both trainers on it as child
processes, alternating their order each round (timm first, then vitzoo first, ...), and prints every command it
runs so that any figure can be reproduced by hand.

Both train the same randomly initialised model for the same steps (``--epochs`` passes over the training set),
fp32, with AdamW, the same peak lr, weight decay, gradient clipping and label smoothing, one epoch of linear
warm-up then cosine decay, RandomResizedCrop (bicubic) and a horizontal flip, the same batch size and number of
loader workers. What differs is in ``RECIPE_NOTES`` (and the report). Timed are the training steps after the
first ``--skip`` of each run (start-up, evaluation and checkpoints are not steps): timm logs every step's time
and data time (``--log-interval 1``); vitzoo's loop logs them at DEBUG level (``vitzoo.train.loop``), which the
child command turns on. Memory: the trainer process's peak resident set (``VmHWM``) and the peak of its loader
workers' summed proportional set size (``Pss``, shared pages split between the processes that share them),
sampled from ``/proc`` every ``--poll`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TIMM_TRAIN = ROOT / "benchmarks" / "upstream" / "timm_train.py"
TIMM_COMMIT = "aa4b5850c1543fa488abf260f18390eda46cf85d"
# `vitzoo finetune`, with the loop's per-step timing log switched on
VITZOO = ("import logging, sys; from vitzoo.cli import main; "
          "logging.getLogger('vitzoo.train.loop').setLevel(logging.DEBUG); sys.exit(main())")
TIMM_STEP = re.compile(r"Train: (\d+) \[\s*(\d+)/\d+.*?Time: ([\d.]+)s,.*?Data: ([\d.]+) ")
VITZOO_STEP = re.compile(r"step (\d+): ([\d.]+) s, ([\d.]+) s of it waiting for data")
RECIPE_NOTES = [
    "timm: its own defaults otherwise, e.g. the prefetcher (uint8 batches from the workers, normalised in the "
    "trainer process) and persistent workers; vitzoo: uint8 batches too, normalised by its loop on the device, one "
    "loader for the whole run, each sample's augmentation seeded by (seed, epoch, index) for exact resume",
    "timm's AdamW is torch's for-loop implementation (its default on CPU), vitzoo's the fused one",
    "on the CPU vitzoo's trainer has glibc keep freed blocks of up to 1 GiB in its heap (mallopt); timm's leaves "
    "malloc as it is (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ in the environment give both the setting)",
    "warm-up: timm from --warmup-lr 0 per update, vitzoo from lr/warmup_steps; label smoothing: timm's "
    "LabelSmoothingCrossEntropy, vitzoo's F.cross_entropy(label_smoothing=)",
    "timm writes a checkpoint after each epoch and has no validation (--val-split ''); vitzoo evaluates on val/ "
    "and checkpoints once, at the end (neither is a timed step)",
]


@dataclass(frozen=True)
class Recipe:
    """What both trainers are asked to do."""

    model: str = "vit_tiny_patch16_224"
    img_size: int | None = None  # None: the model's
    batch_size: int = 64
    steps_per_epoch: int = 15  # the training set holds batch_size x steps_per_epoch images
    epochs: int = 2  # the first is the lr warm-up
    lr: float = 1e-3
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    workers: int = 2
    seed: int = 0
    device: str = "cpu"
    amp: bool = False  # bf16 autocast for both trainers

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def smooth_image(rng: np.random.Generator, size: int, tint: np.ndarray) -> Image.Image:
    """A photo-like RGB image: large smooth colour regions, some mid-scale structure and sensor-like grain,
    so that JPEG encodes (and decodes) it at a realistic cost."""
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
    detail = detail.resize((size, size), Image.BICUBIC)
    pixels = 0.65 * np.asarray(coarse, np.float32) + 0.25 * np.asarray(detail, np.float32) + 0.1 * 255 * tint
    pixels += rng.normal(0.0, 4.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int,
                      seed: int = 0) -> Path:
    """``root/train/class_K/*.jpg`` and ``root/val/class_K/*.jpg``, the same bytes for the same arguments; a folder
    made before with the same arguments is kept."""
    params = {"classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "size": size, "seed": seed}
    marker = root / "made.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    tints = np.random.default_rng(seed).uniform(-1.0, 1.0, (classes, 3)).astype(np.float32)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.jpg"):
                old.unlink()
            for index in range(count):
                rng = np.random.default_rng([seed, label, index, split == "val"])
                smooth_image(rng, size, tints[label]).save(folder / f"{index:05d}.jpg", quality=90)
    marker.write_text(json.dumps(params))
    return root


def timm_command(recipe: Recipe, data: Path, out: Path, classes: int) -> list[str]:
    command = [
        sys.executable, str(TIMM_TRAIN), "--data-dir", str(data), "--val-split", "", "--model", recipe.model,
        "--num-classes", str(classes), "--device", recipe.device, "-b", str(recipe.batch_size), "--epochs",
        str(recipe.epochs), "--opt", "adamw", "--lr", str(recipe.lr), "--weight-decay", str(recipe.weight_decay),
        "--clip-grad", str(recipe.grad_clip), "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "1",
        "--warmup-lr", "0", "--min-lr", "0", "--smoothing", str(recipe.label_smoothing),
        "--train-interpolation", "bicubic", "--color-jitter", "0", "--hflip", "0.5", "--reprob", "0",
        "-j", str(recipe.workers), "--seed", str(recipe.seed), "--log-interval", "1", "--checkpoint-hist", "1",
        "--output", str(out.parent), "--experiment", out.name,
    ] + (["--amp", "--amp-dtype", "bfloat16"] if recipe.amp else [])
    # train.py reads --img-size for the data only; the model takes its size as a keyword
    return command + (["--img-size", str(recipe.img_size), "--model-kwargs", f"img_size={recipe.img_size}"]
                      if recipe.img_size else [])


def vitzoo_command(recipe: Recipe, data: Path, out: Path) -> list[str]:
    command = [
        sys.executable, "-c", VITZOO, "finetune", recipe.model, "--data", str(data), "--device", recipe.device,
        "--batch-size", str(recipe.batch_size), "--steps", str(recipe.steps), "--optimizer", "adamw",
        "--lr", str(recipe.lr), "--weight-decay", str(recipe.weight_decay), "--grad-clip", str(recipe.grad_clip),
        "--warmup-steps", str(recipe.steps_per_epoch), "--label-smoothing", str(recipe.label_smoothing),
        "--workers", str(recipe.workers), "--seed", str(recipe.seed), "--eval-every", str(recipe.steps),
        "--checkpoint-every", str(recipe.steps), "--out", str(out),
    ] + (["--amp"] if recipe.amp else [])
    return command + (["--img-size", str(recipe.img_size)] if recipe.img_size else [])


def parse_steps(trainer: str, log: str) -> list[tuple[float, float]]:
    """(seconds, seconds waiting for data) of each training step, in order, from a trainer's log."""
    if trainer == "timm":
        found = {(int(epoch), int(step)): (float(t), float(d)) for epoch, step, t, d in TIMM_STEP.findall(log)}
    else:
        found = {(0, int(step)): (float(t), float(d)) for step, t, d in VITZOO_STEP.findall(log)}
    return [found[key] for key in sorted(found)]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process is gone
        return ""


def _kib(text: str, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _cpu_seconds(stat: str) -> float:
    """User plus system CPU seconds of a process from its ``/proc/PID/stat`` line."""
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (loader workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat and int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return found


def _gpu_mib(pid: int) -> int:
    """GPU memory ``nvidia-smi`` reports for ``pid`` (the CUDA allocator's reserve plus the context), 0 if none."""
    try:
        rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(int(used) for row_pid, used in (row.split(",") for row in rows.splitlines() if "," in row)
               if int(row_pid) == pid)


GPU_POLL_S = 1.0  # each GPU sample starts nvidia-smi, a process on the machine being measured: at most once a second


class MemoryWatch(threading.Thread):
    """Samples a process and its children until it ends: its own peak RSS (VmHWM, kept by the kernel, so
    exact), the highest summed PSS of its children seen, the CPU seconds each child had used when last seen and,
    on a GPU, its highest GPU memory seen."""

    def __init__(self, pid: int, every: float, gpu: bool) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.gpu = pid, every, gpu
        self.rss_kib = self.workers_kib = self.gpu_mib = 0
        self.workers_cpu: dict[int, float] = {}  # child pid -> its CPU seconds when last sampled
        self.next_gpu = 0.0  # time.monotonic() of the next GPU sample
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            status = _read(f"/proc/{self.pid}/status")
            if status:
                self.rss_kib = max(self.rss_kib, _kib(status, "VmHWM"))
            children = _children(self.pid)
            pss = sum(_kib(_read(f"/proc/{child}/smaps_rollup"), "Pss") for child in children)
            for child in children:
                stat = _read(f"/proc/{child}/stat")
                if stat:
                    self.workers_cpu[child] = _cpu_seconds(stat)
            self.workers_kib = max(self.workers_kib, pss)
            if self.gpu and time.monotonic() >= self.next_gpu:
                self.gpu_mib = max(self.gpu_mib, _gpu_mib(self.pid))
                self.next_gpu = time.monotonic() + GPU_POLL_S
            self.done.wait(self.every)


@dataclass
class Run:
    trainer: str
    round: int
    images_per_s: float
    data_s_per_step: float
    data_share: float
    rss_mib: float
    workers_pss_mib: float
    gpu_mib: float
    wall_s: float
    cpu_s: float  # user + system CPU of the trainer and its workers, start-up and evaluation included
    workers_cpu_s: float


def run_trainer(trainer: str, command: list[str], log_path: Path, recipe: Recipe, skip: int, poll: float,
                round_: int) -> Run:
    """Run one trainer to the end and measure it; its whole output is kept in ``log_path``."""
    print(f"$ {shlex.join(command)}", flush=True)
    start, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        watch = MemoryWatch(process.pid, poll, recipe.device.startswith("cuda"))
        watch.start()
        code = process.wait()
        watch.done.set()
        watch.join()
    wall, cpu_after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    steps = parse_steps(trainer, log_path.read_text())
    if code or len(steps) != recipe.steps:
        raise RuntimeError(f"{trainer} exited with {code} after {len(steps)} of {recipe.steps} logged steps; "
                           f"see {log_path}")
    timed = steps[skip:]
    seconds, waited = sum(t for t, _ in timed), sum(d for _, d in timed)
    return Run(trainer, round_, len(timed) * recipe.batch_size / seconds, waited / len(timed), waited / seconds,
               watch.rss_kib / 1024, watch.workers_kib / 1024, watch.gpu_mib, wall, cpu,
               sum(watch.workers_cpu.values()))


def report(runs: list[Run], recipe: Recipe, skip: int, commands: dict[str, str]) -> str:
    """The markdown report: the machine, the recipe, one row per trainer (medians over the rounds)."""
    import timm
    import torch

    by = {name: [r for r in runs if r.trainer == name] for name in ("vitzoo", "timm")}
    ratios = [v.images_per_s / t.images_per_s for v, t in zip(by["vitzoo"], by["timm"], strict=True)]
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = recipe.device.startswith("cuda")
    if gpu:
        cpu += f", {torch.cuda.get_device_name()}"
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), timm {timm.__version__}; timm's train.py at {TIMM_COMMIT[:12]}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "",
        f"Recipe: {json.dumps(asdict(recipe))}; {recipe.steps} steps per run, the first {skip} not timed; "
        f"{len(by['timm'])} runs each, order alternating.",
        "",
        "| trainer | images/s | vs timm [range] | data wait s/step | data wait share | peak RSS MiB "
        "| workers' peak PSS MiB |" + (" peak GPU MiB |" if gpu else "") + " process wall s | CPU s | workers' CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for name, rows in by.items():
        ratio = (f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]" if name == "vitzoo"
                 else "1.000")
        cells = [statistics.median(getattr(r, key) for r in rows) for key in
                 ("images_per_s", "data_s_per_step", "data_share", "rss_mib", "workers_pss_mib", "gpu_mib", "wall_s",
                  "cpu_s", "workers_cpu_s")]
        lines.append(f"| {name} | {cells[0]:.1f} | {ratio} | {cells[1]:.3f} | {cells[2]:.1%} | {cells[3]:.0f} "
                     f"| {cells[4]:.0f} |" + (f" {cells[5]:.0f} |" if gpu else "")
                     + f" {cells[6]:.0f} | {cells[7]:.0f} | {cells[8]:.0f} |")
    lines += ["", "Recipe differences:", *[f"- {note}" for note in RECIPE_NOTES], "", "Commands (last round):",
              "", "```bash", *commands.values(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        if isinstance(value, bool):
            p.add_argument(f"--{name.replace('_', '-')}", action="store_true")
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=type(value) if value is not None else int,
                           default=value)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--rounds", type=int, default=2, help="runs of each trainer, the order alternating")
    p.add_argument("--skip", type=int, default=3, help="first steps of each run left out of the timing")
    p.add_argument("--work", type=Path, default=Path("runs/e2e_train"), help="data, run folders and logs")
    p.add_argument("--poll", type=float, default=1.0,
                   help="seconds between memory samples (each reads the workers' smaps: about 15 ms of CPU taken "
                        "from the trainers on 2 cores)")
    p.add_argument("--out", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    recipe = Recipe(**{name: getattr(args, name) for name in asdict(defaults)})
    if not 0 <= args.skip < recipe.steps:
        p.error(f"--skip must leave steps to time: 0 <= skip < {recipe.steps}")
    train_per_class = -(-recipe.batch_size * recipe.steps_per_epoch // args.classes)
    data = make_image_folder(args.work / "data", args.classes, train_per_class, 2, args.image_size)
    # the training set is trimmed by the trainers' drop-last to batch_size x steps_per_epoch images per epoch
    if args.classes * train_per_class // recipe.batch_size != recipe.steps_per_epoch:
        p.error(f"{args.classes} classes of {train_per_class} images do not make {recipe.steps_per_epoch} batches "
                f"of {recipe.batch_size}; pick --classes dividing --batch-size")
    runs, commands = [], {}
    for round_ in range(args.rounds):
        for trainer in ("timm", "vitzoo") if round_ % 2 == 0 else ("vitzoo", "timm"):
            out = (args.work / f"{trainer}-{round_}").resolve()
            shutil.rmtree(out, ignore_errors=True)  # this script's own run folder of an earlier call
            command = (timm_command(recipe, data.resolve(), out, args.classes) if trainer == "timm" else
                       vitzoo_command(recipe, data.resolve(), out))
            commands[trainer] = shlex.join(command)
            runs.append(run_trainer(trainer, command, args.work / f"{trainer}-{round_}.log", recipe, args.skip,
                                    args.poll, round_))
            print(json.dumps(asdict(runs[-1])), flush=True)
    text = report(runs, recipe, args.skip, commands)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
