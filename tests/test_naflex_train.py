"""Patch-sequence (NaFlex) training and evaluation at several sizes: budgets, packing, label order, tokens per
step, determinism and exact resume, end to end on digits, the command line and ablations."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch.utils.data import Subset

import vitzoo
from vitzoo.ablate import AblationConfig, ablate
from vitzoo.packing import budget_size
from vitzoo.train import TrainConfig, fit
from vitzoo.train.data import build_datasets
from vitzoo.train.distributed import World, weights_digest
from vitzoo.train.finetune import main
from vitzoo.train.loop import evaluate, steps_per_epoch, train_loader
from vitzoo.train.naflex import TokenBudget, eval_sequences, token_budget

TINY_SPEC = dict(embed_dim=32, num_heads=2, depth=2, patch_size=4)
NAFLEX = TrainConfig(naflex=True, max_tokens=128, seq_lens=(4, 16, 36), warmup_steps=1, lr=3e-3)


def _model(**changes) -> vitzoo.VisionTransformer:
    torch.manual_seed(0)
    return vitzoo.create_model("vit_tiny_patch16_224", img_size=16, num_classes=10, naflex=True,
                               **{**TINY_SPEC, **changes})


@pytest.fixture(scope="module")
def digits_native():
    cfg = vitzoo.create_model("vit_tiny_patch16_224", img_size=16).pretrained_cfg
    return build_datasets("digits", cfg, native=True)


def _marked_images(count: int) -> list[tuple[torch.Tensor, int]]:
    """Images of many sizes and aspect ratios, image i filled with i + 0.5 (so a patch tells its image), label
    i % 10."""
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(4, 40, (count, 2), generator=generator).tolist()
    return [(torch.full((3, h, w), i + 0.5), i % 10) for i, (h, w) in enumerate(sizes)]


def _images_in_output_order(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each image's patches, row by row and in a row by ``patch_image``: the order of the model's outputs."""
    image = batch.get("patch_image", torch.zeros_like(batch["patch_valid"], dtype=torch.long))
    return [batch["patches"][row][batch["patch_valid"][row] & (image[row] == k)]
            for row in range(len(image)) for k in range(int(image[row].max()) + 1)
            if (batch["patch_valid"][row] & (image[row] == k)).any()]


def test_budgets_layout_and_tokens_per_step(bad_input):
    tokens = TokenBudget.of(max_tokens=100, seq_lens=(128, 36, 4, 16))
    assert tokens.budgets == (4, 16, 36)  # 128 is longer than a micro-batch
    assert [(tokens.layout(b).per_row, tokens.layout(b).seq_len, tokens.layout(b).rows) for b in tokens.budgets] == [
        (9, 36, 2), (2, 32, 3), (1, 36, 2)]
    assert tokens.layout(64).seq_len == 64  # an evaluation beyond the longest budget: a row of its own
    with pytest.raises(ValueError, match="longer than max_tokens=8, so no step could hold an image; raise") as err:
        TokenBudget.of(8, (16, 36))
    bad_input("--naflex", "--max-tokens 8 --seq-lens 16,36", str(err.value))
    with pytest.raises(ValueError, match="mixup and cutmix blend images of one shape") as err:
        replace(NAFLEX, mixup=0.8)
    bad_input("--naflex", "--naflex --mixup 0.8", str(err.value))


