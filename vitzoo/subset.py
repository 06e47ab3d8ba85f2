"""Which encoders can run on a subset of their patch tokens (a masked autoencoder's visible patches).

A ViT whose blocks treat tokens as a set (attention, per-token MLPs and norms) with positions added to the
tokens, or rotary positions gathered per token, computes the same on any subset. Blocks that are laid out
for the full patch grid or token count cannot: they are named here, each with the reason, so a caller can
refuse such a model before any work.
"""

from __future__ import annotations

from vitzoo.blocks.patch import HYBRID_STEMS
from vitzoo.spec import ViTSpec

_GRID_TABLE = "a relative-position table laid out for the full patch grid"
_TOKEN_MLP = "a token-mixing MLP sized for the full token count"
_STEM = "a convolutional stem that sees across patch borders, so masked pixels would reach the visible patches"
# slot -> entry -> why that entry needs every patch token
NEEDS_ALL_TOKENS: dict[str, dict[str, str]] = {
    "patch_embed": {**dict.fromkeys(HYBRID_STEMS, _STEM), "conv_bn": _STEM},
    "attn": {
        "relpos_bias": _GRID_TABLE, "relpos_mlp": _GRID_TABLE, "beit": _GRID_TABLE,
        "gpsa": "gated positional attention over a table of offsets for the full patch grid",
        "windowed": "attention within windows cut from the full patch grid",
        "xca": "XCiT's attention, whose local patch interaction convolves the full patch grid",
        "token_mlp": _TOKEN_MLP, "token_glu": _TOKEN_MLP, "token_linear": _TOKEN_MLP,
    },
    "mlp": {"spatial_gating": "gMLP's spatial gating, which mixes a fixed number of tokens"},
    "block": {"mixer": _TOKEN_MLP, "resmlp": _TOKEN_MLP, "gmlp": _TOKEN_MLP,
              "xcit": "XCiT's block, whose local patch interaction convolves the full patch grid"},
}
PER_LAYER = ("attn", "mlp", "block")


def subset_problem(spec: ViTSpec) -> str | None:
    """Why a model with ``spec`` cannot run on a subset of its patch tokens, or None when it can."""
    if spec.attn_bias.name != "none":
        return f"attn_bias={spec.attn_bias.name!r} is {_GRID_TABLE}"
    for slot, reasons in NEEDS_ALL_TOKENS.items():
        for index in range(spec.depth if slot in PER_LAYER else 1):
            name = spec.layer(slot, index)[0]
            if name in reasons:
                where = f" (block {index})" if slot in PER_LAYER and spec.depth > 1 else ""
                return f"{slot}={name!r}{where} is {reasons[name]}"
    return None
