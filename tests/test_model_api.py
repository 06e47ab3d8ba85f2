"""timm's model API on vitzoo models: heads, checkpointing, input checks, compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vitzoo
from vitzoo.cli import main as cli_main


def tiny(**overrides) -> vitzoo.VisionTransformer:
    torch.manual_seed(0)
    return vitzoo.create_model("vit_tiny_patch16_224", img_size=64, depth=2, **overrides)


def test_reset_classifier_changes_head_and_spec():
    model = tiny()
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3) and model.spec.num_classes == 3
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 192)
    model.reset_classifier(4, "map")
    assert model.spec.pool.name == "map" and model.spec.final_norm == "tokens"
    assert "attn_pool.latent" in model.state_dict()
    rebuilt = vitzoo.VisionTransformer(model.spec)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    pool = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("attn_pool.")}
    model.reset_classifier(7)  # a new head only: the attention pool (pretrained, say) keeps its weights, as in timm
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pool.items()) and model.head.out_features == 7


def test_distilled_reset_classifier_resets_both_heads():
    model = vitzoo.create_model("deit_tiny_distilled_patch16_224", depth=1)
    model.reset_classifier(10)
    assert model.head.out_features == model.head_dist.out_features == 10


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny(drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_no_weight_decay_names_tokens_and_positions():
    assert tiny().no_weight_decay() == {"pos_embed", "cls_token"}
    reg = vitzoo.create_model("vit_small_patch14_reg4_dinov2", depth=1)
    assert reg.no_weight_decay() == {"pos_embed", "cls_token", "reg_token"}


def test_wrong_image_size_says_what_to_do():
    model = tiny()
    with pytest.raises(ValueError, match=r"expects 64x64 images, got 96x96.*dynamic_img_size=True"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, 64, 64))
    dynamic = tiny(dynamic_img_size=True)
    assert dynamic(torch.randn(1, 3, 96, 48)).shape == (1, 1000)
    with pytest.raises(ValueError, match="not a multiple of patch_size=16"):
        dynamic(torch.randn(1, 3, 100, 48))


def test_pretrained_cfg_carries_preprocessing():
    cfg = vitzoo.create_model("deit_base_distilled_patch16_384", depth=1).pretrained_cfg
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["interpolation"] == "bicubic"
    assert cfg["hf_hub_id"] == "timm/deit_base_distilled_patch16_384.fb_in1k"


@pytest.mark.slow
def test_torch_compile_runs_and_matches_eager():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    torch._dynamo.reset()
    assert torch._dynamo.explain(model.train())(x).graph_break_count == 0  # the training forward too


def test_cli_list_and_info(capsys):
    assert cli_main(["list", "deit3_*"]) == 0
    assert "deit3_small_patch16_224" in capsys.readouterr().out
    assert cli_main(["info", "vit_small_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "params          22.05 M" in out and "GMACs           4.60" in out
    assert cli_main(["info", "vit_smal_patch16_224"]) == 2
    assert "closest: vit_small_patch16_224" in capsys.readouterr().err


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "vitzoo.cli", "list", "vit_huge_*"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("vit_huge_patch14_224")


def test_command_runs_as_a_module_and_stops_quietly_when_its_reader_does():
    listed = subprocess.run([sys.executable, "-m", "vitzoo", "list", "vit_huge_*"], capture_output=True, text=True,
                            check=True)
    assert listed.stdout.startswith("vit_huge_patch14_224")
    piped = subprocess.run(f"{sys.executable} -m vitzoo list | head -n 1", shell=True, capture_output=True, text=True)
    assert piped.stdout.count("\n") == 1 and piped.stderr == ""