def test_packed_steps_hold_the_budget_the_tokens_and_the_labels_in_output_order():
    """Every image of a step is resized, aspect ratio kept, to the step's budget; a micro-batch is at most
    max_tokens patches, full rows; each label sits where the model returns that image's logits; an epoch
    takes each sample at most once."""
    data = _marked_images(300)
    config = replace(NAFLEX, accum_steps=2)
    tokens = token_budget(config)
    seen, budgets = [], set()
    for batch, labels in train_loader(_model(), data, config, World(), epoch=0, done=0):
        budget = next(b for b in tokens.budgets if tokens.layout(b).images == len(labels))
        layout = tokens.layout(budget)
        assert batch["patch_valid"].shape == (layout.rows, layout.seq_len)
        assert layout.rows * layout.seq_len <= config.max_tokens
        for patches, label in zip(_images_in_output_order(batch), labels.tolist(), strict=True):
            index = int(patches[0, 0])
            torch.testing.assert_close(patches, torch.full_like(patches, index + 0.5), atol=1e-3, rtol=0)
            height, width = budget_size(*data[index][0].shape[1:], 4, budget)
            assert label == index % 10 and len(patches) == (height // 4) * (width // 4) <= budget
            seen.append(index)
        budgets.add(budget)
    assert budgets == set(tokens.budgets) and len(set(seen)) == len(seen) > len(data) - 60


def test_data_position_is_a_function_of_the_step(digits_native):
    """The micro-batches from step k of an epoch are those an uninterrupted epoch has from step k on, with
    two loader workers as without; the epoch's step count is the loop's."""
    train = Subset(digits_native[0], range(400))
    config, world, model = replace(NAFLEX, accum_steps=2), World(), _model()
    full = list(train_loader(model, train, config, world, epoch=1, done=0))
    assert len(full) == steps_per_epoch(len(train), config) * 2
    later = list(train_loader(model, train, replace(config, num_workers=2), world, epoch=1, done=3))
    assert len(later) == len(full) - 6
    for (a, la), (b, lb) in zip(full[6:], later, strict=True):
        assert torch.equal(la, lb) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other_epoch = next(iter(train_loader(model, train, config, world, epoch=2, done=0)))
    assert not torch.equal(other_epoch[1][:8], full[0][1][:8])


def test_naflex_run_resumes_to_the_same_weights(tmp_path, digits_native):
    """Resumed from its step-3 checkpoint (mid-epoch, dropout and accumulation on), a patch-sequence run ends
    bit-identical to the uninterrupted one, across an epoch boundary."""
    train, val = Subset(digits_native[0], range(150)), Subset(digits_native[1], range(64))
    config = replace(NAFLEX, steps=7, accum_steps=2, checkpoint_every=3, eval_every=3)
    assert steps_per_epoch(len(train), config) < 7

    def run(resume: bool) -> tuple[str, list[dict]]:
        model = _model(proj_drop_rate=0.1)
        result = fit(model, train, val, config, progress=False, run_dir=tmp_path, resume=resume)
        return weights_digest(model.state_dict()), result.evals

    straight = run(False)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003")
    assert run(True) == straight


def test_naflex_finetune_on_digits_with_eval_sizes(tmp_path):
    """``vitzoo finetune --naflex --max-tokens --seq-lens --eval-sizes``: every validation row holds the accuracy
    at each size (at the model's own size the same as val_acc), and so do the summary and metrics.csv."""
    assert main(["vit_tiny_patch16_224", "--img-size", "16", "--naflex", "--max-tokens", "256", "--seq-lens",
                 "4,16,36", "--eval-sizes", "8,16,24", "--steps", "20", "--lr", "3e-3", "--warmup-steps", "5",
                 "--eval-every", "10", "--out", str(tmp_path), "--device", "cpu",
                 *[f"--set={k}={v}" for k, v in TINY_SPEC.items()]]) == 0
    train = json.loads((tmp_path / "run.json").read_text())["train"]
    assert (train["naflex"], train["max_tokens"], train["seq_lens"], train["eval_sizes"]) == (
        True, 256, [4, 16, 36], [8, 16, 24])
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert all({f"val_acc@{s}" for s in (8, 16, 24)} <= row.keys() and row["val_acc@16"] == row["val_acc"]
               for row in rows)
    assert summary["val_acc@24"] == rows[-1]["val_acc@24"] and summary["steps"] == 20
    assert "val_acc@8" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_eval_sizes_of_an_image_model_need_a_dynamic_size(tmp_path, digits_native, bad_input):
    """A fixed-size model is evaluated at other square sizes once it takes any size; without, it is refused
    before training, with what to pass."""
    cfg = vitzoo.create_model("vit_tiny_patch16_224", img_size=16).pretrained_cfg
    train, val = build_datasets("digits", cfg)
    config = TrainConfig(steps=2, batch_size=16, warmup_steps=1, eval_sizes=(8, 16, 32))
    model = vitzoo.create_model("vit_tiny_patch16_224", img_size=16, num_classes=10, **TINY_SPEC)
    with pytest.raises(ValueError, match=r"evaluating at \[8, 32\] needs a model that takes any image size: build "
                                         r"it with dynamic_img_size=True \(vitzoo finetune: --set dynamic") as err:
        fit(model, train, val, config, progress=False)
    bad_input("--eval-sizes", "--eval-sizes 8,16,32 for a 16 px model of fixed size", str(err.value))
    with pytest.raises(ValueError, match="eval_sizes \\[10\\] are not multiples of the patch size 4") as err:
        fit(model, train, val, replace(config, eval_sizes=(10,)), progress=False)
    bad_input("--eval-sizes", "--eval-sizes 10 with 4-pixel patches", str(err.value))
    dynamic = vitzoo.create_model("vit_tiny_patch16_224", img_size=16, num_classes=10, dynamic_img_size=True,
                                  **TINY_SPEC)
    row = fit(dynamic, Subset(train, range(64)), val, config, progress=False).evals[-1]
    assert row["val_acc@16"] == row["val_acc"] and 0 <= row["val_acc@32"] <= 1 and "val_loss@8" in row
    # the same model through patch sequences packed two to a row: the same predictions, label for label
    packed = partial(eval_sequences, tokens=TokenBudget.of(72, (4, 36)), budget=16, patch_size=4,
                     interpolation="bicubic")
    assert next(iter(packed(val)))[0]["patch_image"].amax().item() == 1
    as_images, as_sequences = evaluate(dynamic, val), evaluate(dynamic, val, batches=packed)
    assert as_images["val_acc"] == as_sequences["val_acc"]
    assert as_images["val_loss"] == pytest.approx(as_sequences["val_loss"], rel=1e-5)


def test_ablate_takes_the_naflex_fields(tmp_path):
    """``vitzoo ablate --naflex --max-tokens --seq-lens --eval-sizes``: the fields are TrainConfig's, every
    variant trains on patch sequences and the tables get a column per size; a grid written before these
    fields existed still resumes."""
    for name in ("naflex", "max_tokens", "seq_lens", "eval_sizes"):
        assert AblationConfig.__dataclass_fields__[name].metadata == TrainConfig.__dataclass_fields__[name].metadata
    settings = dict(steps=2, naflex=True, max_tokens=128, seq_lens=(16, 64), eval_sizes=(16, 32),
                    overrides=dict(depth=1, embed_dim=32), progress=False)
    result = ablate("vit_pico_patch4_32", {"mlp": ["gelu"]}, tmp_path, **settings)
    with open(tmp_path / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["val_acc@32"] == row["val_acc"] and 0 <= float(row["val_acc@16"]) <= 1
    assert "at 16 px (%)" in (tmp_path / "summary.md").read_text() and len(result.executed) == 1
    path = tmp_path / "runs" / "mlp-gelu__seed0.json"
    run = json.loads(path.read_text())
    run["setup"] = {k: v for k, v in run["setup"].items() if k not in ("naflex", "max_tokens", "seq_lens",
                                                                       "eval_sizes")}
    path.write_text(json.dumps(run))
    again = ablate("vit_pico_patch4_32", {"mlp": ["gelu"]}, tmp_path, steps=2, overrides=dict(depth=1, embed_dim=32),
                   progress=False)
    assert again.executed == []
