"""Inputs that used to be silently misread are refused with a message naming the input and what it takes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vitzoo
from vitzoo.cli import main as cli_main
from vitzoo.size import estimate_params
from vitzoo.spec import ViTSpec, parse_assignment
from vitzoo.weights import WeightsError, read_state_dict

BASE = "vit_pico_patch4_32"


@pytest.mark.parametrize(
    "given,changes,message",
    [
        ('attn={"qk_norm": "no"}', dict(attn={"qk_norm": "no"}),
         r"ViTSpec.attn.qk_norm: expected true or false \(a bool\), got 'no' \(str\)"),
        ('img_size="48"', dict(img_size="48"), r"ViTSpec.img_size: expected a tuple .*got '48' \(str\)"),
        ("depth=True", dict(depth=True), r"ViTSpec.depth: expected an int, got True \(bool\)"),
        ("embed_dim=64.0", dict(embed_dim=64.0), r"ViTSpec.embed_dim: expected an int, got 64.0 \(float\)"),
        ('norm={"eps": -1}', dict(norm={"eps": -1}), r"ViTSpec.norm.eps: must be > 0, got -1"),
        ('block={"layer_scale": inf}', dict(block={"layer_scale": math.inf}),
         r"ViTSpec.block.layer_scale: expected a finite number or None"),
        ("mlp_ratio=nan", dict(mlp_ratio=math.nan), r"ViTSpec.mlp_ratio: expected a finite number, got nan"),
        ("mlp=None", dict(mlp=None), r"ViTSpec.mlp: expected a block name or one per layer .*got None"),
        ('attn={"name": "gqa", "kv_heads": "2"}', dict(attn={"name": "gqa", "kv_heads": "2"}),
         r"ViTSpec.attn.kv_heads: expected an int or None, got '2' \(str\)"),
        ("drop_path_rate=1.0 (timm's keyword)", dict(drop_path_rate=1.0), r"ViTSpec.drop.path: must be in \[0, 1\)"),
        ("num_classes=-1", dict(num_classes=-1), r"ViTSpec.num_classes: must be >= 0, got -1"),
    ],
)
def test_spec_fields_are_strictly_typed(bad_input, given, changes, message):
    with pytest.raises((TypeError, ValueError), match=message) as err:
        vitzoo.create_model(BASE, **changes)
    bad_input("create_model", given, str(err.value))


def test_documented_conversions_still_work():
    spec = ViTSpec(img_size=48, patch_size=16, mlp_ratio=4)
    assert spec.img_size == (48, 48) and spec.mlp_ratio == 4 and type(spec.mlp_ratio) is int
    assert ViTSpec.from_dict({"img_size": [32, 48], "patch_size": 16}).img_size == (32, 48)  # JSON lists
    assert ViTSpec(pool="gap", class_token=False).pool.name == "avg"  # a slot alias


@pytest.mark.parametrize(
    "text,expected",
    [
        ("attn.qk_norm=no", False), ("attn.qk_norm=off", False), ("attn.qk_norm=YES", True),
        ("attn.qk_norm=on", True), ("rope.temperature=none", None), ("pool=none", "none"), ("rope=none", "none"),
        ("final_norm=none", "none"), ("depth=yes", "yes"), ("mlp_ratio=4", 4), ("block.layer_scale=1e-5", 1e-5),
        ("img_size=48,64", (48, 64)), ("attn.kv_heads=2,4", (2, 4)), ("drop.path=0", 0),
        ("mlp=gelu,swiglu", ("gelu", "swiglu")), ("embed_dim=1.5", "1.5"),
    ],
)
def test_set_parses_bool_words_only_for_bool_fields(text, expected):
    value = parse_assignment(text)[1]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "text,message",
    [("attn.qk_norm=maybe", "ViTSpec.attn.qk_norm: expected true or false"),
     ("depth=yes", "ViTSpec.depth: expected an int"),
     ("img_size=4x8", "ViTSpec.img_size: expected a tuple"), ("depth=2.5", "ViTSpec.depth: expected an int")],
)
def test_set_refuses_what_does_not_fit(bad_input, text, message):
    with pytest.raises(ValueError, match=message) as err:
        vitzoo.model_spec(BASE, **dict([parse_assignment(text)]))
    bad_input("--set", text, str(err.value))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224", "deit_base_distilled_patch16_384",
                                  "vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224"])
def test_parameter_estimate_is_within_a_few_percent(name):
    spec = vitzoo.model_spec(name)
    with torch.device("meta"):
        real = sum(p.numel() for p in vitzoo.VisionTransformer(spec).parameters())
    assert estimate_params(spec) == pytest.approx(real, rel=0.03)


def test_absurd_sizes_are_refused_before_allocating(bad_input):
    with pytest.raises(ValueError, match=r"about 4.8e\+15 parameters \(embed_dim=10000000.*max_params=N") as err:
        vitzoo.create_model(BASE, embed_dim=10_000_000, num_heads=2)
    bad_input("create_model", f"{BASE}, embed_dim=10_000_000", str(err.value))
    with pytest.raises(ValueError, match="over the limit of 1e\\+06"):
        vitzoo.create_model(BASE, max_params=1_000_000, embed_dim=256)
    with torch.device("meta"):  # an explicit limit lets it through
        assert vitzoo.create_model(BASE, embed_dim=10_000_000, num_heads=2, max_params=None).embed_dim == 10_000_000
    biggest = max(vitzoo.list_models(), key=lambda n: estimate_params(vitzoo.model_spec(n)))
    with torch.device("meta"):
        vitzoo.create_model(biggest)


def test_absurd_size_in_a_config_file_is_refused(tmp_path, bad_input):
    vitzoo.save_pretrained(vitzoo.create_model(BASE), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["spec"]["embed_dim"] = 1e7
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"config.json: ViTSpec.embed_dim: expected an int, got 10000000.0") as err:
        vitzoo.create_model(str(tmp_path))
    bad_input("config.json", '"embed_dim": 1e7', str(err.value))


@pytest.mark.parametrize(
    "suffix,content,message",
    [(".pth", b"", "EOFError, the file is empty or cut short"), (".npz", b"", "is not a readable .npz file"),
     (".npz", b"garbage", "is not a readable .npz file")],
)
def test_unreadable_weight_files_are_named(tmp_path, bad_input, suffix, content, message):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)
    bad_input("weights file", f"{'empty' if not content else 'garbage'} {suffix}", str(err.value))


@pytest.mark.parametrize(
    "content,message",
    [("", "is not valid JSON"), ("{garbage", "is not valid JSON"), ('{"architecture": "x"}', 'holds no "spec"'),
     ("[1, 2]", 'holds no "spec"'), ('{"spec": {"depth": "4"}}', "ViTSpec.depth: expected an int, got '4'"),
     ('{"spec": {"depthh": 4}}', "ViTSpec has no field 'depthh'"),
     ('{"spec": {}, "pretrained_cfg": 3}', '"pretrained_cfg" must be an object')],
)
def test_broken_config_json_is_named(tmp_path, bad_input, content, message):
    vitzoo.save_pretrained(vitzoo.create_model(BASE), tmp_path)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(WeightsError, match=message) as err:
        vitzoo.create_model(str(tmp_path))
    assert str(tmp_path / "config.json") in str(err.value)
    bad_input("config.json", content or "(empty)", str(err.value))


def test_folder_with_overrides_builds_and_loads(tmp_path, caplog):
    model = vitzoo.create_model(BASE, num_classes=10)
    vitzoo.save_pretrained(model, tmp_path)
    five = vitzoo.create_model(str(tmp_path), num_classes=5)
    assert five.num_classes == 5 and torch.equal(five.pos_embed, model.pos_embed)
    swapped = vitzoo.create_model(tmp_path, mlp="swiglu")
    assert swapped.spec.mlp.name == "swiglu" and torch.equal(swapped.cls_token, model.cls_token)
    with pytest.raises(WeightsError, match="is not a save_pretrained folder"):
        vitzoo.create_model(str(tmp_path / "missing"), num_classes=5)


@pytest.mark.parametrize(
    "given,make,message",
    [("numpy array", lambda x: x.numpy(), "got a numpy.ndarray; convert it with torch.from_numpy"),
     ("uint8 tensor", lambda x: (x * 255).to(torch.uint8), "got torch.uint8; scale and normalize them first"),
     ("float64 tensor", lambda x: x.double(), r"weights are torch.float32, got torch.float64 images; .*x.to"),
     ("float16 tensor", lambda x: x.half(), r"weights are torch.float32, got torch.float16 images")],
)
def test_forward_refuses_wrong_input_types(bad_input, given, make, message):
    model = vitzoo.create_model(BASE).eval()
    with pytest.raises(TypeError, match=message) as err:
        model(make(torch.randn(1, 3, 32, 32)))
    bad_input("forward", given, str(err.value))


def test_forward_accepts_any_float_under_autocast():
    model = vitzoo.create_model(BASE).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
        assert model(torch.from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))).shape == (1, 1000)


@pytest.mark.parametrize(
    "argv,message",
    [(["validate", "vit_nonexistent_patch16_224"], "vitzoo: timm has no model 'vit_nonexistent_patch16_224'"),
     (["bench", "--device", "cuda:7", BASE], "vitzoo: --device cuda:7: this machine has"),
     (["bench", "--device", "gpu", BASE], "vitzoo: --device gpu: not a device name")],
)
def test_cli_bad_input_is_one_line_on_stderr(capsys, bad_input, argv, message):
    assert cli_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    bad_input("vitzoo " + argv[0], " ".join(argv[1:]), err)
