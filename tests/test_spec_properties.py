"""Property: any value of any type for any ViTSpec field or block option (``attn.qk_norm``), given to the
spec or to ``create_model``, gives either a model that holds exactly that value or a ValueError/TypeError
naming the field."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitzoo
from vitzoo.blocks import SLOTS
from vitzoo.choice import PER_LAYER_SLOTS
from vitzoo.fields import field_types
from vitzoo.migrate import TIMM_POS_EMBEDS
from vitzoo.spec import GROUPS, ViTSpec, value_type

BASE = "vit_pico_patch4_32"
OPTIONS = sorted({f"{slot}.{f.name}" for slot, table in SLOTS.items() for name in table
                  if table.options_class(name) for f in dataclasses.fields(table.options_class(name))}
                 | {f"{group}.{name}" for group, cls in GROUPS.items() for name in field_types(cls)})
FIELDS = sorted(field_types(ViTSpec)) + OPTIONS
SLOT_NAMES = sorted({name for table in SLOTS.values() for name in table.known_names()})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 64),
    st.sampled_from([2**31, 10**12, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.1, 0.5, 1.0, 4.0, 1e-6, 1e300]),
    st.text(max_size=6),
    st.sampled_from(["48", "1e-6", "true", "no", "none", "4", *SLOT_NAMES]),
)
values = st.one_of(
    scalars,
    st.tuples(scalars, scalars),
    st.lists(scalars, max_size=5),
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.lists(st.sampled_from(SLOT_NAMES), min_size=4, max_size=4),  # per-layer choices for the 4-block base
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)


def shaped(annotation: Any) -> st.SearchStrategy:
    """Values of the annotated type (small, huge, zero, negative...), so that many draws build a model."""
    if isinstance(annotation, types.UnionType):
        return st.one_of(*map(shaped, typing.get_args(annotation)))
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if args[-1] is Ellipsis:
            return st.tuples(*[shaped(args[0])] * 4)  # one per layer of the 4-block base
        return st.tuples(*map(shaped, args))
    if typing.get_origin(annotation) is typing.Literal:  # one of its values, or any string
        return st.sampled_from(typing.get_args(annotation)) | st.text(max_size=4)
    kinds = {bool: st.booleans(), int: st.integers(-3, 64) | st.sampled_from([2**31, 10**12]),
             float: st.floats(-2, 1e4) | st.sampled_from([0.0, 1e-6, 1e300, float("inf"), float("nan")]),
             str: st.sampled_from(SLOT_NAMES) | st.text(max_size=4), type(None): st.none()}
    return kinds[annotation]


def field_and_value() -> st.SearchStrategy:
    """A field name and a value of any type, or of the field's own type (three draws in four)."""
    def value_for(name: str) -> st.SearchStrategy:
        if name in GROUPS:
            own = st.dictionaries(st.sampled_from(sorted(field_types(GROUPS[name]))), shaped(float), max_size=2)
        elif name in SLOTS:
            own = shaped(str | tuple[str, ...] if name in PER_LAYER_SLOTS else str)
        else:
            own = shaped(value_type(name))
        return st.integers(0, 3).flatmap(lambda draw: own if draw else values)

    return st.sampled_from(FIELDS).flatmap(lambda name: st.tuples(st.just(name), value_for(name)))


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def typed(value: Any) -> Any:
    """A value with its type spelled out, so that True == 1 and 4 == 4.0 compare unequal."""
    if isinstance(value, tuple | list):
        return type(value), tuple(map(typed, value))
    return type(value), value


def documented(name: str, value: Any) -> Any:
    """What the spec holds for ``value`` by its documented conversions: an int image size is square,
    JSON/TOML lists are tuples, a slot alias ("gap") is its entry's name ("avg")."""
    if name == "img_size" and type(value) is int:
        value = (value, value)
    if isinstance(value, list):
        value = tuple(value)
    if name in SLOTS:
        canonical = lambda v: SLOTS[name].canonical(v) if isinstance(v, str) else v  # noqa: E731
        value = tuple(map(canonical, value)) if isinstance(value, tuple) else canonical(value)
    return value


def held(spec: ViTSpec, name: str) -> Any:
    """What the spec holds for a field or option: a slot's entry name, an option's value."""
    value = spec.get(name)
    return value.name if name in SLOTS else value


def check(name: str, value: Any, build: Any, expected: Any) -> None:
    try:
        with torch.device("meta"):
            model = build()
    except (ValueError, TypeError) as err:
        top, _, option = name.partition(".")  # an option is named by itself, or by its slot refusing it
        assert name in str(err) or f"ViTSpec.{top}" in str(err) and (not option or f"'{option}'" in str(err)), (
            f"{name}={value!r}: the message does not name the field: {err}")
        return
    actual = held(model.spec, name)
    if isinstance(expected, dict):  # a group given as a table: each field it names holds its value
        actual = tuple((k, getattr(actual, k)) for k in sorted(expected))
        expected = tuple(sorted(expected.items()))
    assert typed(actual) == typed(expected), f"{name}={value!r} became {held(model.spec, name)!r}"


@SETTINGS
@given(field_and_value())
def test_any_value_for_any_spec_field(field):
    name, value = field
    spec = vitzoo.model_spec(BASE)
    check(name, value, lambda: vitzoo.VisionTransformer(spec.replace(**{name: value})), documented(name, value))


@SETTINGS
@given(field_and_value())
def test_any_value_for_any_create_model_override(field):
    name, value = field
    expected = documented(name, value)
    if value is None and name in ("num_classes", "img_size"):  # create_model's "keep the entry's" default
        expected = getattr(vitzoo.model_spec(BASE), name)
    if name == "pos_embed" and isinstance(value, str) and value in TIMM_POS_EMBEDS:  # timm's names, as timm's
        expected = TIMM_POS_EMBEDS[value]
    if name == "final_norm" and isinstance(value, bool):  # timm's keyword: the norm, where the entry puts it, or none
        expected = "auto" if value else "none"
    check(name, value, lambda: vitzoo.create_model(BASE, **{name: value}), expected)


@pytest.mark.parametrize("name", sorted(field_types(ViTSpec)))
def test_every_field_has_a_checked_type(name):
    with pytest.raises((TypeError, ValueError), match=f"ViTSpec.{name}: "):
        vitzoo.model_spec(BASE, **{name: object()})
