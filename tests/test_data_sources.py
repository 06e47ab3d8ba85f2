"""hf: and wds: data: read like an ImageFolder, resumed bit-identically after a kill, bad input named.

The tests write their own data: 36 small images of 3 classes as a ``datasets`` save_to_disk folder (train and
test splits), as a parquet folder, and as 3 webdataset tar shards (PNG and JPEG members with ``.cls`` labels).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import killed_copy
from vitzoo.train import TrainConfig
from vitzoo.train.data import build_datasets, num_classes
from vitzoo.train.finetune import FinetuneConfig, finetune
from vitzoo.train.shards import expand
from vitzoo.train.sources import DataOptions

CFG = {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
       "crop_pct": 1.0}
CLASSES = ["cat", "dog", "fox"]


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def tiny_images() -> tuple[list[Image.Image], list[int]]:
    """36 random 12 x 10 images; image i has label i % 3."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(36)], \
        [i % 3 for i in range(36)]


def write_shards(folder: Path, images: list[Image.Image], labels: list[int]) -> str:
    """3 tar shards of 12 samples (PNG members for odd samples, JPEG for even ones); the ``--data`` value."""
    folder.mkdir()
    for shard in range(3):
        write_shard(folder / f"train-{shard:06d}.tar", [
            member for i in range(shard * 12, shard * 12 + 12) for member in (
                (f"{i:06d}.{'png' if i % 2 else 'jpg'}", encoded(images[i], "PNG" if i % 2 else "JPEG")),
                (f"{i:06d}.cls", str(labels[i]).encode()))])
    return f"wds:{folder}/train-{{000000..000002}}.tar"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """``--data`` values of the same images in each layout (save_to_disk: 30 train and 6 test samples)."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    images, labels = tiny_images()
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    table = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
    datasets.DatasetDict({"train": table.select(range(30)), "test": table.select(range(30, 36))}).save_to_disk(
        root / "disk")
    (root / "parquet").mkdir()
    table.to_parquet(root / "parquet" / "train-00000-of-00001.parquet")
    return {"hf": f"hf:{root / 'disk'}", "parquet": f"hf:{root / 'parquet'}",
            "wds": write_shards(root / "shards", images, labels)}


def test_each_layout_reads_the_same_images_and_labels(sources):
    """Class names come from the ClassLabel feature, the test split validates; a lossless shard member decodes to
    the pixels of the same sample in the save_to_disk folder, and the held-out split is per class."""
    train, val = build_datasets(sources["hf"], CFG)
    assert (len(train), len(val), train.classes) == (30, 6, CLASSES)
    parquet_train, parquet_val = build_datasets(sources["parquet"], CFG, val_fraction=1 / 3)
    assert (len(parquet_train), len(parquet_val), num_classes(parquet_train)) == (24, 12, 3)
    shard_train, shard_val = build_datasets(sources["wds"], CFG, val_fraction=1 / 3)
    assert (len(shard_train), len(shard_val), num_classes(shard_train)) == (24, 12, 3)
    reader = shard_train.dataset.reader
    assert reader.labels.tolist() == [i % 3 for i in range(36)]
    assert reader.image(7).tobytes() == train.reader.image(7).tobytes()  # PNG: lossless
    assert reader.image(6).size == (12, 10)  # JPEG
    assert expand("a-{08..10}-{x,y}.tar") == ["a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar",
                                              "a-10-x.tar", "a-10-y.tar"]


def train_config(out: Path, data: str, resume: bool = False, workers: int = 0, **extra) -> FinetuneConfig:
    """4 steps of 8 augmented 16 px images on a one-block pico model, evaluated at 2 and 4, checkpoints at 2 and 4."""
    return FinetuneConfig(model="vit_pico_patch4_32", overrides={"depth": 1, "proj_drop_rate": 0.1}, img_size=16,
                          data=data, out=str(out), resume=resume, eval_every=2, checkpoint_every=2,
                          train=TrainConfig(steps=4, batch_size=8, warmup_steps=1, device="cpu", num_workers=workers),
                          **extra)



@pytest.fixture(scope="module")
def finished(sources, tmp_path_factory):
    """``finished(kind)``: the folder of an uninterrupted run (no loader workers) on ``sources[kind]``, run once."""
    runs: dict[str, Path] = {}

    def run(kind: str) -> Path:
        if kind not in runs:
            runs[kind] = tmp_path_factory.mktemp("runs") / kind
            finetune(train_config(runs[kind], sources[kind]), progress=False)
        return runs[kind]

    return run


def digest(run: Path) -> str:
    return json.loads((run / "summary.json").read_text())["weights_digest"]


@pytest.mark.parametrize("kind", ["hf", "wds"])
def test_a_killed_run_resumes_bit_identically(sources, finished, tmp_path, kind):
    """Killed after its step-2 checkpoint and resumed with two loader workers, the run ends with the weights and
    metrics.jsonl of the uninterrupted run without workers (random crops, flips and dropout included)."""
    straight = finished(kind)
    run = killed_copy(straight, tmp_path / "killed", step=2, half_written_row=True)
    resumed = finetune(train_config(run, sources[kind], resume=True, workers=2), progress=False)
    assert resumed["weights_digest"] == digest(straight)
    assert (run / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    assert json.loads((run / "run.json").read_text())["history"] == [
        {"resumed_at": 2, "changed": {"num_workers": [0, 2]}}]


def test_resume_refuses_other_data_options(sources, finished, tmp_path, bad_input):
    run = killed_copy(finished("hf"), tmp_path / "killed", step=2, half_written_row=True)
    config = train_config(run, sources["hf"], resume=True, data_options=DataOptions(hf_val_split="train"))
    with pytest.raises(ValueError, match="data_options") as refused:
        finetune(config, progress=False)
    bad_input("vitzoo finetune --resume", "--hf-val-split train (started without)", str(refused.value))


def test_bad_sources_are_named(sources, tmp_path, bad_input):
    """A missing column, a dataset without labels, an empty or unmatched pattern, a sample without a label."""
    def refused(data: str, given: str, match: str, error: type = ValueError, **options) -> None:
        with pytest.raises(error, match=match) as caught:
            build_datasets(data, CFG, options=DataOptions(**options))
        bad_input("--data", given, str(caught.value))

    refused(sources["hf"], "hf:<folder> --label-column breed", r"no column 'breed' \(--label-column\); its columns: "
            r"img \(Image\), label \(ClassLabel\)", label_column="breed")
    refused(sources["hf"], "hf:<folder> --hf-split training", r"no split 'training' for training \(--hf-split\); "
            r"its splits: train, test", hf_split="training")
    import datasets

    unlabelled = tmp_path / "unlabelled"
    datasets.Dataset.from_dict({"img": [Image.new("RGB", (4, 4))] * 2, "kind": [1, 2]},
                               features=datasets.Features({"img": datasets.Image(), "kind": datasets.Value("int64")})
                               ).save_to_disk(unlabelled)
    refused(f"hf:{unlabelled}", "hf:<folder without a ClassLabel or label column>",
            r"no ClassLabel column, so the label column cannot be chosen; pass --label-column \(its columns: "
            r"img \(Image\), kind \(Value\)\)")
    refused("wds:", "wds: (no pattern)", r"names no data: write wds:PATH, e.g. wds:shards/train-")
    refused(f"wds:{tmp_path}/none-{{0..3}}.tar", "wds:<pattern of missing shards>", "4 of 4 shards do not exist",
            FileNotFoundError)
    refused(f"wds:{tmp_path}/*.tar", "wds:<glob matching nothing>", "matches no files", FileNotFoundError)
    write_shard(tmp_path / "nolabel.tar", [("a.png", encoded(Image.new("RGB", (4, 4)), "PNG"))])
    refused(f"wds:{tmp_path}/nolabel.tar", "wds:<shard whose sample has no .cls member>",
            r"sample 'a' has no label member \(.cls: the class index as text\)")
    refused(sources["wds"], "wds:... --val-data hf:...", "must be wds:PATTERN", val_data=sources["hf"])
    refused(sources["hf"], "hf:... --val-data wds:...", "--val-data is for --data wds:", val_data=sources["wds"])
