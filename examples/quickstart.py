"""vitzoo in one screen: list models, build one by name, read its card, and check it against timm.

Run with `make demo`. Nothing is downloaded: timm's model is built with random weights and its
state_dict is loaded into vitzoo's model unchanged, which is how vitzoo proves every architecture.
"""

import timm
import torch

import vitzoo
from vitzoo.card import format_card, model_card

name = "vit_small_patch16_224"

print(f"{len(vitzoo.list_models())} models; ViT-S ones: {vitzoo.list_models('vit_small_*')}\n")
print(format_card(model_card(name)), "\n")

torch.manual_seed(0)
reference = timm.create_model(name, pretrained=False).eval()
model = vitzoo.create_model(name).eval()
model.load_state_dict(reference.state_dict(), strict=True)  # timm's layout is vitzoo's layout

images = torch.randn(4, *model.pretrained_cfg["input_size"])
with torch.no_grad():
    ours, theirs = model(images), reference(images)
print(f"logits {tuple(ours.shape)}; max |vitzoo - timm| = {(ours - theirs).abs().max():.2e}")

ablation = vitzoo.create_model(name, num_classes=10, mlp="swiglu", norm="rmsnorm", pool="avg", depth=6)
print(f"ablation variant: {sum(p.numel() for p in ablation.parameters()) / 1e6:.1f}M params, "
      f"output {tuple(ablation(images).shape)}")
