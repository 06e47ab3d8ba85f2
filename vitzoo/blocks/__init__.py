"""Swappable building blocks, one string-keyed table per slot.

The slot names are the spec fields that choose from them: ``patch_embed``, ``pos_embed``, ``attn``,
``mlp``, ``norm``, ``block``, ``pool``, ``rope``, ``attn_bias``, ``prefix_join`` and ``features``. Each table's
module documents its constructor contract.
Tables of blocks built around a model rather than inside it (``neck``: dense features for detection and
segmentation) are in ``OUTER_SLOTS``: no spec field names them, but they register and look up the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import vitzoo.blocks.gemma  # noqa: F401  (registers Gemma 4's entries in the tables below)
import vitzoo.blocks.xcit  # noqa: F401  (registers XCiT's entries in the tables below)
from vitzoo.blocks.attention import ATTENTIONS
from vitzoo.blocks.attn_bias import ATTN_BIASES  # also registers the relative-position attentions
from vitzoo.blocks.encoder import ENCODER_BLOCKS
from vitzoo.blocks.feature_map import FEATURE_MAPS
from vitzoo.blocks.head_mixing import GatedPositionalAttention, TalkingHeadsAttention
from vitzoo.blocks.join import JOINS
from vitzoo.blocks.mixer import TokenOptions  # registers the all-MLP token mixers (MLP-Mixer, ResMLP, gMLP)
from vitzoo.blocks.mlp import MLPS
from vitzoo.blocks.neck import NECKS
from vitzoo.blocks.norm import NORMS
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.patch import PATCH_EMBEDS
from vitzoo.blocks.pooling import POOLS
from vitzoo.blocks.position import POSITIONS
from vitzoo.blocks.projector import READOUTS  # noqa: F401  (registers the VLM projector readouts)
from vitzoo.blocks.rope import ROPES
from vitzoo.blocks.table import BlockContractError, BlockTable
from vitzoo.blocks.window import WindowedAttention  # noqa: F401  (registers attn="windowed")
from vitzoo.errors import did_you_mean

SLOTS: dict[str, BlockTable] = {
    table.slot: table
    for table in (PATCH_EMBEDS, POSITIONS, ATTENTIONS, MLPS, NORMS, ENCODER_BLOCKS, POOLS, ROPES, ATTN_BIASES, JOINS,
                  FEATURE_MAPS)
}
OUTER_SLOTS: dict[str, BlockTable] = {NECKS.slot: NECKS}  # built beside a model, outside its spec


def slot_table(slot: str) -> BlockTable:
    """The table of one slot, by its spec field name (or ``"neck"``)."""
    tables = {**SLOTS, **OUTER_SLOTS}
    try:
        return tables[slot]
    except KeyError:
        raise ValueError(f"unknown block slot {slot!r}; {did_you_mean(slot, tables)}") from None


def register_block(
    slot: str, name: str, factory: Callable | None = None, *, options: type[BlockOptions] | None = None,
    overwrite: bool = False,
) -> Callable:
    """Make a block usable by ``name`` in ``slot`` everywhere a spec names blocks: ``create_model``,
    TOML registry entries, ``vitzoo ablate --grid``. A class decorator, or a call with ``factory``.
    ``options`` declares the options the block takes (a frozen :class:`BlockOptions` dataclass): a spec
    sets them as ``mlp={"name": "my_mlp", "scale": 0.5}`` and the block receives ``options=<instance>``.

    >>> @register_block("mlp", "my_mlp")
    ... class MyMlp(nn.Module):
    ...     def __init__(self, dim, hidden_dim, norm, drop): ...

    The first model that builds the block calls it once on a tiny input, so a block that breaks its
    slot's contract (``slot_table(slot).contract``; docs/custom_blocks.md) fails at construction
    with a :class:`BlockContractError` naming the slot, the block and the contract.
    """
    return slot_table(slot).register(name, factory, options=options, overwrite=overwrite, verify=True)


__all__ = [
    "OUTER_SLOTS", "SLOTS", "BlockContractError", "BlockOptions", "BlockTable", "GatedPositionalAttention",
    "TalkingHeadsAttention", "TokenOptions", "register_block", "slot_table",
]
