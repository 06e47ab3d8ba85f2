"""``docs/blocks.md``: every slot, its entries and each entry's options, written from the declarations.

The page is generated so it cannot drift from the code: ``python -m vitzoo.blocks.catalog docs/blocks.md``
(``make blocks-doc``) writes it, and a test fails when the committed page differs from what the tables say.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from vitzoo.blocks import SLOTS
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
    for slot, table in SLOTS.items():
        lines += [f"## `{slot}`", "", f"Contract: `{table.contract}`", ""]
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
            lines += ["", f"Options of {users}:", "", "| option | type | default | meaning |", "|---|---|---|---|"]
            for f in dataclasses.fields(cls):
                lines.append(f"| `{f.name}` | {describe(field_types(cls)[f.name])} | `{f.default!r}` | "
                             f"{f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(blocks_markdown())
