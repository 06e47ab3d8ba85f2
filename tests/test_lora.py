"""LoRA and DoRA: what trains, the start equal to the base, merging, the adapters file, fine-tuning runs, peft."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitzoo
from tests.conftest import killed_copy
from vitzoo.lora import (
    LoraLinear,
    LoraOptions,
    apply_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    parse_lora,
    read_lora_options,
    save_lora,
    trainable_parameters,
)
from vitzoo.train import TrainConfig
from vitzoo.train.checkpoint import latest_checkpoint
from vitzoo.train.finetune import FinetuneConfig, _config_from_args, add_arguments, finetune
from vitzoo.train.finetune import main as finetune_main
from vitzoo.train.teacher import load_teacher
from vitzoo.weights import WeightsError, read_state_dict

PICO = dict(depth=2, num_classes=5)  # vit_pico_patch4_32: width 64, 4 heads, MLP 256, 32 px


def _model(**changes) -> vitzoo.VisionTransformer:
    torch.manual_seed(0)
    return vitzoo.create_model("vit_pico_patch4_32", **{**PICO, **changes})


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_only_the_adapters_and_the_head_train():
    """r=4 on q and v of the fused qkv, proj and the MLP, with DoRA: each pair is r x in + out x r, each DoRA
    magnitude one per adapted row, plus the whole head; nothing else has requires_grad."""
    r, d, hidden, classes, depth = 4, 64, 256, 5, 2
    model = apply_lora(_model(), LoraOptions(r=r, dora=True, targets=("attn.q", "attn.v", "attn.proj", "mlp")))
    pairs = {"q": (d, d), "v": (d, d), "proj": (d, d), "fc1": (d, hidden), "fc2": (hidden, d)}  # (in, out)
    per_block = sum(r * i + o * r + o for i, o in pairs.values())
    assert trainable_parameters(model) == (depth * per_block + d * classes + classes,
                                           sum(p.numel() for p in model.parameters()))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(lora_state_dict(model))
    assert all(".lora_" in n or n.startswith("head.") for n in trained) and {"head.weight", "head.bias"} <= trained
    assert model.blocks[0].attn.qkv.lora_A.shape == (2, r, d)  # q and v, one pair each; k left alone
    frozen_head = apply_lora(_model(), LoraOptions(targets=("mlp",), train_head=False))
    adapted_head = apply_lora(_model(), LoraOptions(targets=("mlp", "head")))
    assert not any(n.startswith("head.") for n in lora_state_dict(frozen_head))
    assert {n for n in lora_state_dict(adapted_head) if n.startswith("head.")} == {"head.lora_A", "head.lora_B"}


CASES = {  # options, spec changes, the parts of the fused qkv that move
    "lora q": (LoraOptions(targets=("attn.q",)), {}, "q"),
    "dora k": (LoraOptions(targets=("attn.k",), dora=True), {}, "k"),
    "dora everything, dropout, q/v-bias attention": (
        LoraOptions(r=2, alpha=3, dropout=0.2, dora=True, targets=("attn.qkv", "attn.proj", "mlp", "head")),
        {"attn": {"name": "eva"}}, "qkv"),
    "lora, gated MLP": (LoraOptions(targets=("attn.v", "mlp")), {"mlp": "swiglu"}, "v"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_starts_as_the_base_and_merges_after_training(case):
    """Equal to the base model at the start (lora_B is zero, DoRA's magnitude is the weight's norm); after a few
    AdamW steps (dropout on) the merged model, a plain one in timm's layout, gives the adapted model's outputs
    and intermediates; only the adapted parts of a fused qkv moved."""
    options, changes, moving = CASES[case]
    model, x = _model(**changes).eval(), _images()
    base, base_weights = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, options)
    assert torch.equal(model(x), base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        F.cross_entropy(model(x), torch.arange(4) % 5).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    adapted, (_, adapted_blocks) = model(x), model.forward_intermediates(x)
    assert (adapted - base).abs().max() > 1e-3
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(model.get_parameter(name), base_weights[name]) for name in frozen)
    merged = merged_state_dict(model)
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert list(merged) == list(model.state_dict()) == list(base_weights)
    plain = _model(**changes).eval()
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    for a, b in zip(plain.forward_intermediates(x)[1], adapted_blocks, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    parts = zip(merged["blocks.0.attn.qkv.weight"].chunk(3), base_weights["blocks.0.attn.qkv.weight"].chunk(3),
                strict=True)
    assert [not torch.equal(after, before) for after, before in parts] == [letter in moving for letter in "qkv"]


def test_compiles_without_graph_breaks():
    """No Python branch on tensor values: a fused linear with two of three parts adapted, DoRA and dropout, traces
    as one graph."""
    layer = LoraLinear(torch.nn.Linear(8, 24), 3, (0, 2), LoraOptions(r=2, dora=True, dropout=0.1)).eval()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))


def test_adapters_file_round_trip(tmp_path):
    """The trained tensors and the options, in one small file, restore the adapted model on a fresh base."""
    options = LoraOptions(r=2, dora=True, targets=("attn.qkv", "mlp"))
    model, x = apply_lora(_model(), options).eval(), _images()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    path = save_lora(model, tmp_path / "adapters.safetensors", options)
    assert read_lora_options(path) == options
    assert path.stat().st_size < 0.3 * sum(v.numel() * 4 for v in model.state_dict().values())
    restored = load_lora(_model(), path).eval()
    assert torch.equal(restored(x), model(x))
    with pytest.raises(WeightsError, match="does not fit this model: .*lora_A"):
        load_lora(_model(embed_dim=32, num_heads=2), path)
    vitzoo.save_pretrained(_model(), tmp_path / "plain")
    with pytest.raises(WeightsError, match="holds no LoRA options"):
        load_lora(_model(), tmp_path / "plain" / "model.safetensors")
    with pytest.raises(ValueError, match="has LoRA adapters already; merge_lora"):
        apply_lora(model, options)


def test_bad_specs_say_what_is_wrong(bad_input, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for given, options in ((["--lora"], LoraOptions()), (["--lora", "r=4,targets=attn.v,head"],
                                                          LoraOptions(r=4, targets=("attn.v", "head")))):
        assert _config_from_args(parser.parse_args(["vit_pico_patch4_32", *given])).lora == options
    assert parse_lora("r=4, alpha=8,targets=attn.q,attn.v,mlp,dora=true,dropout=0.1") == LoraOptions(
        r=4, alpha=8, dropout=0.1, dora=True, targets=("attn.q", "attn.v", "mlp"))
    refused = {
        "targets=attn.qkv,ffn": "LoRA targets: 'ffn'; valid: attn.qkv, attn.q, attn.k, attn.v, attn.proj, mlp, head",
        "rank=8": "'rank' is unknown; the options are r, alpha, dropout, dora, targets, train_head",
        "r=8,16": "'16' is not NAME=VALUE",
        "r=0": "LoraOptions.r: must be >= 1, got 0",
        "r=4,r=8": "'r' is given twice",
        "dora=maybe": "LoraOptions.dora: expected true or false",
        "targets=head,train_head=true": "head is among targets .* and train_head=true",
    }
    for spec, expected in refused.items():
        with pytest.raises(SystemExit):
            finetune_main(["vit_pico_patch4_32", "--lora", spec])
        message = capsys.readouterr().err.strip().splitlines()[-1]
        bad_input("vitzoo finetune", f"--lora {spec}", message)
        assert "argument --lora: " in message
        assert re.search(expected, message), message
    assert finetune_main(["vit_pico_patch4_32", "--lora", "--freeze"]) == 2
    assert "--freeze trains the head alone and --lora trains adapters" in capsys.readouterr().err
    gmlp = _model(attn="none", block="gmlp", mlp="spatial_gating")
    with pytest.raises(ValueError, match="targets attn.qkv match no linear layer of this model; its linears are "
                                         "blocks.N.mlp_channels.fc1, blocks.N.mlp_channels.fc2, head"):
        apply_lora(gmlp, LoraOptions())


RUN = dict(model="vit_pico_patch4_32", img_size=16, overrides=dict(depth=1), eval_every=2, checkpoint_every=2,
           lora=LoraOptions(r=4, dora=True, dropout=0.1, targets=("attn.q", "attn.v", "mlp")),
           train=TrainConfig(steps=4, batch_size=16, warmup_steps=1, lr=1e-2))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    finetune(FinetuneConfig(**RUN, out=str(out)), progress=False)
    return out


def _plain(**changes) -> vitzoo.VisionTransformer:
    return vitzoo.create_model("vit_pico_patch4_32", img_size=16, depth=1, num_classes=10, **changes).eval()


def test_finetune_writes_adapters_and_merged_weights(lora_run):
    """The adapters file holds the trained tensors alone; merged/ loads strictly into the plain registry model (and
    is a save_pretrained folder) and computes what the adapted model of the last checkpoint computes."""
    summary = (lora_run / "summary.json").read_text()
    # q, v: 2 x (4x64 + 64x4 + 64); fc1: 4x64 + 256x4 + 256; fc2: 4x256 + 64x4 + 64; head: 64x10 + 10
    assert '"trainable_params": 4682' in summary
    adapters = read_state_dict(lora_run / "adapters.safetensors")
    assert all(".lora_" in k or k.startswith("head.") for k in adapters) and "head.weight" in adapters
    merged = read_state_dict(lora_run / "merged" / "model.safetensors")
    plain = _plain()
    plain.load_state_dict(merged, strict=True)
    adapted = apply_lora(_plain(), RUN["lora"]).eval()
    adapted.load_state_dict(read_state_dict(latest_checkpoint(lora_run / "checkpoints") / "model.safetensors"))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(plain(x), adapted(x), atol=1e-5, rtol=0)
    assert torch.equal(vitzoo.create_model(str(lora_run / "merged")).eval()(x), plain(x))



def test_a_checkpoint_of_the_run_loads_as_the_adapted_model(lora_run, tmp_path):
    """pretrained=<checkpoint folder> of a --lora run, also one before the end (no merged/ yet), loads the adapted
    model, its adapters folded in, and so does --teacher; the same file away from its trainer.pt is refused, and
    the run folder itself names what to load."""
    x = torch.randn(4, 3, 16, 16)
    checkpoints = lora_run / "checkpoints"

    def loaded(step: int) -> vitzoo.VisionTransformer:
        return _plain(pretrained=str(checkpoints / f"step_{step:08d}"))

    torch.testing.assert_close(loaded(4)(x), vitzoo.create_model(str(lora_run / "merged")).eval()(x), atol=1e-6, rtol=0)
    adapted = apply_lora(_plain(), RUN["lora"]).eval()
    adapted.load_state_dict(read_state_dict(checkpoints / "step_00000002" / "model.safetensors"))
    torch.testing.assert_close(loaded(2)(x), adapted(x), atol=1e-5, rtol=0)
    teacher = load_teacher(str(checkpoints / "step_00000002")).eval()
    torch.testing.assert_close(teacher(x), adapted(x), atol=1e-5, rtol=0)
    alone = tmp_path / "model.safetensors"
    alone.write_bytes((checkpoints / "step_00000002" / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="holds LoRA adapters .* no trainer.pt beside it .* merged/ folder"):
        _plain(pretrained=str(alone))
    with pytest.raises(WeightsError, match=r"training run's folder: load .*step_\d+ \(the best by validation\).* or "
                                           r".*merged \(the adapters folded in at the end\)"):
        _plain(pretrained=str(lora_run))


def test_killed_run_resumes_bit_identical_and_refuses_another_lora(lora_run, tmp_path):
    """Resumed from its step-2 checkpoint (dropout on the adapters' inputs), the run ends with the same weights,
    adapters, merged weights and metrics; another --lora is refused, naming the change."""
    run = killed_copy(lora_run, tmp_path / "run", 2, outputs=("adapters.safetensors", "merged"))
    resume = FinetuneConfig(**{**RUN, "lora": replace(RUN["lora"], r=8)}, out=str(run), resume=True)
    with pytest.raises(ValueError, match="other settings: lora .*'r': 4.* → .*'r': 8"):
        finetune(resume, progress=False)
    finetune(replace(resume, lora=RUN["lora"]), progress=False)
    for name in ("adapters.safetensors", "merged/model.safetensors", "checkpoints/step_00000004/model.safetensors"):
        resumed, straight = read_state_dict(run / name), read_state_dict(lora_run / name)
        assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight), name
    assert read_lora_options(run / "adapters.safetensors") == RUN["lora"]
    assert (run / "metrics.jsonl").read_bytes() == (lora_run / "metrics.jsonl").read_bytes()


def test_peft_on_vitzoo_names():
    """peft's LoraConfig on vitzoo's linear names: only the adapters (and the head kept trainable) get gradients,
    merge_and_unload gives a plain vitzoo model; and on the same A, B (and DoRA magnitude) peft's layers and
    vitzoo's compute the same outputs."""
    import peft  # a dev dependency; imported here, as the other tests do not need it
    x, names = _images(), r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    wrapped = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=names,
                                                            modules_to_save=["head"]))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        F.cross_entropy(wrapped(x), torch.arange(4)).backward()
        graded = {n for n, p in wrapped.named_parameters() if p.grad is not None}
        assert graded and all("lora_" in n or "modules_to_save" in n for n in graded)
        optimizer.step()
        optimizer.zero_grad()
    wrapped.eval()
    adapted, plain = wrapped(x), wrapped.merge_and_unload()
    assert type(plain) is vitzoo.VisionTransformer
    fresh = _model().eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), adapted, atol=1e-5, rtol=0)

    for dora in (False, True):
        ours = apply_lora(_model(), LoraOptions(r=4, alpha=8, dora=dora, targets=("attn.proj", "mlp"))).eval()
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=[
            "attn.proj", "fc1", "fc2"]), _model()).eval()
        with torch.no_grad():
            for name, layer in ours.named_modules():
                if isinstance(layer, LoraLinear):
                    layer.lora_B.normal_()
                    other = theirs.get_submodule(name)
                    other.lora_A["default"].weight.copy_(layer.lora_A[0])
                    other.lora_B["default"].weight.copy_(layer.lora_B[0])
                    if dora:
                        layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
                        other.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
