"""A model's size from its spec alone, so that an absurd one is refused before anything is allocated.

``embed_dim=10_000_000`` in a config file would otherwise start allocating petabytes. The estimate
is a closed formula over the spec (patch projection, tokens, position table, blocks, pooling,
heads); it ignores small parts (norms of custom blocks, hybrid CNN stems) and is within a few
percent of the real count for plain ViTs. Arithmetic is in floats, so any size gives a number.
"""

from __future__ import annotations

from vitzoo.blocks import SLOTS, TokenOptions
from vitzoo.choice import PER_LAYER_SLOTS, varies_per_layer
from vitzoo.spec import ViTSpec

MAX_PARAMS = 10_000_000_000  # default limit of create_model / VisionTransformer; the largest registry model is ~7B
SIZE_FIELDS = ("embed_dim", "depth", "mlp_ratio", "img_size", "patch_size", "in_chans", "num_classes", "reg_tokens")


BRANCHES = {"parallel2": 2}  # encoder blocks with several attention + MLP branches


def _mlp(dim: float, hidden: float, name: str) -> float:
    """Weights and biases of one MLP: gated ones (SwiGLU) have two input projections, packed ones
    (DINOv2-g's ``swiglu_packed``) one that is split in halves."""
    if "packed" in name:
        return dim * hidden + hidden + hidden / 2 * dim + dim
    inputs = 2 if "glu" in name else 1
    return inputs * (dim * hidden + hidden) + hidden * dim + dim


def _across_tokens(spec: ViTSpec, slot: str, i: int) -> float | None:
    """Parameters laid out across the tokens (Mixer's token MLP, ResMLP's, gMLP's gate), which grow with the image
    size; None for a block without (:class:`~vitzoo.blocks.mixer.TokenOptions`)."""
    options = spec.layer(slot, i)[1]
    return options.for_model(spec).params(spec.embed_dim) if isinstance(options, TokenOptions) else None


TABLE_GRID = "pos_embed.table_grid"


def _table_grid(spec: ViTSpec) -> tuple[int, int] | None:
    """The grid of a learned position table kept whatever the image size (Qwen3-VL), None for one of the image's."""
    return spec.get(TABLE_GRID) if spec.pos_embed.name == "learned" else None


def estimate_params(spec: ViTSpec) -> float:
    """About how many parameters the model of ``spec`` has (float: absurd specs give absurd numbers)."""
    dim, heads = float(spec.embed_dim), spec.num_heads
    head_dim = dim / heads
    grid = float(spec.img_size[0] // spec.patch_size) * float(spec.img_size[1] // spec.patch_size)
    total = spec.in_chans * float(spec.patch_size) ** 2 * dim + dim  # patch projection
    total += spec.num_prefix_tokens * dim
    if spec.pos_embed.name == "learned":
        table = _table_grid(spec)
        total += ((float(table[0]) * float(table[1]) if table else grid) + spec.positioned_prefix) * dim
    hidden = dim * spec.mlp_ratio

    def block(i: int) -> float:
        kind, mlp = spec.layer("block", i)[0], spec.layer("mlp", i)[0]
        kv = getattr(spec.layer("attn", i)[1], "kv_heads", None) or heads
        qkv = dim * dim + 2 * dim * kv * head_dim
        attention = _across_tokens(spec, "attn", i)
        attention = qkv + 3 * dim + dim * dim + dim if attention is None else attention  # + proj
        mlp_params = _mlp(dim, hidden, mlp) + (_across_tokens(spec, "mlp", i) or 0.0)
        branch = attention + mlp_params + 4 * dim  # + two norms
        return BRANCHES.get(kind, 1) * branch

    if any(varies_per_layer(SLOTS[slot], getattr(spec, slot)) for slot in PER_LAYER_SLOTS):  # depth values at hand
        total += sum(block(i) for i in range(spec.depth))
    else:
        total += spec.depth * block(0)
    if spec.pool.name == "map":
        total += 5 * dim * dim + _mlp(dim, dim * (spec.get("pool.mlp_ratio") or spec.mlp_ratio), "gelu")
    heads_out = 2 if spec.dist_token else 1
    return total + heads_out * (dim * spec.num_classes + spec.num_classes)


def check_size(spec: ViTSpec, max_params: int | None = MAX_PARAMS) -> None:
    """Refuse a spec estimated above ``max_params`` parameters (None: no limit), naming its sizes."""
    params = estimate_params(spec)
    if max_params is not None and params > max_params:
        named = [*SIZE_FIELDS, TABLE_GRID] if _table_grid(spec) else SIZE_FIELDS
        sizes = ", ".join(f"{name}={spec.get(name)!r}" for name in named)
        raise ValueError(
            f"ViTSpec: about {params:.3g} parameters ({sizes}) is over the limit of {max_params:.3g}; "
            f"check these sizes, or pass max_params=N (None for no limit) to create_model to build it anyway"
        )
