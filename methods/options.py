"""Method options: each field declared once, with its help, type and range; one check for every options dataclass.

peft's rule (a config dataclass per tuner, every field with a help string, checks in `__post_init__` raising
ValueError with the reason), kept declarative: a field is `option(default, help, kind=..., low=..., high=...)`, and
`Options.__post_init__` checks every field against what it declares, in field order, raising the first problem in one
line that names the method, the option, what it accepts, the field's example where it gives one, and the value:
"LoRA rank must be a positive integer (e.g. rank=8), got 0."

What a single field cannot say stays with the method: rules joining two fields (repadapter's groups dividing
hidden_dim, sidetune's two weight sources) in the options class's own `__post_init__`, after this check; rules that
need the backbone (an adapter reduction dividing the width, partial_k's k up to the depth) where the method builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

# The kinds an option can have, as messages name them. A bool is an int in Python: integers and numbers refuse it.
KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "the path of a file"}


def bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Rule:
    """What one option accepts; `option()` keeps it in the field's metadata under "rule"."""

    kind: type | None  # a key of KINDS; None: any value, left to the field's own parser (VPT's prompt_layers)
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is refused (value > low)
    high_open: bool = False
    choices: tuple | None = None
    positive: bool = False  # worded "a positive integer" (low 1) / "a positive number" (above 0)
    hint: str = ""  # an example or the source's value, shown in parentheses
    optional: bool = False  # None accepted: the field's default is None, "the method decides"

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
                return False
            if isinstance(value, float) and not math.isfinite(value):
                return False
        elif self.kind is not None and not isinstance(value, (str, Path) if self.kind is Path else self.kind):
            return False
        if self.choices is not None and not any(value == c and isinstance(value, bool) == isinstance(c, bool)
                                                for c in self.choices):  # True is not 1, nor 1 True
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        """What the option accepts, as a message says it: "an integer in [63, 1024]", "one of prepend, pad, below"."""
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        noun = KINDS.get(self.kind, "given")
        if self.positive:
            return f"a positive {noun.split()[-1]}"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{bound(self.low)}, {bound(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {bound(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {bound(self.high)}"
        return noun


def option(default, help: str, *, kind: type | None, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple | None = None, positive: bool = False,
           hint: str = "") -> Any:
    """An options field: its default, its help (what it does, the source's value) and what it accepts: `kind` (a key
    of KINDS; float takes ints too), an inclusive range [low, high] (`low_open` / `high_open` exclude an end),
    `choices`, or `positive` (integers from 1, numbers above 0). A default of None is accepted (the method's own
    default). `hint` is the example a refusal shows."""
    if positive:
        low, low_open = (1, False) if kind is int else (0, True)
    rule = Rule(kind, low, high, low_open, high_open, choices, positive, hint, optional=default is None)
    if kind not in (*KINDS, None) or (positive and kind not in (int, float)) or not rule.accepts(default):
        raise TypeError(f"option(): kind {kind!r}, positive={positive} and default {default!r} do not fit: kind is one "
                        f"of {list(KINDS)} (int or float where positive).")
    return field(default=default, metadata={"help": help, "rule": rule})


def drop_path_option() -> Any:
    """The frozen backbone's stochastic depth while a method trains (backbones.Family.set_drop_path), one declaration
    for the methods whose official training scripts build the backbone with timm's drop_path_rate (0.1 in Convpass',
    FacT's and RepAdapter's, among others; RECIPE=paper sets each one's). 0, the default, is this suite's protocol for
    every frozen backbone (the VPT code's: its modules stay deterministic), so that methods compare on one backbone."""
    return option(0.0, "stochastic depth of the frozen blocks while training, rising to this rate at the last block "
                  "(official code's recipe 0.1; default 0: the suite's frozen backbone)", kind=float, low=0, high=1,
                  high_open=True, hint="the official code's 0.1")


def rule_of(f) -> Rule:
    if "rule" not in f.metadata or not f.metadata.get("help"):
        raise TypeError(f"Options field {f.name!r} is not declared with methods.options.option(default, help, ...).")
    return f.metadata["rule"]


@dataclass
class Options:
    """The base of every method's options dataclass (`TuningModule.options_cls`): construction checks each field
    against its `option()` declaration. A subclass with a rule joining fields calls `super().__post_init__()` first."""

    method: ClassVar[str] = ""  # how messages name the method; "" = the class name less "Options" (LoRAOptions: LoRA)

    def __post_init__(self):
        method = self.method or type(self).__name__.removesuffix("Options")
        for f in fields(self):
            rule, value = rule_of(f), getattr(self, f.name)
            if not rule.accepts(value):
                hint = f" ({rule.hint})" if rule.hint else ""
                raise ValueError(f"{method} {f.name} must be {rule.describe()}{hint}, got {value!r}.")
