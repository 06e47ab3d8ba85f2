"""NaFlex against a fixed-size model on digits of mixed sizes, compared at three evaluation sizes.

    python examples/naflex_digits.py                      # vit_pico_patch4_32, 1000 steps each, offline
    python examples/naflex_digits.py --steps 2000 --model vit_tiny_patch4_32

scikit-learn's 8x8 digits are written once as an ImageFolder of PNGs, each upscaled to a side drawn from
``--sizes``. Two runs train the same model from scratch for the same number of steps with the same number of
patch tokens per step (``--max-tokens``):

- NaFlex (``--naflex``): each step draws a patch budget, resizes its images to it and packs them into rows;
- fixed: every image resized (random crop) to the model's 32 x 32, ``max_tokens / 64`` images per step, the
  model built with ``dynamic_img_size=True`` so it can be evaluated at other sizes.

Both are then evaluated at each of ``--eval-sizes`` (square images; the NaFlex model through patch sequences of
(size / 4)^2 patches) and a Markdown table of the accuracies is printed. Run folders land in ``--out``; a
second run moves the previous ones aside (``<out>/<run>.old-<time>``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from vitzoo.train import TrainConfig
from vitzoo.train.finetune import FinetuneConfig, finetune


def write_mixed_digits(root: Path, sizes: list[int], seed: int = 0) -> Path:
    """The 1,797 digits as ``root/<label>/<n>.png``, each upscaled (bicubic) to a square side drawn from
    ``sizes``; kept when already written with these sizes."""
    marker = root / "sizes.txt"
    if marker.is_file() and marker.read_text() == f"{sizes} {seed}":
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    sides = np.random.default_rng(seed).choice(sizes, len(digits.images))
    for n, (image, label, side) in enumerate(zip(digits.images, digits.target, sides, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8))
        pixels = pixels.resize((int(side), int(side)), Image.Resampling.BICUBIC).convert("RGB")
        pixels.save(root / str(label) / f"{n}.png")
    marker.write_text(f"{sizes} {seed}")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_pico_patch4_32", help="a 32 x 32 model with 4-pixel patches")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=4096, help="patch tokens per step, both runs")
    parser.add_argument("--seq-lens", default="16,36,64,100,144", help="NaFlex patch budgets (8 to 48 px)")
    parser.add_argument("--sizes", default="12,16,24,32,40,48,56", help="sides of the digits written")
    parser.add_argument("--eval-sizes", default="16,32,48")
    parser.add_argument("--out", default="runs/naflex_digits")
    args = parser.parse_args()

    out = Path(args.out)
    data = write_mixed_digits(out / "data", [int(s) for s in args.sizes.split(",")])
    eval_sizes = tuple(int(s) for s in args.eval_sizes.split(","))
    recipe = TrainConfig(steps=args.steps, lr=2e-3, warmup_steps=args.steps // 10, label_smoothing=0.1,
                         eval_sizes=eval_sizes)
    runs = {
        "NaFlex": FinetuneConfig(
            model=args.model, data=str(data), out=str(out / "naflex"), overwrite=True, eval_every=args.steps,
            train=replace(recipe, naflex=True, max_tokens=args.max_tokens,
                          seq_lens=tuple(int(s) for s in args.seq_lens.split(",")))),
        "fixed 32 px": FinetuneConfig(
            model=args.model, data=str(data), out=str(out / "fixed"), overwrite=True, eval_every=args.steps,
            overrides={"dynamic_img_size": True},
            train=replace(recipe, batch_size=args.max_tokens // 64)),
    }
    summaries = {name: finetune(config) for name, config in runs.items()}

    print(f"\n{args.model}, {args.steps} steps of {args.max_tokens} patch tokens, digits of sides {args.sizes} px\n")
    print("| run | " + " | ".join(f"val acc at {s} px" for s in eval_sizes) + " | train minutes |")
    print("|---|" + "---:|" * (len(eval_sizes) + 1))
    for name, summary in summaries.items():
        accuracies = " | ".join(f"{100 * summary[f'val_acc@{s}']:.1f}%" for s in eval_sizes)
        print(f"| {name} | {accuracies} | {summary['train_minutes']} |")


if __name__ == "__main__":
    main()
