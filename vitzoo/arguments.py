"""Command-line options built from the config dataclasses, refusing nonsense at parse time.

A command's options are its config's fields (:func:`add_options`): the name, the type, the range, the
help text and the default all come from the field (:func:`vitzoo.fields.described`), so a default lives
in one place and the command line refuses exactly what the dataclass refuses, with the same message.
``--batch-size 0`` or ``--steps -5`` end the command at once with the usage line, before any model or
data is built, instead of surfacing minutes later as a ZeroDivisionError or a run that does nothing.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, fields
from typing import Any, Literal

import torch

from vitzoo.fields import Range, check_value, field_default, field_types, parse_text
from vitzoo.inputs import available_device
from vitzoo.spec import parse_assignment


def value_type(name: str, annotation: Any, bound: Range | None) -> Callable[[str], Any]:
    """An argparse type: the text read as ``--set`` values are (:func:`vitzoo.fields.parse_text`; a lone
    value of a tuple is a tuple of one), refused as the dataclass refuses it, naming it ``name``."""
    def parse(text: str) -> Any:
        value = parse_text(text, annotation)
        if typing.get_origin(annotation) is tuple and not isinstance(value, tuple):
            value = (value,)
        try:
            check_value(name, value, annotation, bound)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    return parse


def _shown(default: Any) -> str | None:
    """A default as the help text shows it; None where there is none to show (a required field), or the
    field's help says what no value means."""
    if default is MISSING or default is None or default is False or default == ():
        return None
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def add_options(parser: argparse._ActionsContainer, config: type, names: Iterable[str],
                flags: Mapping[str, str] | None = None) -> None:
    """Add an option for each field ``names`` of dataclass ``config``: ``--batch-size`` for ``batch_size``
    (``flags`` renames one, e.g. ``{"num_workers": "--workers"}``; a field without a default is a
    positional argument, or a required option when ``flags`` names it ``--...``).

    A bool is a flag, a ``Literal`` a choice, a text field takes the text as given; any other value is
    parsed and checked by :func:`value_type`. The default is the field's, and the help its description.
    """
    declared, annotations = {f.name: f for f in fields(config)}, field_types(config)
    for name in names:
        annotation, default = annotations[name], field_default(declared[name])
        flag = (flags or {}).get(name, name if default is MISSING else "--" + name.replace("_", "-"))
        shown = _shown(default)
        text = declared[name].metadata["help"] + (f" (default: {shown})" if shown else "")
        options: dict[str, Any] = {"help": text.replace("%", "%%")}
        if flag.startswith("-"):
            options.update({"dest": name, **({"required": True} if default is MISSING else {"default": default})})
        members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
        elif typing.get_origin(annotation) is Literal:
            options["choices"] = typing.get_args(annotation)
        elif str not in members:
            options["type"] = value_type(f"{config.__name__}.{name}", annotation, declared[name].metadata["range"])
        parser.add_argument(flag, **options)


def parsed_fields(config: type, args: argparse.Namespace, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The values ``args`` holds for the fields of dataclass ``config`` (but ``exclude``), by field name."""
    given = vars(args)
    return {f.name: given[f.name] for f in fields(config) if f.name in given and f.name not in exclude}


def add_pretrained_option(parser: argparse.ArgumentParser, purpose: str) -> None:
    """``--pretrained``: alone the hub's weights, with a value a weights file or save_pretrained folder; read it
    with :func:`pretrained_value`."""
    parser.add_argument("--pretrained", nargs="?", const="hub", default=None,
                        help=f"{purpose} weights: the hub's (no value) or a file / save_pretrained folder")


def pretrained_value(args: argparse.Namespace) -> bool | str:
    """What ``--pretrained`` means as ``create_model``'s ``pretrained``: False, True (the hub) or a path."""
    return args.pretrained if args.pretrained not in (None, "hub") else args.pretrained == "hub"


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set FIELD=VALUE`` (repeatable): spec fields and block options; read them with :func:`spec_overrides`."""
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=help)


def spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` values by field name (``{"mlp": "swiglu", "attn.qk_norm": True}``); checked when the spec
    is built."""
    return dict(map(parse_assignment, args.set))


def best_device() -> str:
    """The device a command runs on unless told: cuda when this machine has it."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device(text: str) -> str:
    """An argparse type for ``--device``: a device torch knows and this machine has (see
    :func:`vitzoo.inputs.available_device`, which the commands without argparse types call)."""
    try:
        available_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device ")) from None
    return text


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``, checked at parse time; the machine's best device unless told (a config's own default is
    for Python callers, who say where they train)."""
    parser.add_argument("--device", type=device, default=best_device(),
                        help="cpu, cuda, cuda:N, ... (default: cuda when available)")
