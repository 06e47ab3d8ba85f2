"""Checkpoints of other ViT implementations, converted to timm's layout (vitzoo's own).

Supported: torchvision ``vit_*``; Hugging Face transformers ``ViT*``/``DeiT*``/``Dinov2*`` and the
CLIP/SigLIP image towers (the hub's on-disk layout and transformers 5's in-memory one); the original
JAX/Flax ``.npz`` files of the ViT and AugReg papers (big_vision layout); the OpenAI CLIP / OpenCLIP
image tower (OpenCLIP's own or a timm trunk); lucidrains' vit-pytorch ``ViT``; Meta's Sapiens2
release (the names timm's Sapiens2 loader maps); Segment Anything's ``sam_vit_*.pth`` (its image
encoder, as timm's SAM loader maps it); the Qwen3-VL / Qwen3.5 vision tower (``model.visual.*`` of the
transformers checkpoint), DeepSeek-V4's (``vision.*`` and ``aligner.*`` of its release) and Gemma 4's
(``model.vision_tower.*`` of the transformers checkpoint), each read by the registry names of that tower (the
language model beside it is dropped). The format is detected from the keys. Each converter renames tensors by
rules, fuses separate q/k/v projections into timm's packed ``qkv`` and moves JAX kernels to PyTorch's ``(out, in)``
order with einops; tensors with no vitzoo counterpart (HF's pooler, a JAX pre-logits layer, a text tower) are
dropped and reported.

A converted checkpoint fits a vitzoo model whose spec matches the source model: :func:`spec_hints`
gives the fields besides the sizes (prefix tokens, qkv bias, pooling without a class token, and the
norm epsilon no tensor shows: HF 1e-12 but DINOv2 1e-6, vit-pytorch 1e-5). What vitzoo cannot
express (vit-pytorch heads narrower than ``dim / heads``) is refused, never approximated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange

from vitzoo.weights.files import StateDict, WeightsError

Rules = tuple[tuple[str, str], ...]  # (regex on the source key, timm key template)
Hints = dict[str, object]  # ViTSpec fields or dotted option paths (``norm.eps``) and their values


@dataclass(frozen=True)
class Format:
    """One foreign layout: how to recognise it and how to rename its tensors."""

    name: str
    marker: str  # a regex that only this layout's keys match
    rules: Rules
    prepare: Callable[[StateDict], StateDict] = dict  # whole-dict steps before renaming (fusing, transposing)
    drop: str = r"$^"  # keys with no vitzoo counterpart
    hints: Callable[[StateDict], Hints] = lambda converted: {}  # what the source implies that no tensor shows
    tower: bool = False  # one fixed VLM tower, which its registry entry describes whole: the file implies nothing

    def convert(self, state_dict: StateDict) -> tuple[StateDict, list[str]]:
        out, dropped, unknown = {}, [], []
        for key, tensor in self.prepare(state_dict).items():
            if re.fullmatch(self.drop, key):
                dropped.append(key)
                continue
            for pattern, template in self.rules:
                match = re.fullmatch(pattern, key)
                if match:
                    out[match.expand(template)] = tensor
                    break
            else:
                unknown.append(key)
        if unknown:
            raise WeightsError(f"{len(unknown)} keys of this {self.name} checkpoint have no vitzoo counterpart: "
                               f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
        return {key: _batched(t) if key in TOKEN_TABLES else t for key, t in out.items()}, dropped


TOKEN_TABLES = ("cls_token", "dist_token", "reg_token", "pos_embed")  # timm keeps them as (1, n, dim)


def _batched(table: torch.Tensor) -> torch.Tensor:
    """A token or position table as timm stores it, ``(1, n, dim)``; sources keep ``(dim,)`` or ``(n, dim)``."""
    while table.ndim < 3:
        table = rearrange(table, "... -> 1 ...")
    return table


def _concat_parts(pattern: str, order: dict[str, int], fused: str) -> Callable[[StateDict], StateDict]:
    """Concatenate separately stored projections into one: ``pattern`` has groups prefix, part name, suffix;
    ``order`` gives each part's place, ``fused`` the name of the result."""

    def fuse(state_dict: StateDict) -> StateDict:
        out, parts = {}, {}
        for key, tensor in state_dict.items():
            match = re.fullmatch(pattern, key)
            if match and match.group(2) in order:
                parts.setdefault((match.group(1), match.group(3)), {})[order[match.group(2)]] = tensor
            else:
                out[key] = tensor
        for (prefix, suffix), tensors in parts.items():
            out[f"{prefix}{fused}{suffix}"] = torch.cat([tensors[place] for place in sorted(tensors)])
        return out

    return fuse


