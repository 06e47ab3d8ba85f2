"""Command line: ``vitzoo list [PATTERN]``, ``vitzoo info NAME`` and the commands in ``COMMANDS``."""

from __future__ import annotations

import argparse
import json
import sys

from vitzoo.ablate import add_ablate_command
from vitzoo.bench import add_bench_command
from vitzoo.card import format_card, model_card
from vitzoo.errors import run_command
from vitzoo.export import add_export_command
from vitzoo.registry import list_models, model_entry
from vitzoo.train.finetune import add_finetune_command
from vitzoo.train.pretrain import add_pretrain_command
from vitzoo.validate import add_validate_command


def _cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    for name in names:
        entry = model_entry(name)
        spec = entry.spec
        print(f"{name:<40} {entry.family:<8} {spec.embed_dim:>5}d x{spec.depth:<3} p{spec.patch_size:<3} "
              f"{spec.img_size[0]}x{spec.img_size[1]}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    card = model_card(args.name)
    print(json.dumps(card, indent=2, default=str) if args.json else format_card(card))
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registry models matching a pattern")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vit_*_patch16_*'")
    p.add_argument("--pretrained", action="store_true", help="only models with published weights")
    p.set_defaults(func=_cmd_list)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's card: size, cost, provenance")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)


# Each entry adds one subcommand; a command's module owns its arguments and its function.
COMMANDS = (
    _add_list, _add_info, add_bench_command, add_validate_command, add_finetune_command, add_pretrain_command,
    add_ablate_command, add_export_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitzoo", description="Vision Transformers by name.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("vitzoo", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
