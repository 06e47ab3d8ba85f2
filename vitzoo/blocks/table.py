"""String-keyed tables of interchangeable blocks, one table per slot."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vitzoo.errors import did_you_mean

T = TypeVar("T", bound=Callable)


class BlockTable(Generic[T]):
    """Maps names to block factories for one slot (``"mlp"``, ``"norm"``, ...).

    A factory is a class, or a ``functools.partial`` of one, called with the slot's documented
    constructor arguments. Unknown names raise a ``ValueError`` listing the valid names.
    """

    def __init__(self, slot: str, contract: str) -> None:
        self.slot = slot
        self.contract = contract
        self._entries: dict[str, T] = {}

    def register(self, name: str, factory: T | None = None, *, overwrite: bool = False):
        """Add ``factory`` under ``name``; usable as ``table.register(name)`` class decorator."""

        def add(obj: T) -> T:
            if not callable(obj):
                raise TypeError(f"{self.slot} block {name!r} must be a class or callable, got {obj!r}")
            if name in self._entries and not overwrite:
                raise ValueError(
                    f"{self.slot} block {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._entries[name] = obj
            return obj

        return add if factory is None else add(factory)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its factory (e.g. to re-register it in a notebook)."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """Return the factory registered as ``name``."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.slot} block {name!r}; {did_you_mean(name, self._entries)}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def describe(self) -> dict[str, str]:
        """Each name with the first line of its block's docstring."""
        out = {}
        for name, obj in self._entries.items():
            doc = (getattr(obj, "func", obj).__doc__ or "").strip().splitlines()
            out[name] = doc[0] if doc else ""
        return out
