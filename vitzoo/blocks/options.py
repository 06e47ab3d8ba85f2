"""Options of a block entry: a small frozen dataclass declared next to the block and given to it on build.

A slot value in a spec is an entry name with options (``attn = { name = "gqa", kv_heads = 2 }``). The
entry declares which options it takes by registering an options class (``ATTENTIONS.register("gqa",
GroupedQueryAttention, options=GroupedQueryOptions)``); the table builds the block with
``options=<instance>``. Each option is a typed field with a default and a docstring line under it,
which is what ``docs/blocks.md`` and the error for an undeclared option show. Types and ranges are
checked as for the spec (:mod:`vitzoo.fields`); rules that involve the model's sizes go in :meth:`check`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from vitzoo.fields import Range, check_fields


@dataclass(frozen=True)
class BlockOptions:
    """Base of every options class: checks each field's type and range on construction."""

    ranges: ClassVar[dict[str, Range]] = {}

    def __post_init__(self) -> None:
        check_fields(self, self.ranges)

    def check(self, spec: Any) -> None:
        """Refuse (ValueError) values that do not fit the model's sizes; ``spec`` is the :class:`ViTSpec`."""


def option_names(cls: type[BlockOptions] | None) -> tuple[str, ...]:
    """The options an entry takes (none without an options class)."""
    return () if cls is None else tuple(f.name for f in dataclasses.fields(cls))


def option_defaults(cls: type[BlockOptions] | None) -> dict[str, Any]:
    """Each option's default value."""
    return {} if cls is None else {f.name: f.default for f in dataclasses.fields(cls)}


@cache
def option_docs(cls: type[BlockOptions]) -> dict[str, str]:
    """Each option's docstring line (the string literal under its field), read from the class source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BlockOptions)) or klass is BlockOptions:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for field, doc in zip(body, body[1:], strict=False):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
                docs[field.target.id] = " ".join(str(doc.value.value).split())
    return docs
