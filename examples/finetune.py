"""Fine-tune a vitzoo model: a script to copy and edit.

    python examples/finetune.py                                  # digits at 16 px, offline, ~2 min on CPU
    python examples/finetune.py --data path/to/imagefolder --model vit_small_patch16_224 --pretrained
    python examples/finetune.py --data torchvision:CIFAR10 --download --epochs 3

Every piece is a library call you can replace: the model by name with spec overrides, datasets with
the model's preprocessing, the AdamW recipe (no decay on norms/biases/tokens, layer-wise decay,
warmup + cosine), and the resumable loop. ``vitzoo finetune`` exposes the same with more options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import vitzoo
from vitzoo.card import format_card, model_card
from vitzoo.train import TrainConfig, build_datasets, fit
from vitzoo.train.data import num_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--data", default="digits", help="digits | ImageFolder path | torchvision:NAME")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--pretrained", nargs="?", const=True, default=False, help="hub weights, or a file/folder")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--out", default="runs/example")
    args = parser.parse_args()

    # 1. The data, preprocessed the way the model expects (size, mean/std, crop, interpolation); training images
    # as uint8 crops, which fit normalises on its device (a quarter of the bytes through the loader).
    cfg = vitzoo.create_model(args.model, img_size=args.img_size, patch_size=4).pretrained_cfg
    train_data, val_data = build_datasets(args.data, cfg, download=args.download, train_pixels=True)

    # 2. The model by name: new head for the data's classes, new size, any block swapped by name.
    model = vitzoo.create_model(
        args.model, pretrained=args.pretrained, num_classes=num_classes(train_data), img_size=args.img_size,
        patch_size=4,  # 4x4-pixel patches: small images want small patches
        drop={"path": 0.1},
    )
    print(format_card(model_card(args.model, img_size=args.img_size, patch_size=4)))

    # 3. The recipe (TrainConfig's defaults, but for the values given here) and the loop; checkpoints land in
    # --out/checkpoints and --resume-style restarts work.
    steps = int(args.epochs * len(train_data) // TrainConfig.batch_size)
    config = TrainConfig(steps=steps, lr=2e-3, warmup_steps=steps // 10, label_smoothing=0.1,
                         eval_every=max(1, steps // 5), checkpoint_every=max(1, steps // 5))
    result = fit(model, train_data, val_data, config, run_dir=Path(args.out),
                 on_eval=lambda row: print(f"step {row['step']}: val acc {row['val_acc']:.3f}"))
    print(f"final: {result.final}")


if __name__ == "__main__":
    main()
