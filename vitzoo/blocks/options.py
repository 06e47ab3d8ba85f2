"""Options of a block entry: a small frozen dataclass declared next to the block and given to it on build.

A slot value in a spec is an entry name with options (``attn = { name = "gqa", kv_heads = 2 }``). The
entry declares which options it takes by registering an options class (``ATTENTIONS.register("gqa",
GroupedQueryAttention, options=GroupedQueryOptions)``); the table builds the block with
``options=<instance>``. Each option is a typed field declared with :func:`vitzoo.fields.described`: its
default, one line saying what it does (``docs/blocks.md`` shows it) and its range, checked on
construction as every config's are; rules that involve the model's sizes go in :meth:`check`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vitzoo.fields import AT_LEAST_ONE, check_fields, described


@dataclass(frozen=True)
class BlockOptions:
    """Base of every options class: checks each field's type and range on construction."""

    def __post_init__(self) -> None:
        check_fields(self)

    def check(self, spec: Any) -> None:
        """Refuse (ValueError) values that do not fit the model's sizes; ``spec`` is the :class:`ViTSpec`."""

    def for_model(self, spec: Any) -> BlockOptions:
        """These options with what they follow from the model filled in, as the block is built with them (a table
        sized for the patch grid, see :class:`GridOptions`); the spec keeps the values as set, so a model built
        at another image size sizes its tables for that size."""
        return self


@dataclass(frozen=True)
class GridOptions(BlockOptions):
    """Options of a block whose parameters are laid out for one patch grid: a relative-position table, a
    token-mixing MLP (Mixer), a gating projection across tokens (gMLP)."""

    grid: tuple[int, int] | None = described(
        None, "(h, w) patch grid the block's tables are sized for; None: the model's grid at img_size", AT_LEAST_ONE)

    def for_model(self, spec: Any) -> BlockOptions:
        return self if self.grid is not None else dataclasses.replace(self, grid=spec.grid_size)


def option_names(cls: type[BlockOptions] | None) -> tuple[str, ...]:
    """The options an entry takes (none without an options class)."""
    return () if cls is None else tuple(f.name for f in dataclasses.fields(cls))


def option_defaults(cls: type[BlockOptions] | None) -> dict[str, Any]:
    """Each option's default value."""
    return {} if cls is None else {f.name: f.default for f in dataclasses.fields(cls)}