HF = r"(?:vit\.|deit\.|dinov2\.|dinov2_with_registers\.)?"  # the backbone's prefix in HF's task models
HF_LAYERS = HF + r"(?:encoder\.layer|layers)\."  # the encoder layers: the hub's names, transformers 5's
HF_LAYER = HF_LAYERS + r"(\d+)\."  # one encoder layer; group 1 is its index
_fuse_hf_qkv = _concat_parts(rf"({HF_LAYERS}\d+\.attention\.(?:attention\.)?)(\w+)(\.\w+)",
                             {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}, "qkv")
# transformers 5 keeps DINOv2's SwiGLU as gate_proj / up_proj; the hub file packs them (gate first) as weights_in
_pack_hf_swiglu = _concat_parts(rf"({HF_LAYERS}\d+\.mlp\.)(\w+)(\.\w+)", {"gate_proj": 0, "up_proj": 1}, "weights_in")


def _hf_layout(state_dict: StateDict) -> StateDict:
    """Fused qkv, and register tokens in timm's ``no_embed_class`` layout.

    DINOv2 with registers inserts its ``register_tokens`` after adding the positions, which cover [CLS]
    and the patches. ``DeiTForImageClassification`` and ``DeiTModel`` keep the distillation token but
    classify from [CLS] alone: the token is only attended to, which is what a register token is (vitzoo's
    ``dist_token`` would feed a second head and average the two, silently changing the logits). Either
    way the prefix tokens' positions are added to the tokens themselves and the table keeps the patches'
    (as timm converts DINOv2's own checkpoints), so every register model loads as ``no_embed_class``.
    """
    out = _pack_hf_swiglu(_fuse_hf_qkv(state_dict))

    def find(suffix: str) -> str | None:
        return next((k for k in out if k.endswith(suffix)), None)

    cls, dist = find("embeddings.cls_token"), find("embeddings.distillation_token")
    pos = find("embeddings.position_embeddings")
    registers, positioned = find("embeddings.register_tokens"), [cls]
    if dist and not any(k.startswith("distillation_classifier.") for k in out):
        registers, positioned = dist, [cls, dist]
    if registers:
        table = out[pos]
        for i, key in enumerate(positioned):
            out[key] = out[key] + table[:, i : i + 1]
        out[pos] = table[:, len(positioned) :]
        out["reg_token"] = out.pop(registers)
    return out


def _zero_bias(weight: torch.Tensor) -> torch.Tensor:
    """Zeros for a bias-free projection that becomes a linear head (timm's heads carry a bias)."""
    return weight.new_zeros(weight.shape[0])


V = r"(?:vision_model\.)?"  # the image tower's prefix in HF's CLIPModel / SiglipModel
_fuse_hf_tower_qkv = _concat_parts(rf"({V}encoder\.layers\.\d+\.self_attn\.)(\w+)(\.\w+)",
                                   {"q_proj": 0, "k_proj": 1, "v_proj": 2}, "qkv")


