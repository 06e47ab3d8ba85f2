"""String-keyed tables of interchangeable blocks, one table per slot, with a checked contract."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from vitzoo.blocks.options import BlockOptions
from vitzoo.errors import did_you_mean

T = TypeVar("T", bound=Callable)

# A probe calls a freshly built block once on a tiny input made from its constructor arguments and
# returns (what came out, the shape the slot's contract promises: one per map for a block returning several).
Probe = Callable[[nn.Module, tuple[Any, ...]], tuple[Any, tuple]]


class BlockContractError(TypeError):
    """A registered block does not follow its slot's contract (constructor arguments or shapes)."""


def token_probe(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, tuple[int, ...]]:
    """Probe for token-wise slots (attn, mlp, norm, block): ``(b, n, dim) -> (b, n, dim)``, ``dim = args[0]``."""
    x = torch.randn(2, 5, args[0], **like_module(module))
    return module(x), tuple(x.shape)


def like_module(module: nn.Module) -> dict[str, Any]:
    """Device and dtype of a module's first parameter, so a probe input lives where the block does."""
    param = next(module.parameters(), None)
    return {"device": param.device, "dtype": param.dtype} if param is not None else {}


class BlockTable(Generic[T]):
    """Maps names to block factories for one slot (``"mlp"``, ``"norm"``, ...).

    A factory is a class, a function or a ``functools.partial`` of one, called with the slot's documented
    constructor arguments; an entry registered with an options class (:mod:`vitzoo.blocks.options`) is
    also given ``options=<instance>``, the values the spec chose for it. Unknown names raise a
    ``ValueError`` listing the valid names. Blocks registered with ``verify=True`` (the user's, via
    :func:`vitzoo.register_block`) are called once on a tiny input the first time a model builds them,
    so a contract violation surfaces as a
    :class:`BlockContractError` naming the slot, the block and the contract, not deep inside torch.
    Aliases (``"gap"`` for ``"avg"``) are other names for an entry; specs store the canonical name.
    """

    def __init__(self, slot: str, contract: str, probe: Probe | None = token_probe) -> None:
        self.slot = slot
        self.contract = contract
        self.probe = probe
        self._entries: dict[str, T] = {}
        self._options: dict[str, type[BlockOptions] | None] = {}
        self._aliases: dict[str, str] = {}
        self._unverified: set[str] = set()

    def register(
        self, name: str, factory: T | None = None, *, options: type[BlockOptions] | None = None,
        overwrite: bool = False, verify: bool = False,
    ):
        """Add ``factory`` under ``name``, taking the options ``options`` declares (None: no options);
        usable as ``table.register(name)`` class decorator."""

        def add(obj: T) -> T:
            if not callable(obj):
                raise TypeError(f"{self.slot} block {name!r} must be a class or callable, got {obj!r}")
            if options is not None and not (isinstance(options, type) and issubclass(options, BlockOptions)):
                raise TypeError(f"{self.slot} block {name!r}: options must be a BlockOptions dataclass, "
                                f"got {options!r}")
            if (name in self._entries or name in self._aliases) and not overwrite:
                raise ValueError(
                    f"{self.slot} block {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._entries[name] = obj
            self._options[name] = options
            self._unverified.discard(name)
            if verify:
                self._unverified.add(name)
            return obj

        return add if factory is None else add(factory)

    def alias(self, alias: str, name: str) -> None:
        """Let ``alias`` stand for the entry ``name`` (``"gap"`` -> ``"avg"``)."""
        self.get(name)
        self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The entry name an alias stands for; other names come back unchanged."""
        return self._aliases.get(name, name)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its factory (e.g. to re-register it in a notebook)."""
        self.get(name)
        self._unverified.discard(name)
        self._options.pop(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """Return the factory registered as ``name`` (or an alias of it)."""
        try:
            return self._entries[self.canonical(name)]
        except KeyError:
            raise ValueError(f"unknown {self.slot} block {name!r}; {did_you_mean(name, self.known_names())}") from None

    def options_class(self, name: str) -> type[BlockOptions] | None:
        """The options class entry ``name`` (or an alias of it) declares; None if it takes no options."""
        self.get(name)
        return self._options[self.canonical(name)]

    def build(self, name: str, *args: Any, options: BlockOptions | None = None) -> nn.Module:
        """Construct block ``name`` with the slot's arguments and, if the entry declares options, ``options``
        (its defaults when None); check the contract of a user block once."""
        factory, declared = self.get(name), self.options_class(name)
        if options is not None and not isinstance(options, declared or ()):
            raise TypeError(f"{self.slot} block {name!r} takes {declared.__name__ if declared else 'no options'}, "
                            f"got {type(options).__name__}")
        kwargs = {} if declared is None else {"options": declared() if options is None else options}
        try:
            module = factory(*args, **kwargs)
        except TypeError as err:
            if _binds(factory, args, kwargs):
                raise
            shown = ", ".join([*map(_short, args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])
            raise self._violation(name, f"its constructor cannot take ({shown}): {err}") from err
        except ValueError as err:  # a block refusing the spec's sizes: say which slot's choice it was
            raise ValueError(f"{self.slot} block {name!r}: {err}") from None
        if name in self._unverified and self.probe is not None:
            self._verify(name, module, args)
        return module

    def _verify(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not isinstance(module, nn.Module):
            raise self._violation(name, f"it built a {type(module).__name__}, not a torch.nn.Module")
        was_training = module.training
        try:
            with torch.no_grad():
                out, expected = self.probe(module.eval(), args)
        except Exception as err:  # any failure of user code on the probe input is a contract problem
            raise self._violation(name, f"its forward failed on a probe input: {type(err).__name__}: {err}") from err
        finally:
            module.train(was_training)
        got = _shapes(out)
        if got != expected:
            raise self._violation(name, f"its forward returned {got}, expected shape {expected}")
        self._unverified.discard(name)

    def _violation(self, name: str, problem: str) -> BlockContractError:
        return BlockContractError(
            f"{self.slot} block {name!r} does not follow the {self.slot!r} slot contract: {problem}. "
            f"Contract: {self.contract}. Fix the block's __init__/forward to match (see docs/custom_blocks.md)."
        )

    def names(self) -> list[str]:
        return list(self._entries)

    def known_names(self) -> list[str]:
        """Entry names and aliases: every name a spec may use."""
        return [*self._entries, *self._aliases]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def describe(self) -> dict[str, str]:
        """Each name with the first paragraph of its block's docstring (and the arguments a partial binds)."""
        out = {}
        for name, obj in self._entries.items():
            doc = " ".join((getattr(obj, "func", obj).__doc__ or "").strip().split("\n\n")[0].split())
            bound = _short(obj) if isinstance(obj, partial) else ""
            out[name] = f"{doc} [{bound}]" if bound else doc
        return out


def _shapes(out: Any) -> Any:
    """What a block returned, as its contract states it: a tensor's shape, a list of tensors' shapes (a neck's
    maps), or the type's name for anything else."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, list | tuple) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(tuple(t.shape) for t in out)
    return type(out).__name__


def _binds(factory: Callable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the factory's signature accepts these arguments (unknown signatures count as yes)."""
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _short(value: Any) -> str:
    """An argument as a message shows it: numbers and names, not module reprs; a partial as a call."""
    if isinstance(value, int | float | bool | str | tuple | type(None)):
        return repr(value)
    if isinstance(value, partial):
        bound = [*map(_short, value.args), *(f"{k}={_short(v)}" for k, v in value.keywords.items())]
        return f"{_short(value.func)}({', '.join(bound)})"
    return getattr(value, "__name__", type(value).__name__)
