"""``docs/blocks.md``: every slot, its entries and each entry's options, written from the declarations.

The page is generated so it cannot drift from the code: ``python -m vitzoo.blocks.catalog docs/blocks.md``
(``make blocks-doc``) writes it, and a test fails when the committed page differs from what the tables say.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from vitzoo.blocks import OUTER_SLOTS, SLOTS, BlockTable
from vitzoo.fields import describe, field_types


def blocks_markdown() -> str:
    """The block catalogue as Markdown."""
    lines = [
        "# Blocks and their options",
        "",
        "Generated from the block tables by `make blocks-doc`; do not edit by hand. A slot's value is an",
        "entry name, or the name with options, spelled the same way everywhere:",
        "",
        "- Python: `create_model(\"vit_small_patch16_224\", attn={\"name\": \"gqa\", \"kv_heads\": 2})`;",
        "  `attn={\"qk_norm\": True}` changes one option of the current entry, `attn=\"gqa\"` picks another",
        "  entry with its default options.",
        "- TOML: `attn = { name = \"gqa\", kv_heads = 2 }`.",
        "- Command line (`--set`, `vitzoo ablate --grid`): `--set attn=gqa --set attn.kv_heads=2`,",
        "  `--grid attn.qk_norm=true,false`.",
        "",
        "`attn`, `mlp` and `block` also take one entry per layer, and one value per layer of each option",
        "(`attn = { name = \"gqa\", kv_heads = [4, 2, 2, 1] }`). Aliases are other names for an entry.",
        "",
    ]
    from vitzoo.spec import GROUPS, ViTSpec  # the spec imports the tables: read it once they exist

    lines += ["## Model-wide fields", "", "Everything else about a model is one of these `ViTSpec` fields "
              "(the slots are described below).", ""]
    lines += _field_table(ViTSpec, exclude=tuple(SLOTS))
    for group, cls in GROUPS.items():
        lines += ["", f"`{group}` holds:", ""] + _field_table(cls)
    lines.append("")
    for table in SLOTS.values():
        lines += _table_section(table)
    lines += ["## Blocks outside the spec", "", "Built beside a model from its features (`vitzoo.detection_backbone`),",
              "not stored in a `ViTSpec` or in timm's checkpoints; registered the same way "
              "(`register_block(\"neck\", ...)`).", ""]
    for table in OUTER_SLOTS.values():
        lines += _table_section(table)
    return "\n".join(lines)


def _table_section(table: BlockTable) -> list[str]:
    """One slot's entries, aliases and option tables."""
    slot = table.slot
    lines = [f"## `{slot}`", "", f"Contract: `{table.contract}`", ""]
    aliases = {}
    for alias in table.known_names():
        canonical = table.canonical(alias)
        if canonical != alias:
            aliases.setdefault(canonical, []).append(alias)
    for name, doc in table.describe().items():
        also = f" (alias: {', '.join(f'`{a}`' for a in aliases[name])})" if name in aliases else ""
        plain = "" if table.options_class(name) else " No options."
        lines.append(f"- `{name}`{also}: {doc}{plain}")
    classes = list(dict.fromkeys(c for c in map(table.options_class, table) if c is not None))
    for cls in classes:
        users = ", ".join(f"`{n}`" for n in table if table.options_class(n) is cls)
        lines += ["", f"Options of {users}:", ""] + _field_table(cls)
    lines.append("")
    return lines


def _field_table(cls: type, exclude: tuple[str, ...] = ()) -> list[str]:
    """A dataclass's fields as a Markdown table: name, type, default and the help declared with the field."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name not in exclude:
            default = "below" if dataclasses.is_dataclass(f.default) else f"`{f.default!r}`"
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            rows.append(f"| `{f.name}` | {describe(field_types(cls)[f.name])} | {default} | {help_text} |")
    return rows


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(blocks_markdown())
