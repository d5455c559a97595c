"""Registry of tuning methods: one name -> one LightningModule class (timm's `register_model` pattern)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from methods.base import TuningModule

_METHODS: dict[str, type[TuningModule]] = {}


def register_method(name: str):
    """Class decorator adding a tuning method under `name` (lowercase, unique)."""

    def decorate(cls: type[TuningModule]) -> type[TuningModule]:
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


def closest_name(name: str, known: list[str]) -> str:
    """' Did you mean X?' hint for an unknown name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def get_method_class(name: str) -> type[TuningModule]:
    if name not in _METHODS:
        known = list_methods()
        raise ValueError(f"Unknown method {name!r}.{closest_name(name, known)} Known methods: {', '.join(known)}.")
    return _METHODS[name]