def _hf_tower_layout(state_dict: StateDict) -> StateDict:
    """HF CLIP / SigLIP image towers: fused qkv; CLIP's projection (a linear head without bias: a zero
    bias is added); SigLIP's attention-pooling head (``nn.MultiheadAttention`` packs q, k, v; timm's
    ``AttentionPoolLatent`` keeps q and kv)."""
    out = _fuse_hf_tower_qkv(state_dict)
    for key in list(out):
        tensor = out[key]
        if key.endswith("head.attention.in_proj_weight") or key.endswith("head.attention.in_proj_bias"):
            prefix, _, leaf = key.rpartition(".in_proj_")
            q, kv = out.pop(key).split([tensor.shape[0] // 3, 2 * tensor.shape[0] // 3])
            out[f"{prefix}.q.{leaf}"], out[f"{prefix}.kv.{leaf}"] = q, kv
        elif key == "visual_projection.weight":
            out["visual_projection.bias"] = _zero_bias(tensor)
    return out


def _openai_clip_layout(state_dict: StateDict) -> StateDict:
    """OpenAI CLIP / OpenCLIP image tower: the projection ``visual.proj`` ``(dim, embed)``, applied as
    ``x @ proj``, as a linear head ``(embed, dim)`` with a zero bias."""
    out = dict(state_dict)
    if "visual.proj" in out:
        out["visual.proj"] = rearrange(out["visual.proj"], "d e -> e d")
        out["visual.proj_bias"] = _zero_bias(out["visual.proj"])
    return out


def _open_clip_timm_layout(state_dict: StateDict) -> StateDict:
    """OpenCLIP with a timm image tower: the trunk is timm's model as it is; its linear projection
    ``visual.head.proj`` (no bias) becomes the head, with a zero bias."""
    out = dict(state_dict)
    if "visual.head.proj.weight" in out and "visual.head.proj.bias" not in out:
        out["visual.head.proj.bias"] = _zero_bias(out["visual.head.proj.weight"])
    return out


def _jax_layout(state_dict: StateDict) -> StateDict:
    """big_vision arrays to PyTorch's: kernels ``(in, out)`` -> ``(out, in)``, per-head q/k/v fused."""
    state_dict = {k.removeprefix("opt/target/"): v for k, v in state_dict.items()}
    out: StateDict = {}
    qkv: dict[str, dict[str, list]] = {}
    for key, x in state_dict.items():
        block, _, leaf = key.rpartition("/")
        if "MultiHeadDotProductAttention" in block and block.rsplit("/", 1)[-1] in ("query", "key", "value"):
            attn, part = block.rsplit("/", 1)
            flat = rearrange(x, "d h e -> (h e) d") if leaf == "kernel" else rearrange(x, "h e -> (h e)")
            qkv.setdefault(f"{attn}/qkv/{leaf}", {})[part] = flat
        elif key.endswith("out/kernel"):
            out[key] = rearrange(x, "h e d -> d (h e)")
        elif key == "embedding/kernel":  # a conv kernel: (p, p, c, d) -> (d, c, p, p)
            out[key] = rearrange(x, "p1 p2 c d -> d c p1 p2")
        elif leaf == "kernel":
            out[key] = rearrange(x, "i o -> o i")
        else:
            out[key] = x
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return {re.sub(r"/(kernel|scale)$", "/weight", k): v for k, v in out.items()}


def _vit_pytorch_layout(state_dict: StateDict) -> StateDict:
    """vit-pytorch's flat patch vectors ``(p1 p2 c)`` to timm's ``(c, p1, p2)`` kernel order; an empty
    class token (mean pooling) is dropped.

    Its attention is vitzoo's only when ``heads * dim_head == dim``; with one head of width ``dim`` it
    has no output projection, which is the identity projection here.
    """
    out = dict(state_dict)
    weight = out["to_patch_embedding.2.weight"]
    dim, n = weight.shape  # n = c * p * p; 3 * p^2 and q^2 never coincide, so the channel count is unambiguous
    chans = 3 if n % 3 == 0 and math.isqrt(n // 3) ** 2 == n // 3 else 1
    p = math.isqrt(n // chans)
    if chans * p * p != n:
        raise WeightsError(f"vit-pytorch patch vectors of {n} values are no square patch of 1 or 3 channels; "
                           "vitzoo converts vit-pytorch checkpoints of grayscale or RGB images")
    for key in [k for k in out if re.fullmatch(r"transformer\.layers\.\d+\.0\.to_qkv\.weight", k)]:
        if out[key].shape[0] != 3 * dim:
            raise WeightsError(
                f"this vit-pytorch ViT has heads * dim_head = {out[key].shape[0] // 3} but dim = {dim}; vitzoo's "
                "attention has head width embed_dim / num_heads, so it cannot express this model: train the "
                "vit-pytorch model with dim_head = dim // heads")
        proj = key.replace("to_qkv", "to_out.0")
        out.setdefault(proj, torch.eye(dim, dtype=weight.dtype))
        out.setdefault(proj.replace("weight", "bias"), torch.zeros(dim, dtype=weight.dtype))
    out["to_patch_embedding.2.weight"] = rearrange(weight, "d (p1 p2 c) -> d c p1 p2", p1=p, p2=p, c=chans)
    for key in ("to_patch_embedding.1.weight", "to_patch_embedding.1.bias"):
        out[key] = rearrange(out[key], "(p1 p2 c) -> (c p1 p2)", p1=p, p2=p, c=chans)
    cls = out.pop("cls_token")
    if cls.numel():
        out["cls_token"] = cls
    return out


QV = r"(?:vlm\.)?(?:model\.)?visual\."  # the vision tower's prefix in Qwen3-VL / Qwen3.5 (Qwen-Drive: vlm.)


def _qwen_vl_layout(state_dict: StateDict) -> StateDict:
    """The Conv3d patch embedding over 2 frames folded into timm's Conv2d: an image is fed as the same frame twice,
    so the 2-D kernel is the sum of the temporal slices (summed in float64, rounded once, as timm does)."""
    out = dict(state_dict)
    for key, tensor in state_dict.items():
        if re.fullmatch(rf"{QV}patch_embed\.proj\.weight", key) and tensor.ndim == 5:
            out[key] = tensor.double().sum(dim=2).to(tensor.dtype)
    return out


def _deepseek_layout(state_dict: StateDict) -> StateDict:
    """DeepSeek-V4 embeds patches with a linear layer over the flattened ``(c p1 p2)`` RGB patch: the numbers of
    timm's stride-p convolution kernel, reshaped."""
    out = dict(state_dict)
    weight = out.get(DEEPSEEK_PATCH)
    if weight is not None and weight.ndim == 2:
        p = math.isqrt(weight.shape[1] // 3)
        if 3 * p * p != weight.shape[1]:
            raise WeightsError(f"{DEEPSEEK_PATCH} of shape {tuple(weight.shape)} is no linear map of square RGB "
                               "patches; vitzoo converts the DeepSeek-V4 vision tower as released")
        out[DEEPSEEK_PATCH] = rearrange(weight, "d (c p1 p2) -> d c p1 p2", c=3, p1=p)
    return out


DEEPSEEK_PATCH = "vision.patch_embed.proj.weight"
GEMMA = r"(?:model\.)?(?:vision_tower|vision_model)\."  # Gemma 4's vision tower in Gemma4ForConditionalGeneration
GEMMA_LAYER = GEMMA + r"encoder\.layers\.(\d+)\."  # one encoder layer; group 1 is its index
GEMMA_NORMS = {"input": 1, "post_attention": 2, "pre_feedforward": 3, "post_feedforward": 4}  # timm's norm1..4


def _hf_hints(converted: StateDict) -> Hints:
    """HF ViT/DeiT normalise with epsilon 1e-12, DINOv2 (HF's one ViT with LayerScale) with 1e-6; register
    tokens come in the ``no_embed_class`` layout (see :func:`_hf_layout`)."""
    hints: Hints = {"norm.eps": 1e-6 if "blocks.0.ls1.gamma" in converted else 1e-12}
    return {**hints, "pos_embed.prefix": False} if "reg_token" in converted else hints


def _hf_tower_hints(converted: StateDict) -> Hints:
    """CLIP has a class token, a norm before the blocks and epsilon 1e-5; SigLIP neither of the first two,
    epsilon 1e-6 and GELU in its tanh approximation."""
    if "cls_token" in converted:
        return {"norm.eps": 1e-5, "pre_norm": True}
    return {"norm.eps": 1e-6, "mlp": "gelu_tanh"}


FORMATS: dict[str, Format] = {
    "torchvision": Format(
        "torchvision", r"encoder\.layers\.encoder_layer_\d+\..*",
        rules=(
            (r"class_token", "cls_token"),
            (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
            (r"encoder\.pos_embedding", "pos_embed"),
            (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(\w+)", r"blocks.\1.norm1.\2"),
            (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(\w+)", r"blocks.\1.norm2.\2"),
            (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(\w+)", r"blocks.\1.attn.qkv.\2"),
            (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(\w+)", r"blocks.\1.attn.proj.\2"),
            (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
            (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
            (r"encoder\.ln\.(\w+)", r"norm.\1"),
            (r"heads\.head\.(\w+)", r"head.\1"),
        ),
    ),
    "huggingface": Format(
        "Hugging Face ViT/DeiT/DINOv2", rf"{HF}(embeddings\.patch_embeddings|encoder\.layer\.\d+|layers\.\d+)\..*",
        prepare=_hf_layout,
        rules=(
            (rf"{HF}embeddings\.cls_token", "cls_token"),
            (rf"{HF}embeddings\.distillation_token", "dist_token"),
            (r"reg_token", "reg_token"),
            (rf"{HF}embeddings\.position_embeddings", "pos_embed"),
            (rf"{HF}embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
            (rf"{HF_LAYER}attention\.(?:attention\.)?qkv\.(\w+)", r"blocks.\1.attn.qkv.\2"),
            (rf"{HF_LAYER}attention\.(?:output\.dense|o_proj)\.(\w+)", r"blocks.\1.attn.proj.\2"),
            (rf"{HF_LAYER}(?:intermediate\.dense|mlp\.fc1|mlp\.weights_in)\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
            (rf"{HF_LAYER}(?:output\.dense|mlp\.fc2|mlp\.weights_out|mlp\.down_proj)\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
            (rf"{HF_LAYER}(?:layernorm_before|norm1)\.(\w+)", r"blocks.\1.norm1.\2"),
            (rf"{HF_LAYER}(?:layernorm_after|norm2)\.(\w+)", r"blocks.\1.norm2.\2"),
            (rf"{HF_LAYER}layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),  # DINOv2
            (rf"{HF}layernorm\.(\w+)", r"norm.\1"),
            (r"(?:classifier|cls_classifier)\.(\w+)", r"head.\1"),
            (r"distillation_classifier\.(\w+)", r"head_dist.\1"),
        ),
        drop=rf"{HF}(pooler\..*|embeddings\.mask_token)",
        hints=_hf_hints,
    ),
    "huggingface_tower": Format(
        "Hugging Face CLIP/SigLIP vision tower", rf"{V}encoder\.layers\.\d+\.self_attn\..*",
        prepare=_hf_tower_layout,
        rules=(
            (rf"{V}embeddings\.class_embedding", "cls_token"),
            (rf"{V}embeddings\.patch_embedding\.(\w+)", r"patch_embed.proj.\1"),
            (rf"{V}embeddings\.position_embedding\.weight", "pos_embed"),
            (rf"{V}pre_layrnorm\.(\w+)", r"norm_pre.\1"),
            (rf"{V}encoder\.layers\.(\d+)\.self_attn\.qkv\.(\w+)", r"blocks.\1.attn.qkv.\2"),
            (rf"{V}encoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)", r"blocks.\1.attn.proj.\2"),
            (rf"{V}encoder\.layers\.(\d+)\.layer_norm([12])\.(\w+)", r"blocks.\1.norm\2.\3"),
            (rf"{V}encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"blocks.\1.mlp.\2.\3"),
            (rf"{V}post_layernorm\.(\w+)", r"norm.\1"),
            (rf"{V}head\.probe", "attn_pool.latent"),
            (rf"{V}head\.attention\.(q|kv)\.(\w+)", r"attn_pool.\1.\2"),
            (rf"{V}head\.attention\.out_proj\.(\w+)", r"attn_pool.proj.\1"),
            (rf"{V}head\.layernorm\.(\w+)", r"attn_pool.norm.\1"),
            (rf"{V}head\.mlp\.(fc[12])\.(\w+)", r"attn_pool.mlp.\1.\2"),
            (r"visual_projection\.(\w+)", r"head.\1"),
        ),
        drop=rf"text_model\..*|text_projection\..*|logit_scale|logit_bias|{V}embeddings\.position_ids",
        hints=_hf_tower_hints,
    ),
    "openai_clip": Format(
        "OpenAI CLIP / OpenCLIP", r"visual\.transformer\.resblocks\.\d+\..*",
        prepare=_openai_clip_layout,
        rules=(
            (r"visual\.class_embedding", "cls_token"),
            (r"visual\.positional_embedding", "pos_embed"),
            (r"visual\.conv1\.weight", "patch_embed.proj.weight"),
            (r"visual\.ln_pre\.(\w+)", r"norm_pre.\1"),
            (r"visual\.transformer\.resblocks\.(\d+)\.ln_([12])\.(\w+)", r"blocks.\1.norm\2.\3"),
            (r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
            (r"visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.(\w+)", r"blocks.\1.attn.proj.\2"),
            (r"visual\.transformer\.resblocks\.(\d+)\.ls_([12])\.gamma", r"blocks.\1.ls\2.gamma"),
            (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
            (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
            (r"visual\.ln_post\.(\w+)", r"norm.\1"),
            (r"visual\.proj", "head.weight"),
            (r"visual\.proj_bias", "head.bias"),
        ),
        drop=r"(?!visual\.).*",  # the text tower, logit scale and anything else outside the image tower
        hints=lambda converted: {"norm.eps": 1e-5, "pre_norm": True},
    ),
    "open_clip_timm": Format(
        "OpenCLIP with a timm image tower", r"visual\.trunk\.(blocks\.\d+|patch_embed)\..*",
        prepare=_open_clip_timm_layout,
        rules=((r"visual\.head\.proj\.(weight|bias)", r"head.\1"), (r"visual\.trunk\.(.+)", r"\1")),
        drop=r"(?!visual\.).*",  # the text tower, logit scale and anything else outside the image tower
    ),
    "big_vision": Format(
        "JAX/Flax big_vision .npz", r"(opt/target/)?Transformer/encoderblock_\d+/.*",
        prepare=_jax_layout,
        rules=(
            (r"cls", "cls_token"),
            (r"embedding/(weight|bias)", r"patch_embed.proj.\1"),
            (r"Transformer/posembed_input/pos_embedding", "pos_embed"),
            (r"Transformer/encoderblock_(\d+)/LayerNorm_0/(weight|bias)", r"blocks.\1.norm1.\2"),
            (r"Transformer/encoderblock_(\d+)/LayerNorm_2/(weight|bias)", r"blocks.\1.norm2.\2"),
            (r"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_1/qkv/(weight|bias)",
             r"blocks.\1.attn.qkv.\2"),
            (r"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_1/out/(weight|bias)",
             r"blocks.\1.attn.proj.\2"),
            (r"Transformer/encoderblock_(\d+)/MlpBlock_3/Dense_0/(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
            (r"Transformer/encoderblock_(\d+)/MlpBlock_3/Dense_1/(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
            (r"Transformer/encoder_norm/(weight|bias)", r"norm.\1"),
            (r"head/(weight|bias)", r"head.\1"),
        ),
        drop=r"pre_logits/.*",
    ),
    "vit_pytorch": Format(
        "lucidrains vit-pytorch ViT", r"transformer\.layers\.\d+\.\d+\..*",
        prepare=_vit_pytorch_layout,
        rules=(
            (r"cls_token", "cls_token"),
            (r"pos_embedding", "pos_embed"),
            (r"to_patch_embedding\.1\.(\w+)", r"patch_embed.norm_in.\1"),
            (r"to_patch_embedding\.2\.(\w+)", r"patch_embed.proj.\1"),
            (r"to_patch_embedding\.3\.(\w+)", r"patch_embed.norm.\1"),
            (r"transformer\.layers\.(\d+)\.0\.norm\.(\w+)", r"blocks.\1.norm1.\2"),
            (r"transformer\.layers\.(\d+)\.0\.to_qkv\.(\w+)", r"blocks.\1.attn.qkv.\2"),
            (r"transformer\.layers\.(\d+)\.0\.to_out\.0\.(\w+)", r"blocks.\1.attn.proj.\2"),
            (r"transformer\.layers\.(\d+)\.1\.net\.0\.(\w+)", r"blocks.\1.norm2.\2"),
            (r"transformer\.layers\.(\d+)\.1\.net\.1\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
            (r"transformer\.layers\.(\d+)\.1\.net\.4\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
            (r"transformer\.norm\.(\w+)", r"norm.\1"),
            (r"mlp_head\.(\w+)", r"head.\1"),
        ),
        hints=lambda converted: {"norm.eps": 1e-5, "patch_embed": "linear_prenorm"},
    ),
    "qwen_vl": Format(
        "Qwen3-VL / Qwen3.5 vision tower (Hugging Face)", rf"{QV}blocks\.\d+\.mlp\.linear_fc[12]\..*",
        prepare=_qwen_vl_layout,
        rules=(
            (rf"{QV}patch_embed\.proj\.(\w+)", r"patch_embed.proj.\1"),
            (rf"{QV}pos_embed\.weight", "pos_embed"),
            (rf"{QV}blocks\.(\d+)\.(norm[12]|attn\.qkv|attn\.proj)\.(\w+)", r"blocks.\1.\2.\3"),
            (rf"{QV}blocks\.(\d+)\.mlp\.linear_fc([12])\.(\w+)", r"blocks.\1.mlp.fc\2.\3"),
            (rf"{QV}merger\.norm\.(\w+)", r"merger.norm.\1"),
            (rf"{QV}merger\.linear_fc([12])\.(\w+)", r"merger.fc\1.\2"),
        ),
        # the language model, the DeepStack projectors of mid-block tokens, the cached RoPE table
        drop=rf"(?!{QV}).*|{QV}(deepstack_merger_list\..*|rotary_pos_emb\..*)",
        tower=True,
    ),
    "deepseek_v4": Format(  # the names timm's deepseek_vit.checkpoint_filter_fn_encoder maps
        "DeepSeek-V4 vision tower", r"vision\.blocks\.\d+\.(attn\.w(qkv|o)|mlp\.w[12])\..*",
        prepare=_deepseek_layout,
        rules=(
            (r"vision\.blocks\.(\d+)\.attn\.wqkv\.(\w+)", r"blocks.\1.attn.qkv.\2"),
            (r"vision\.blocks\.(\d+)\.attn\.wo\.(\w+)", r"blocks.\1.attn.proj.\2"),
            (r"vision\.blocks\.(\d+)\.mlp\.w([12])\.(\w+)", r"blocks.\1.mlp.fc\2.\3"),
            (r"vision\.(patch_embed\.proj\.\w+|blocks\.\d+\.norm[12]\.\w+|norm\.\w+)", r"\1"),
            (r"aligner\.w([12])\.(\w+)", r"aligner.fc\1.\2"),
        ),
        drop=r"(?!vision\.|aligner\.).*",  # the language model, its image start/end/newline embeddings included
        tower=True,
    ),
    "gemma4": Format(  # the names timm's gemma4_vit.checkpoint_filter_fn_encoder maps
        "Gemma 4 vision tower (Hugging Face)",
        rf"{GEMMA_LAYER}(self_attn\.([qkvo]_proj\.linear|[qk]_norm)|mlp\.(gate|up|down)_proj\.linear"
        rf"|({'|'.join(GEMMA_NORMS)})_layernorm)\..*",
        rules=(
            (rf"{GEMMA}patch_embedder\.(.+)", r"patch_embed.\1"),
            *((rf"{GEMMA_LAYER}{name}_layernorm\.(\w+)", rf"blocks.\1.norm{i}.\2") for name, i in GEMMA_NORMS.items()),
            (rf"{GEMMA_LAYER}self_attn\.(.+)", r"blocks.\1.attn.\2"),
            (rf"{GEMMA_LAYER}mlp\.(.+)", r"blocks.\1.mlp.\2"),
            (rf"{GEMMA}(std_bias|std_scale)", r"\1"),
        ),
        # the language model, the audio tower, the projector into the language model, rotary tables
        drop=rf"(?!{GEMMA}).*|{GEMMA}.*rotary_emb\..*",
        tower=True,
    ),
    "sapiens2": Format(
        "Meta Sapiens2",
        r"blocks\.\d+\.(attn\.(w[qkv]|gamma)|ffn|ln[12])\..*|storage_tokens|patch_embed\.projection\..*",
        rules=(
            (r"cls_token", "cls_token"),
            (r"storage_tokens", "reg_token"),
            (r"patch_embed\.projection\.(\w+)", r"patch_embed.proj.\1"),
            (r"blocks\.(\d+)\.attn\.w([qkv])\.(\w+)", r"blocks.\1.attn.\2_proj.\3"),
            (r"blocks\.(\d+)\.attn\.gamma\.weight", r"blocks.\1.gamma_1"),  # LayerScale, attention branch only
            (r"blocks\.(\d+)\.attn\.(proj|q_norm|k_norm)\.(\w+)", r"blocks.\1.attn.\2.\3"),
            (r"blocks\.(\d+)\.ffn\.w12\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
            (r"blocks\.(\d+)\.ffn\.w3\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
            (r"blocks\.(\d+)\.ln([12])\.(\w+)", r"blocks.\1.norm\2.\3"),
            (r"ln1\.(\w+)", r"norm.\1"),
            (r"head\.(\w+)", r"head.\1"),
        ),
        drop=r"mask_token|rope\..*",  # pretraining only; RoPE tables are recomputed
    ),
    "sam": Format(  # the names timm's vision_transformer_sam.checkpoint_filter_fn maps
        "Segment Anything (sam_vit_*.pth)", r"image_encoder\.(blocks\.\d+|patch_embed)\..*",
        rules=(
            (r"image_encoder\.blocks\.(\d+)\.mlp\.lin([12])\.(\w+)", r"blocks.\1.mlp.fc\2.\3"),
            (r"image_encoder\.(.+)", r"\1"),
        ),
        drop=r"(?!image_encoder\.).*",  # the prompt encoder and the mask decoder
        hints=lambda converted: {"final_norm": "none", "norm.eps": 1e-5},  # no norm after the blocks: the neck
    ),
}


def spec_hints(name: str, converted: StateDict) -> Hints:
    """Spec fields a converted checkpoint implies besides the sizes: its prefix tokens, qkv and patch biases
    (read from the tensors) and what its source implies that no tensor shows (the format's ``hints``:
    norm epsilon, activation...).

    Without a class token a foreign source pools by attention when it has an attention-pooling head
    (SigLIP's, ``pool="map"``), else by the mean of the normed patch tokens (vit-pytorch's
    ``pool="mean"``, big_vision's ``gap``): ``pool="avg"`` with the norm before pooling. A VLM tower's file
    implies nothing: the registry entry that reads it describes the whole model.
    """
    if name != "timm" and FORMATS[name].tower:
        return {}
    hints: Hints = {
        "dist_token": "dist_token" in converted, "patch_embed.bias": "patch_embed.proj.bias" in converted,
        "attn.qkv_bias": any(f"blocks.0.attn.{b}" in converted for b in ("qkv.bias", "q_proj.bias", "q_bias")),
        "reg_tokens": converted["reg_token"].shape[1] if "reg_token" in converted else 0,
    }
    if name != "timm":
        if "cls_token" not in converted:
            hints.update(class_token=False, pool="map" if "attn_pool.latent" in converted else "avg",
                         final_norm="tokens")
        hints.update(FORMATS[name].hints(converted))  # what the source says wins over the guess above
    return hints


TIMM_MARKER = r"(encoder\.)?(blocks\.\d+\.|patch_embed\.).*"  # encoder.: timm's classifiers around VLM towers


def _hits(rules: Rules, keys: list[str]) -> int:
    return sum(any(re.fullmatch(pattern, k) for pattern, _ in rules) for k in keys)


def detect_format(state_dict: StateDict) -> str:
    """``"timm"`` or a key of :data:`FORMATS`, judged by which layout's keys the checkpoint holds."""
    keys = list(state_dict)
    foreign = "|".join(f"(?:{f.marker})" for f in FORMATS.values())  # a key a foreign layout claims is not timm's
    counts = {"timm": sum(bool(re.fullmatch(TIMM_MARKER, k)) and not re.fullmatch(foreign, k) for k in keys)}
    counts.update({name: sum(bool(re.fullmatch(f.marker, k)) for k in keys) for name, f in FORMATS.items()})
    best = max(counts, key=counts.get)
    if counts[best]:
        return best
    closest = max(FORMATS.values(), key=lambda f: _hits(f.rules, keys))
    unmatched = [k for k in keys if not any(re.fullmatch(pattern, k) for pattern, _ in closest.rules)]
    raise WeightsError(
        f"unknown checkpoint layout: its keys look like neither timm (blocks.N.*, patch_embed.*) nor "
        f"{', '.join(f.name for f in FORMATS.values())}. Closest known layout: {closest.name} "
        f"({_hits(closest.rules, keys)} of {len(keys)} keys match); keys that match none of its names: "
        f"{', '.join(unmatched[:8])}{' ...' if len(unmatched) > 8 else ''}"
    )


def to_timm_layout(state_dict: StateDict) -> tuple[StateDict, str, list[str]]:
    """(the checkpoint in timm's layout, the format it came in, keys dropped for lack of a counterpart)."""
    name = detect_format(state_dict)
    if name == "timm":
        return dict(state_dict), name, []
    converted, dropped = FORMATS[name].convert(state_dict)
    return converted, name, dropped
