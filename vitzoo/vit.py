"""The one model class: a Vision Transformer assembled from a :class:`~vitzoo.spec.ViTSpec`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitzoo.blocks.attention import ATTENTIONS
from vitzoo.blocks.attn_bias import ATTN_BIASES
from vitzoo.blocks.encoder import ENCODER_BLOCKS
from vitzoo.blocks.feature_map import FEATURE_MAPS
from vitzoo.blocks.join import JOINS
from vitzoo.blocks.mlp import MLPS
from vitzoo.blocks.norm import NORMS, NormFactory
from vitzoo.blocks.patch import PATCH_EMBEDS, HybridPatchEmbed
from vitzoo.blocks.pooling import POOLS, global_pool_change
from vitzoo.blocks.position import POSITIONS
from vitzoo.blocks.rope import ROPES, Rotation
from vitzoo.blocks.table import BlockTable
from vitzoo.blocks.tokens import (
    PREFIX_TOKENS,
    drop_patch_tokens,
    keep_patch_tokens,
    make_prefix_tokens,
    prepend_tokens,
)
from vitzoo.inputs import block_indices, checked_images
from vitzoo.packing import is_sequence
from vitzoo.sequence import SequenceLayout, checked_sequence
from vitzoo.size import MAX_PARAMS, check_size
from vitzoo.spec import ViTSpec
from vitzoo.subset import subset_problem
from vitzoo.traced import trace_at_input_size

# timm's preprocessing defaults for ViTs, and the keys of its pretrained_cfg that no registry entry sets
DEFAULT_CFG = {
    "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "crop_mode": "center",
    "interpolation": "bicubic", "pool_size": None, "license": "apache-2.0",
}
# torch.fx symbolic tracing keeps these as calls in the graph: the input check, einops and the token dropout
# need real tensors and shapes
torch.fx.wrap("checked_images")
torch.fx.wrap("rearrange")
torch.fx.wrap("repeat")
torch.fx.wrap("drop_patch_tokens")
# the state_dict names of timm's NaFlexVit (``patch_embed={"embeds": True}``): what the model holds itself -> under
# ``embeds.`` (exact names, or prefixes)
EMBEDS_NAMES = ("cls_token", "dist_token", "reg_token", "pos_embed")
EMBEDS_PREFIXES = ("patch_embed.", "position.")


def embeds_name(key: str) -> str:
    """A state_dict key as timm's NaFlexVit names it (unchanged if it is not an embedding's)."""
    if key in EMBEDS_NAMES:
        return f"embeds.{key}"
    for prefix in EMBEDS_PREFIXES:
        if key.startswith(prefix):
            return "embeds." + key.removeprefix(prefix)
    return key


def _pool_stored_as(spec: ViTSpec) -> str:
    """What the state_dict calls the readout: ``attn_pool``, or the entry's own name (a VLM projector's ``merger``)."""
    return getattr(POOLS.get(spec.pool.name), "state_name", "attn_pool")


def _position_stored_as(spec: ViTSpec) -> str:
    """What the state_dict calls the position entry's own parameters: ``position``, or the entry's ``state_name``
    (XCiT's Fourier encoding is timm's ``pos_embed.token_projection``)."""
    return getattr(POSITIONS.get(spec.pos_embed.name), "state_name", "position")


def stored_name(key: str, spec: ViTSpec) -> str:
    """A state_dict key as the model with ``spec`` stores it: timm's NaFlexVit layout with ``patch_embed.embeds``, the
    patch embedding under ``patch_embed.stored_as`` (``stem.proj.weight``), the position entry's and the readout's
    parameters under their entries' names (``pos_embed.``, ``merger.``), all but the head under the readout's
    ``checkpoint_prefix`` (``encoder.``); else unchanged."""
    if spec.get("patch_embed.embeds"):
        key = embeds_name(key)
    elif key.startswith("patch_embed."):
        key = (spec.get("patch_embed.stored_as") or "patch_embed") + key.removeprefix("patch_embed")
    elif key.startswith("position."):
        key = _position_stored_as(spec) + key.removeprefix("position")
    if key.startswith("attn_pool."):  # a readout named "" keeps its state at the model's top level (Gemma 4)
        key = ".".join(filter(None, (_pool_stored_as(spec), key.removeprefix("attn_pool."))))
    prefix = spec.get("pool.checkpoint_prefix")
    return prefix + key if prefix and not key.startswith(("head.", "head_dist.")) else key


@torch.fx.wrap
def grid_dependent(block: nn.Module, *args: Any) -> Any:
    """``block(*args)`` for a block whose output depends on the patch grid (position table, rotary angles).

    Under ``torch.fx`` symbolic tracing the grid is symbols of the input's shape, so the block's own Python
    (a resampling, a cached table for one grid) cannot run; this call stays one opaque graph node instead.
    """
    return block(*args)


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021) built from named blocks.

    The state_dict uses timm's names and shapes, so timm checkpoints load with ``strict=True``.
    The API mirrors timm's: ``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``reset_classifier``, ``set_grad_checkpointing``, ``no_weight_decay``, ``pretrained_cfg``.
    """

    def __init__(
        self, spec: ViTSpec, pretrained_cfg: dict[str, Any] | None = None, max_params: int | None = MAX_PARAMS,
    ) -> None:
        """``max_params``: refuse a spec estimated above this many parameters before allocating (None: any)."""
        check_size(spec, max_params)
        super().__init__()
        self.spec = spec
        dim, depth = spec.embed_dim, spec.depth
        norm = self._norm_factory()
        self.patch_embed = self._build(PATCH_EMBEDS, "patch_embed", 0, spec.patch_size, spec.in_chans, dim, norm)
        for name, param in make_prefix_tokens(dim, spec.class_token, spec.dist_token, spec.reg_tokens).items():
            setattr(self, name, param)
        self._join_at = spec.join_at  # the prefix tokens join before this block (0: with the patch tokens)
        self.position = self._build(POSITIONS, "pos_embed", 0, spec.grid_size, dim,
                                    spec.num_prefix_tokens if self._join_at == 0 else 0)
        self.pos_embed = self.position.init_table()
        with torch.no_grad():  # which of the position contract's layouts this entry gives, fixed here once
            pos = self.position(self.pos_embed, spec.grid_size)
        self._pos_with_prefix = None if pos is None else pos.shape[1] > spec.grid_size[0] * spec.grid_size[1]
        self.pos_drop = nn.Dropout(spec.drop.pos)
        self.rope = self._build(ROPES, "rope", 0, dim // spec.num_heads, spec.grid_size, spec.num_prefix_tokens,
                                spec.num_heads, depth)
        self.shared_rel_pos = self._build(ATTN_BIASES, "attn_bias", 0, spec.grid_size, spec.num_prefix_tokens,
                                          spec.num_heads)
        self.norm_pre = norm(dim) if spec.pre_norm else nn.Identity()
        drop_path = [spec.drop.path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(self._make_block(i, norm, drop_path[i]) for i in range(depth)))
        join = self._build(JOINS, "prefix_join", 0, dim, spec.num_heads, spec.mlp_ratio, norm, self._mlp_factory(),
                           spec.num_prefix_tokens)
        self._join_name = join.stored_as  # e.g. CaiT's class-attention blocks, under timm's blocks_token_only
        self.add_module(self._join_name, join)
        self.norm = norm(dim) if spec.final_norm_at == "tokens" else nn.Identity()
        self._maps = spec.features.name != "tokens"  # forward_features gives a map (b, channels, h, w)
        self.neck = self._build(FEATURE_MAPS, "features", 0, dim) if self._maps else nn.Identity()
        self.attn_pool = self._make_pool()
        self.fc_norm = norm(self.head_hidden_size) if spec.final_norm_at == "pooled" else nn.Identity()
        self.head_drop = nn.Dropout(spec.drop.head)
        self._make_heads()
        self.grad_checkpointing = False
        self.distilled_training = False
        cfg = {**DEFAULT_CFG, **(pretrained_cfg or {}), **self._derived_cfg(pretrained_cfg or {})}
        self.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # timm's types
        self._init_linear(self)
        if any(self._stored_name(key) != key for key in self.state_dict()):  # stored under timm's other names
            self.register_state_dict_post_hook(_save_stored_names)
            self.register_load_state_dict_pre_hook(_load_stored_names)

    # construction -------------------------------------------------------------------------------
    def _build(self, table: BlockTable, slot: str, layer: int, *args: Any) -> nn.Module:
        """Build the entry ``slot`` names at ``layer`` with the slot's arguments and the spec's options for it."""
        name, options = self.spec.layer(slot, layer)
        return table.build(name, *args, options=None if options is None else options.for_model(self.spec))

    def _norm_factory(self) -> NormFactory:
        name, options = self.spec.layer("norm")
        return partial(NORMS.build, name, options=options)

    def _make_block(self, i: int, norm: NormFactory, drop_path: float) -> nn.Module:
        spec, dim = self.spec, self.spec.embed_dim
        attn = self._build(ATTENTIONS, "attn", i, dim, spec.num_heads, norm, spec.drop.attn, spec.drop.proj, i)
        mlp = self._build(MLPS, "mlp", i, dim, int(dim * spec.mlp_ratio), norm, spec.drop.proj)
        return self._build(ENCODER_BLOCKS, "block", i, dim, attn, mlp, norm, drop_path)

    def _mlp_factory(self) -> Callable[[int, int], nn.Module]:
        """``mlp(dim, hidden)``: the last block's kind of MLP, bias on, for the blocks outside the encoder."""
        norm, mlp_name = self._norm_factory(), self.spec.layer("mlp", self.spec.depth - 1)[0]

        def mlp(dim: int, hidden: int) -> nn.Module:
            return MLPS.build(mlp_name, dim, hidden, norm, 0.0)

        return mlp

    def _make_pool(self) -> nn.Module:
        spec = self.spec
        return self._build(POOLS, "pool", 0, self._pooled_width(), spec.num_heads, spec.mlp_ratio,
                           self._norm_factory(), self._mlp_factory(), 0 if self._maps else spec.num_prefix_tokens)

    def _pooled_width(self) -> int:
        """Width of what the pooling reads: the token width, or the channels of the feature map (a map holds the
        patch tokens only)."""
        return self.neck.out_channels if self._maps else self.spec.embed_dim

    def _make_heads(self) -> None:
        """``head`` (and DeiT's ``head_dist``): a linear classifier, or Identity when num_classes=0; after a feature
        map, timm's ``ClassifierHead`` layout (``head.fc``)."""
        dim, num_classes = self.head_hidden_size, self.spec.num_classes
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        if self._maps and num_classes:
            self.head = nn.Sequential(OrderedDict(fc=self.head))
        if self.spec.dist_token:
            self.head_dist = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        else:
            self.head_dist = None

    def _derived_cfg(self, given: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``pretrained_cfg`` that follow from the spec and the built modules, as timm names them.
        ``fixed_input_size`` is True for a fixed-size model, and where the registry says so as timm does (DINOv3,
        InternViT: timm tests them at their own size only, though they take any)."""
        spec = self.spec
        first_conv = next(name for name, m in self.patch_embed.named_modules() if isinstance(m, nn.Conv2d | nn.Linear))
        return {
            "input_size": (spec.in_chans, *spec.img_size), "num_classes": spec.num_classes,
            "fixed_input_size": not spec.dynamic_img_size or bool(given.get("fixed_input_size")),
            "first_conv": self._stored_name(f"patch_embed.{first_conv}"),
            "classifier": ("head", "head_dist") if spec.dist_token else "head.fc" if self._maps else "head",
        }

    def _stored_name(self, key: str) -> str:
        """What the state_dict calls the parameter or module the model holds as ``key``."""
        return stored_name(key, self.spec)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        """timm's default init for linear layers: truncated normal (std 0.02), zero bias; then the blocks that
        start otherwise (ConViT's GPSA as a convolution, gMLP's gate at weight ~0 and bias 1) run their
        ``init_block_weights``."""
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in module.modules():
            if hasattr(m, "init_block_weights"):  # a name of vitzoo blocks only (timm CNNs have init_weights)
                m.init_block_weights()

    # timm-compatible attributes -----------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def head_hidden_size(self) -> int:
        """Width of what the head reads: the pooled width (:meth:`_pooled_width`), or a projecting readout's output
        width (the VLM towers' mergers)."""
        return getattr(self.attn_pool, "out_dim", self._pooled_width())

    @property
    def num_features(self) -> int:
        """Channels of what :meth:`forward_features` returns (timm's meaning): the head's width, but the patch
        tokens' where a VLM encoder tower returns its grid and projects it only in the readout."""
        grid_out = getattr(self.attn_pool, "output_fmt", None) == "NHWC"
        return self._pooled_width() if grid_out else self.head_hidden_size

    @property
    def output_fmt(self) -> str:
        """``NHWC`` where :meth:`forward_features` gives the patch grid ``(b, h, w, dim)`` (the Qwen3-VL and
        DeepSeek-V4 towers, as timm's). Token outputs declare none, as timm's ViTs (timm's VLM towers declare
        ``NLC`` for theirs, which its own test of default configs then refuses)."""
        fmt = getattr(self.attn_pool, "output_fmt", None)
        if fmt is None:
            raise AttributeError("output_fmt: this model's forward_features gives tokens (b, prefix + h*w, dim), or "
                                 "(b, channels, h, w) for a feature map, and declares no format, as timm's ViTs")
        return fmt

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for :attr:`pretrained_cfg` (the same dict)."""
        return self.pretrained_cfg

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """What each block's output is as a feature map: its module, channels and stride in pixels (timm's)."""
        return [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=self.spec.patch_size)
                for i in range(len(self.blocks))]

    @property
    def num_prefix_tokens(self) -> int:
        return self.spec.num_prefix_tokens

    @property
    def dynamic_img_size(self) -> bool:
        return self.spec.dynamic_img_size

    @property
    def global_pool(self) -> str:
        """timm's name of the pooling: the pool entry's (``''`` for none), or where timm's class names it otherwise,
        that name (the VLM towers' ``'avg'`` / ``''``, ``'merge'``, ``'align'``, ``'soft'``)."""
        named = getattr(self.attn_pool, "timm_global_pool", None)
        if named is not None:
            return named
        return "" if self.spec.pool.name == "none" else self.spec.pool.name

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay should skip: the position table and prefix tokens."""
        return {name for name in ("pos_embed", *PREFIX_TOKENS) if getattr(self, name, None) is not None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """DeiT: in training, return (class logits, distillation logits) instead of their mean."""
        self.distilled_training = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for ``num_classes`` (0 removes it); optionally another pooling by name (timm's ``''``: none).

        As in timm, the pooling keeps its weights (an attention pool's, a projector's) unless another one replaces
        it, and ``pretrained_cfg`` keeps describing the weights the model was built with. On the classifiers of
        the VLM towers ``global_pool`` is timm's there, an option of their readout: ``'avg'`` (the mean of the
        tokens, normed) or ``''`` (each token normed), the projector staying.
        """
        pool = None if global_pool is None else global_pool_change(*self.spec.layer("pool"), global_pool)
        self._replace_head(num_classes, pool)

    def _replace_head(self, num_classes: int, pool: str | dict[str, Any] | None) -> None:
        """A new head; with ``pool`` another pooling entry (a name, or a table with its name: built and initialised
        afresh) or other options of the current one (a table without name: its weights carry over)."""
        ref = next(self.parameters())
        changes: dict[str, Any] = {"num_classes": num_classes}
        carry = isinstance(pool, dict) and "name" not in pool  # other options of the current entry
        if carry:
            changes["pool"] = pool
        elif pool is not None and pool != self.spec.pool.name:
            changes.update(pool=pool, final_norm=self.spec.final_norm_at)  # the final norm stays where it is
        self.spec = self.spec.replace(**changes)
        fresh = []
        if "pool" in changes:
            current = self.attn_pool if carry else None
            kept = None if current is None else current.state_dict(keep_vars=True)
            self.attn_pool = self._make_pool()
            if kept is None:
                fresh.append(self.attn_pool)
            else:  # the parameters themselves move over (on any device, meta too; an optimizer's hold stays valid)
                self.attn_pool.load_state_dict(kept, assign=True)
                self.attn_pool.train(self.training)
        self._make_heads()
        for module in (self.head, self.head_dist, *fresh):
            if module is not None:
                self._init_linear(module)
                module.to(device=ref.device, dtype=ref.dtype).train(self.training)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        """Drop what :meth:`forward_intermediates` of ``indices`` does not need: the blocks after the last one
        asked for, the final norm (``prune_norm``), pooling and head (``prune_head``). The spec follows, so a
        pruned model saves and rebuilds as what it is. Returns the block indices, counted from the start."""
        take = block_indices(len(self.blocks), indices)
        depth = max(take) + 1
        changes: dict[str, Any] = {}
        if depth < len(self.blocks):  # prefix tokens due to join after the last block kept join after it
            self.blocks = self.blocks[:depth]
            changes.update(self.spec.first_layers(depth))
            self._join_at = min(self._join_at, depth)
        if prune_norm and self.spec.final_norm_at == "tokens":
            self.norm = nn.Identity()
            changes["final_norm"] = "none"
        narrowed = prune_norm and self._maps and self._pooled_width() != self.embed_dim
        if prune_norm and self._maps:  # as timm's SAM: the neck goes, the map stays
            self.neck = FEATURE_MAPS.build("map", self.embed_dim)
            changes["features"] = "map"
        if changes:
            self.spec = self.spec.replace(**changes)
        if prune_head or narrowed:  # a head sized for the neck's channels cannot read the blocks' width
            # DeiT's pooling reads its two tokens; the VLM towers' readouts say what they become (as timm's towers)
            self._replace_head(0, None if self.spec.dist_token else getattr(self.attn_pool, "pruned_pool", "none"))
            if not isinstance(self.fc_norm, nn.Identity):
                self.fc_norm = nn.Identity()
                self.spec = self.spec.replace(final_norm="none")
        return take

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(model)`` compiles: this model traced at its ``img_size`` in eval mode
        (:func:`vitzoo.traced.trace_at_input_size`), as einops blocks are outside TorchScript. The script
        module takes images of that size only (any size where ``pretrained_cfg["fixed_input_size"]`` is False: the
        trace then records the resizing); for other sizes use ``torch.onnx.export`` or ``torch.export``."""
        return trace_at_input_size(self)

    # forward ------------------------------------------------------------------------------------
    def _embed(
        self, images: torch.Tensor, keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> token sequence (prefix tokens first) with positions added; also the grid. ``keep`` ``(b, k)``:
        only these patch tokens of each image stay, chosen after their positions were added (prefix tokens kept).

        Which branch runs was decided when the model was built, never by a tensor's shape, so ``torch.fx`` can
        trace it.
        """
        spec, p = self.spec, self.spec.patch_size
        images = checked_images(images, next(self.parameters()), spec.in_chans, p,
                                None if spec.dynamic_img_size else spec.img_size,
                                spec.crop_remainder or getattr(self.patch_embed, "pad", False))
        if spec.crop_remainder:  # timm's patch convolution ignores the pixels past the last whole patch
            images = images[..., : images.shape[-2] // p * p, : images.shape[-1] // p * p]
        patches = self.patch_embed(images)  # (b, h, w, d): a patch embedding that pads gives the larger grid
        grid = (patches.shape[1], patches.shape[2])
        x = rearrange(patches, "b h w d -> b (h w) d")
        tokens = self._prefix_tokens() if self._join_at == 0 else []
        if self._pos_with_prefix is None:
            x = prepend_tokens(x, tokens)
        elif self._pos_with_prefix:
            x = prepend_tokens(x, tokens) + grid_dependent(self.position, self.pos_embed, grid)
        else:  # a table of the patch tokens only (timm's no_embed_class)
            x = prepend_tokens(x + grid_dependent(self.position, self.pos_embed, grid), tokens)
        x = self.pos_drop(x)
        if keep is not None:
            x = keep_patch_tokens(x, self.num_prefix_tokens if tokens else 0, keep)
        elif self.training and self.spec.drop.patch > 0:
            x = drop_patch_tokens(x, self.num_prefix_tokens if tokens else 0, self.spec.drop.patch)
        return self.norm_pre(x), grid

    def _prefix_tokens(self) -> list[nn.Parameter]:
        """The class, distillation and register tokens this model has, in their order in front of the patches."""
        return [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]

    def _joined(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``x`` as block ``i`` takes it (``i = len(blocks)``: as the final norm does): the prefix tokens join
        here if the ``prefix_join`` entry puts them before this block (before block 0, :meth:`_embed` did)."""
        tokens = self._prefix_tokens()
        if i != self._join_at or i == 0 or not tokens:
            return x
        prefix = torch.cat([repeat(t, "1 k d -> b k d", b=x.shape[0]) for t in tokens], dim=1)
        return getattr(self, self._join_name)(x, prefix.to(x.dtype))

    def _rotation(self, grid: tuple[int, int]) -> Rotation | None:
        """The rotary positions for ``grid``, None for a model without RoPE."""
        return None if self.spec.rope.name == "none" else grid_dependent(self.rope, grid)

    def _attn_bias(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The bias every block's attention adds to its logits for ``grid``, None for a model without one."""
        return None if self.spec.attn_bias.name == "none" else grid_dependent(self.shared_rel_pos, grid)

    def _embed_sequence(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, SequenceLayout]:
        """A patch-sequence batch (:mod:`vitzoo.packing`) -> tokens (each image's prefix tokens in front of the
        row) with each image's positions added, as :meth:`_embed` adds them at that image's own grid."""
        spec, p = self.spec, self.spec.patch_size
        if isinstance(self.patch_embed, HybridPatchEmbed):
            raise ValueError(f"patch_embed={spec.patch_embed.name!r} runs a CNN across patch borders, so it cannot "
                             f"embed patches one at a time; feed this model images, or use a plain patch embedding")
        if self.training and spec.drop.patch > 0:
            raise ValueError("drop.patch > 0 drops tokens of image batches only; set drop={'patch': 0.0} to train "
                             "on patch sequences")
        if spec.attn_bias.name != "none":
            raise ValueError(f"attn_bias={spec.attn_bias.name!r} is laid out for the patch grid of one image batch; "
                             f"feed this model images, not patch sequences")
        if self._join_at:
            raise ValueError(f"prefix_join={spec.prefix_join.name!r} puts the prefix tokens in after block 0; patch "
                             f"sequences take them in front from the start: feed this model images")
        patches, coord, valid, image = checked_sequence(batch, next(self.parameters()), spec.in_chans, p)
        layout = SequenceLayout.of(coord, valid, image, self.num_prefix_tokens)
        cells = rearrange(patches, "b n (p1 p2 c) -> (b n) c p1 p2", p1=p, p2=p)
        x = rearrange(self.patch_embed(cells), "(b n) 1 1 d -> b n d", b=patches.shape[0])
        tokens = self._prefix_tokens()
        if tokens:
            prefix = repeat(torch.cat(tokens, dim=1), "1 t d -> b (k t) d", b=x.shape[0], k=layout.per_row)
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if self._pos_with_prefix is not None:
            pos = layout.per_token(lambda grid: self.position(self.pos_embed, grid)[0], 0.0, self._pos_with_prefix)
            x = x + pos.to(x.dtype)
        return self.norm_pre(self.pos_drop(x)), layout

    def _sequence_rotation(self, layout: SequenceLayout) -> Rotation | None:
        """Each token's rotary positions, those of its image's grid: ``(b, 1, n, head_dim)``, or per layer
        ``(depth, b, heads, n, head_dim)``; padding gets zeros (it attends to padding only)."""
        if self.spec.rope.name == "none":
            return None
        made: list[Rotation] = []

        def table(grid: tuple[int, int]) -> torch.Tensor:
            made.append(self.rope(grid))
            return torch.stack([made[-1].cos, made[-1].sin])

        cos, sin = layout.per_token(table, 0.0, prefix_rows=True)
        pattern = "l h b n d -> l b h n d" if made[0].per_layer else "b n d -> b 1 n d"
        return Rotation(rearrange(cos, pattern), rearrange(sin, pattern), made[0].pair, made[0].per_layer)

    def _run_block(
        self, i: int, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        block = self.blocks[i]
        rotation = None if rotation is None else rotation.layer(i)
        args = (x, rotation) if mask is None else (x, rotation, mask)  # blocks registered before masks still run
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_features(self, images: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict:
        """Images ``(b, c, H, W)`` -> normalized tokens ``(b, prefix + h*w, dim)``; a map ``(b, channels, h, w)``
        for ``features`` other than tokens; for the VLM towers what timm's return (:attr:`output_fmt`): the patch
        grid ``(b, h, w, dim)``, or the projector's tokens where a classifier reads them.

        A patch-sequence batch (:mod:`vitzoo.packing`) gives timm's NaFlex answer, a dict: ``patches``, each
        image's tokens ``(images, prefix + P, dim)`` (padded to the longest), and ``patch_valid`` ``(images, P)``.
        """
        if is_sequence(images):
            return self._sequence_features(images)
        x, grid = self._embed(images)
        return self._final(self._encode(x, self._rotation(grid), self._attn_bias(grid)), grid)

    def _encode(self, x: torch.Tensor, rotation: Rotation | None, bias: torch.Tensor | None) -> torch.Tensor:
        """Embedded tokens through every block, the prefix tokens joining where the spec says; before the norm."""
        for i in range(len(self.blocks)):
            x = self._run_block(i, self._joined(x, i), rotation, bias)
        return self._joined(x, len(self.blocks))

    def forward_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Images ``(b, c, H, W)`` and the patches to keep ``(b, k)`` (row-major indices into each image's patch
        grid) -> normed tokens ``(b, prefix + k, dim)``: the encoder of a masked autoencoder (MAE, He et al.
        2022), run on the kept patches only, each with the position it has in the full grid.

        Refused for a model whose blocks need every patch token (:func:`vitzoo.subset.subset_problem`).
        """
        problem = subset_problem(self.spec)
        if problem:
            raise ValueError(f"this model cannot run on a subset of its patch tokens: {problem}; pick a model "
                             f"whose blocks treat tokens as a set (plain ViT blocks, absolute or rotary positions)")
        x, grid = self._embed(images, keep)
        rotation = self._rotation(grid)
        if rotation is not None:
            prefix = self.num_prefix_tokens
            rows = torch.cat([repeat(torch.arange(prefix, device=keep.device), "t -> b t", b=len(keep)),
                              keep + prefix], dim=1)
            rotation = rotation.tokens(rows)
        return self.norm(self._encode(x, rotation, None))

    def _features(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The final norm, and for a model with ``features`` other than tokens the map ``(b, channels, h, w)``
        its neck makes of the patch tokens."""
        x = self.norm(x)
        if not self._maps:
            return x
        return self.neck(rearrange(x[:, self.num_prefix_tokens:], "b (h w) d -> b d h w", h=grid[0], w=grid[1]))

    def _final(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """What :meth:`forward_features` returns of the last block's tokens: :meth:`_features`, shaped by the
        readout where it says how (``feature_stage``: the VLM towers' ``(b, h, w, dim)`` grid or projected tokens,
        as timm's towers return them)."""
        x = self._features(x, grid)
        stage = getattr(self.attn_pool, "feature_stage", None)
        return x if stage is None else stage(x, grid)

    def _sequence_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._maps:
            raise ValueError(f"features={self.spec.features.name!r} makes a map of one image's grid; feed this "
                             f"model image batches, or use features='tokens' for patch sequences")
        x, layout = self._embed_sequence(batch)
        rotation, mask = self._sequence_rotation(layout), layout.mask()
        for i in range(len(self.blocks)):
            x = self._run_block(i, x, rotation, mask)
        tokens, real = layout.images(self.norm(x))
        return {"patches": tokens, "patch_valid": real[:, self.num_prefix_tokens:]}

    def forward_head(self, x: torch.Tensor | dict[str, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """Tokens (or :meth:`forward_features`' dict for patch sequences) -> pooled features (``pre_logits=True``)
        or class logits."""
        valid = None
        if self._maps:
            x = rearrange(x, "b d h w -> b (h w) d")
        if is_sequence(x):
            x, patch_valid = x["patches"], x["patch_valid"]
            valid = torch.cat([patch_valid.new_ones(len(x), self.num_prefix_tokens), patch_valid], dim=1)
        if self.head_dist is not None:  # DeiT: the class and distillation tokens each have a head
            cls, dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (cls + dist) / 2
            cls, dist = self.head(cls), self.head_dist(dist)
            if self.distilled_training and self.training:
                return cls, dist
            return (cls + dist) / 2
        x = self.attn_pool(x) if valid is None else self.attn_pool(x, valid)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Images ``(b, c, H, W)``, or a patch-sequence batch (:mod:`vitzoo.packing`: images of any sizes, one
        output per image) -> logits, or pooled features for a model without head."""
        return self.forward_head(self.forward_features(images))

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """Final features and the hidden states of chosen blocks (timm's signature and semantics).

        ``indices``: the last n blocks if an int, those blocks if a sequence (negative counts from
        the end), all if None. Intermediates drop the prefix tokens (``return_prefix_tokens`` pairs
        them back; a block that runs before they join has none) and come as ``(b, dim, h, w)`` for
        ``output_fmt="NCHW"`` or ``(b, h*w, dim)`` for ``"NLC"``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = block_indices(len(self.blocks), indices)
        x, (h, w) = self._embed(images)
        rotation, bias = self._rotation((h, w)), self._attn_bias((h, w))
        states, n_prefix = [], []
        for i in range(max(take) + 1 if stop_early else len(self.blocks)):
            x = self._run_block(i, self._joined(x, i), rotation, bias)
            if i in take:
                states.append(self.norm(x) if norm and not self._maps else x)
                n_prefix.append(self.num_prefix_tokens if i >= self._join_at else 0)
        if norm and self._maps:  # as timm's SAM: normed intermediates go through the neck, maps with its channels
            states = [self._features(s, (h, w)) for s in states]
            states = states if output_fmt == "NCHW" else [rearrange(s, "b d h w -> b (h w) d") for s in states]
            return states if intermediates_only else (self._features(x, (h, w)), states)
        prefix = [s[:, :n] for s, n in zip(states, n_prefix, strict=True)]
        states = [s[:, n:] for s, n in zip(states, n_prefix, strict=True)]
        if output_fmt == "NCHW":
            states = [rearrange(s, "b (h w) d -> b d h w", h=h) for s in states]
        if return_prefix_tokens and self.num_prefix_tokens:
            states = list(zip(states, prefix, strict=True))
        return states if intermediates_only else (self._final(self._joined(x, len(self.blocks)), (h, w)), states)

    def get_intermediate_layers(
        self, images: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
        return_prefix_tokens: bool = False, norm: bool = False,
    ) -> list:
        """DINO-style interface to :meth:`forward_intermediates` (intermediates only)."""
        return self.forward_intermediates(
            images, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
            output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
        )


def _save_stored_names(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` hook of a model whose spec renames keys (:func:`stored_name`): its parts named as timm's
    checkpoints name them (NaFlexVit's ``embeds.proj.weight``, MlpMixer's ``stem.proj.weight``), in place and in
    order."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        own = key.startswith(prefix)
        state_dict[prefix + module._stored_name(key.removeprefix(prefix)) if own else key] = value


def _load_stored_names(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing: list,
    unexpected: list, errors: list,
) -> None:
    """``load_state_dict`` hook of a model whose spec renames keys: timm's names back to the modules the model
    holds, so its checkpoints load with ``strict=True``."""
    names = [name for name, _ in (*module.named_parameters(), *module.named_buffers())]
    stored = {prefix + module._stored_name(name): prefix + name for name in names}
    for key in [k for k in state_dict if k in stored and stored[k] != k]:
        state_dict[stored[key]] = state_dict.pop(key)
