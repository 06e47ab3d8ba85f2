"""Strict types for dataclass fields, read from their annotations, and command-line text parsed to fit them.

A config value that is almost right is worse than one that is wrong: ``qk_norm="no"`` is a true
string, ``img_size="48"`` iterates to (4, 8), ``depth=True`` is the int 1. So every field value is
checked against its annotation with no conversion at all: a bool field takes only True/False, an int
field only an int (never a bool), a float field an int or a finite float, a string field only a
string, ``tuple[int, ...]`` only a tuple of ints, a ``Literal`` only one of its values. Ranges
(positive, a rate in [0, 1)) come from a small table beside the dataclass or from the fields themselves
(:func:`described`, which also holds the help text that command-line options are built from). One
checker serves any dataclass built from these annotations.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from typing import Any, Literal

BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
NONE_WORDS = ("none", "null")


class FieldTypeError(TypeError, ValueError):
    """A field value of the wrong type. Also a ValueError, so command-line entry points report it as
    bad input (one line, no traceback) like every other refused value."""


@dataclass(frozen=True)
class Range:
    """Bounds on a number (each element of a tuple): ``low <= x`` (``low < x`` when ``open_low``) and
    ``x < high``."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False

    def holds(self, x: float) -> bool:
        return (x > self.low if self.open_low else x >= self.low) and x < self.high

    def __str__(self) -> str:
        if self.high < math.inf:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g})"
        return f"{'>' if self.open_low else '>='} {self.low:g}"


POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
RATE = Range(0, 1)


def described(default: Any = MISSING, help: str = "", bound: Range | None = None, *,
              factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that carries its documentation and its range: the one place of its default, which
    the constructor's :func:`check_fields` and the command line's options (``vitzoo.arguments``) both read."""
    return field(default=default, default_factory=MISSING if factory is None else factory,
                 metadata={"help": help, "range": bound})


def field_like(cls: type, name: str, default: Any = MISSING) -> Any:
    """A new field declared as ``cls``'s field ``name`` (default, help, range), optionally with another
    default: a config that shares a setting with another takes it from there instead of restating it."""
    source = next(f for f in fields(cls) if f.name == name)
    if default is MISSING:
        return field(default=source.default, default_factory=source.default_factory, metadata=source.metadata)
    return field(default=default, metadata=source.metadata)


def field_default(declared: Field) -> Any:
    """The value a field takes when it is not given (a fresh one from its factory); MISSING when required."""
    return declared.default if declared.default_factory is MISSING else declared.default_factory()


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Each dataclass field's annotation, resolved (``from __future__ import annotations`` leaves strings);
    class variables are not fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _options(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` -> (int, NoneType)); a plain one alone."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def takes_tuple(annotation: Any) -> bool:
    """Whether a value of ``annotation`` may itself be a tuple (``tuple[int, int] | None``: yes; ``int``: no)."""
    return any(typing.get_origin(option) is tuple for option in _options(annotation))


def _fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is exactly of the annotated type, without any conversion."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is Literal:  # 1 == True, so the type must match as well
        return any(value == option and type(value) is type(option) for option in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # an int is a float value (PEP 484's numeric tower); it is kept as given
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    return isinstance(value, annotation)


def describe(annotation: Any) -> str:
    """An annotation in words for an error message: ``int | None`` -> "an int or None"."""
    words = {bool: "true or false (a bool)", int: "an int", float: "a finite number", str: "a string",
             type(None): "None", Any: "anything"}
    parts = []
    for option in _options(annotation):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if origin is tuple:
            inner = describe(args[0]) if args[-1] is Ellipsis else ", ".join(map(describe, args))
            parts.append(f"a tuple of {inner}" if args[-1] is Ellipsis else f"a tuple ({inner})")
        elif origin is list:
            parts.append(f"a list of {describe(args[0])}")
        elif origin is dict:
            parts.append(f"a dict of {describe(args[0])} to {describe(args[1])}")
        elif origin is Literal:
            parts.append(" or ".join(map(repr, args)))
        else:
            parts.append(words.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(parts)


def check_value(name: str, value: Any, annotation: Any, bound: Range | None) -> None:
    """Refuse ``value`` unless it fits ``annotation`` and ``bound``, naming it ``name`` (``Owner.field``).

    Raises :class:`FieldTypeError` or ValueError saying what the field takes; the one wording of a refusal,
    whether the value came from Python (:func:`check_fields`) or from a command line.
    """
    if not any(_fits(value, option) for option in _options(annotation)):
        raise FieldTypeError(f"{name}: expected {describe(annotation)}, got {value!r} ({type(value).__name__})")
    numbers = value if isinstance(value, tuple) else (value,)
    if bound and any(isinstance(x, int | float) and not bound.holds(x) for x in numbers):
        or_none = " or None" if type(None) in _options(annotation) else ""
        raise ValueError(f"{name}: must be {bound}{or_none}, got {value!r}")


def field_ranges(cls: type) -> dict[str, Range]:
    """The ranges declared on the fields of dataclass ``cls`` with :func:`described`."""
    return {f.name: f.metadata["range"] for f in fields(cls) if f.metadata.get("range")}


def check_fields(obj: Any, skip: tuple[str, ...] = ()) -> None:
    """Refuse the first field of dataclass ``obj`` (but those in ``skip``, checked elsewhere) whose value does
    not fit its annotation or the range declared on the field (see :func:`described`).

    Raises :class:`FieldTypeError` or ValueError naming the field, the value and what it takes.
    """
    ranges = field_ranges(type(obj))
    for name, annotation in field_types(type(obj)).items():
        if name not in skip:
            check_value(f"{type(obj).__name__}.{name}", getattr(obj, name), annotation, ranges.get(name))


def parse_text(text: str, annotation: Any) -> Any:
    """Command-line text as a value of ``annotation``: a bool word (true/false/yes/no/on/off) only for a
    bool, none/null only where None is allowed, a number only for a number, ``a,b`` a tuple; any text
    that fits nothing stays a string, for :func:`check_fields` to refuse with the field named."""
    options = _options(annotation)
    tuples = [o for o in options if typing.get_origin(o) is tuple]
    if "," in text and tuples:
        parts = text.split(",")
        args = typing.get_args(tuples[0])
        inner = [args[0]] * len(parts) if args[-1] is Ellipsis else list(args)
        return tuple(parse_text(part, inner[i] if i < len(inner) else str) for i, part in enumerate(parts))
    word = text.strip()
    if word.lower() in NONE_WORDS and type(None) in options:
        return None
    if word.lower() in BOOL_WORDS and bool in options:
        return BOOL_WORDS[word.lower()]
    numeric = {o for o in (*options, *(typing.get_args(t)[0] for t in tuples)) if o in (int, float)}
    for kind in (int, float) if float in numeric else (int,) if int in numeric else ():
        try:
            return kind(word)
        except ValueError:
            pass
    return word
