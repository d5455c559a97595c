"""Registry of tuning methods: one name -> one LightningModule class (timm's `register_model` pattern).

The classes are TuningModule subclasses (methods/base.py); this module does not import it, since base.py reads the
registry (the methods of a family, for its refusal message): imports go one way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from backbones import closest_name

MethodClass = TypeVar("MethodClass", bound=type)  # a TuningModule subclass

_METHODS: dict[str, type] = {}
# "<prefix>:<name>" names resolved by a function instead of the table (`peft:<type>`, methods/peft_zoo.py)
_PREFIXES: dict[str, Callable[[str], type]] = {}


def register_method(name: str):
    """Class decorator adding a tuning method under `name` (lowercase, unique)."""

    def decorate(cls: MethodClass) -> MethodClass:
        if name != name.lower() or not name.isidentifier():
            raise ValueError(f"Method name {name!r} must be a lowercase identifier, e.g. 'vpt_deep'.")
        if name in _METHODS:
            raise ValueError(f"Method {name!r} is already registered by {_METHODS[name].__qualname__}.")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    """Registered method names, in registration order (the paper's order first)."""
    return list(_METHODS)


def register_prefix(prefix: str, resolve: Callable[[str], type]) -> None:
    """Resolve every method name "<prefix>:<rest>" by `resolve(rest)`, which returns a class or raises ValueError."""
    if prefix in _PREFIXES:
        raise ValueError(f"Method prefix {prefix!r} is already registered.")
    _PREFIXES[prefix] = resolve


def get_method_class(name: str) -> type:
    prefix, colon, rest = name.partition(":")
    if colon and prefix in _PREFIXES:
        return _PREFIXES[prefix](rest)
    if name not in _METHODS:
        known = list_methods()
        raise ValueError(f"Unknown method {name!r}.{closest_name(name, known)} Known methods: {', '.join(known)}.")
    return _METHODS[name]


# --- each method's own facts, as figures, tables and the grid read them ------------------------------------
def label(name: str) -> str:
    """How figures and tables name a method; an unregistered name (e.g. an old result's) as it is."""
    return (_METHODS[name].label or name) if name in _METHODS else name


def color(name: str) -> str:
    return _METHODS[name].color if name in _METHODS else "#7f7f7f"


def table_order(names) -> list[str]:
    """VPT Table 1's row order first, then the other registered methods in registration order, then unknown names
    alphabetically."""
    registered = list(_METHODS)

    def key(name: str):
        row = _METHODS[name].paper_row if name in _METHODS else None
        return (row is None, row or 0, registered.index(name) if name in _METHODS else len(registered), name)

    return sorted(set(names), key=key)


def methods_for_family(family: str) -> list[str]:
    """The registered methods defined for a backbone family (their class fact `families`), in registration order."""
    return [name for name, cls in _METHODS.items() if family in cls.families]


def support_matrix() -> dict[str, tuple[str, ...]]:
    """Method -> the backbone families it supports, in Table 1's order: what docs/backbones.md shows."""
    return {name: _METHODS[name].families for name in table_order(_METHODS)}


def fig3_methods() -> list[str]:
    """The six protocols of the paper's Fig. 3 (the default grid), in Table 1's order."""
    return table_order(name for name, cls in _METHODS.items() if cls.in_fig3)
