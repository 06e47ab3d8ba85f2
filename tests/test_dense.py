"""Dense features: the simple feature pyramid, the torchvision detection backbone and the linear segmenter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

import vitzoo
from vitzoo.blocks import BlockContractError, register_block, slot_table
from vitzoo.blocks.neck import SimplePyramid, SimplePyramidOptions

TINY = dict(depth=2, img_size=64)


@pytest.mark.parametrize("patch,strides", [(16, (4, 8, 16, 32)), (8, (2, 4, 8, 16)), (14, (3.5, 7, 14, 28))])
def test_pyramid_strides_and_channels(patch, strides):
    neck = SimplePyramid(32, patch, options=SimplePyramidOptions(out_channels=24))
    maps = neck(torch.randn(2, 32, 4, 6))
    assert neck.strides == strides and neck.out_channels == 24
    assert [tuple(m.shape) for m in maps] == [(2, 24, 16, 24), (2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3)]


@pytest.mark.parametrize("patch", [16, 8])
def test_backbone_levels_follow_the_patch_size(patch):
    backbone = vitzoo.detection_backbone("vit_tiny_patch16_224", out_channels=16, patch_size=patch, **TINY)
    maps = backbone(torch.randn(1, 3, 64, 80))  # 80 is padded to 96, a multiple of 2 * patch for patch 16
    width = 80 + -80 % (2 * patch)
    assert list(maps) == ["0", "1", "2", "3", "pool"] and backbone.size_divisible == 2 * patch
    assert backbone.strides == (patch / 4, patch / 2, patch, 2 * patch, 4 * patch)
    for stride, level in zip(backbone.strides[:4], maps.values(), strict=False):
        assert level.shape == (1, 16, int(64 // stride), int(width // stride))
    assert maps["pool"].shape[-2:] == tuple((n + 1) // 2 for n in maps["3"].shape[-2:])  # stride 2, kernel 1


def test_faster_rcnn_trains_every_backbone_parameter_and_detects():
    torch.manual_seed(0)
    backbone = vitzoo.detection_backbone("vit_tiny_patch16_224", out_channels=32, **TINY)
    detector = FasterRCNN(backbone, min_size=64, max_size=96, size_divisible=backbone.size_divisible,
                          box_head=TwoMLPHead(32 * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, 3),
                          rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 20.0, 20.0]]),
                "labels": torch.tensor([2, 1])}]
    losses = detector.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []
    with torch.no_grad():
        detections = detector.eval()(images)
    assert len(detections) == 2
    for found in detections:
        assert set(found) == {"boxes", "labels", "scores"}
        assert found["boxes"].shape == (len(found["labels"]), 4) and found["scores"].shape == found["labels"].shape


def test_backbone_drops_what_the_dense_path_never_runs():
    model = vitzoo.create_model("vit_tiny_patch16_224", depth=3, img_size=64, dynamic_img_size=True,
                                num_classes=5, pool="map", class_token=False)
    backbone = vitzoo.detection_backbone(model, out_channels=16, layer=1)
    assert backbone.trunk is model and len(model.blocks) == 2 and model.num_classes == 0
    assert (model.spec.depth, model.spec.pool.name) == (2, "none")  # the spec describes the pruned trunk
    sum(m.sum() for m in backbone(torch.randn(1, 3, 64, 64)).values()).backward()
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []


def test_backbone_refusals_say_what_to_do():
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        vitzoo.detection_backbone(vitzoo.create_model("vit_tiny_patch16_224", **TINY))
    with pytest.raises(TypeError, match="model name only"):
        vitzoo.detection_backbone(vitzoo.create_model("vit_tiny_patch16_224", dynamic_img_size=True, **TINY), depth=1)
    with pytest.raises(ValueError, match="must be taken from"):
        vitzoo.detection_backbone("vit_tiny_patch16_224", neck={"name": "simple_pyramid", "scales": [3]}, **TINY)
    with pytest.raises(ValueError, match="decreasing"):
        SimplePyramidOptions(scales=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown neck block 'simple_pyramd'"):
        vitzoo.detection_backbone("vit_tiny_patch16_224", neck="simple_pyramd", **TINY)


def test_a_registered_neck_is_checked_and_used():
    class OneLevel(nn.Module):
        """One 1x1 conv at the ViT's own stride."""

        def __init__(self, dim, patch_size, wrong=False):
            super().__init__()
            self.proj, self.out_channels, self.strides = nn.Conv2d(dim, 8, 1), 8, (patch_size * (2 if wrong else 1),)

        def forward(self, x):
            return [self.proj(x)]

    register_block("neck", "test_one_level", OneLevel)
    register_block("neck", "test_wrong_stride", lambda dim, patch: OneLevel(dim, patch, wrong=True))
    try:
        backbone = vitzoo.detection_backbone("vit_tiny_patch16_224", neck="test_one_level", **TINY)
        assert backbone.out_channels == 8 and list(backbone(torch.randn(1, 3, 32, 32))) == ["0", "pool"]
        with pytest.raises(BlockContractError, match="'neck' slot contract"):
            vitzoo.detection_backbone("vit_tiny_patch16_224", neck="test_wrong_stride", **TINY)
    finally:
        slot_table("neck").unregister("test_one_level")
        slot_table("neck").unregister("test_wrong_stride")


def test_linear_segmenter_learns_a_mask_of_the_image():
    torch.manual_seed(0)
    segmenter = vitzoo.LinearSegmenter("vit_tiny_patch16_224", num_classes=2, blocks=2, **TINY)
    cells = torch.randn(2, 3, 4, 5)  # one colour per patch; 72 columns leave a part patch, padded inside
    images = repeat(cells, "b c h w -> b c (h p) (w q)", p=16, q=16)[..., :64, :72]
    masks = (images[:, 0] > 0).long()
    optimizer = torch.optim.SGD(segmenter.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        logits = segmenter(images)
        loss = F.cross_entropy(logits, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.shape == (2, 2, 64, 72)
    assert [n for n, p in segmenter.named_parameters() if p.grad is None] == []
    assert losses[-1] < 0.4 * losses[0], losses
