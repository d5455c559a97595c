"""Every registered method's options, one table: each field is declared with `methods.options.option()` (help, kind,
range) and the one check enforces what it declares. The accepted and refused values of a few fields are written here
by hand from the methods' sources and papers; for every other field the test reads its declaration and probes its
edges, and checks that numbers declare a range and switches take only true or false."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from methods import get_method_class, list_methods
from methods.options import Options, option

METHODS = list_methods()
# A value past a field's edge may trip a rule joining it to another field first: the companion keeps that one valid.
COMPANIONS = {("repadapter", "hidden_dim"): {"groups": 1},
              ("gralora", "r"): {"gralora_k": 1},  # peft: gralora_k divides r
              ("oft", "oft_block_size"): {"r": 8},  # peft: exactly one of r and oft_block_size above 0
              ("supertuning", "lora_alpha"): {"r": 8}}  # peft: an alpha needs an explicit r
# (method, field): (accepted, refused), by hand from each method's source, not read from the declarations.
BY_HAND = {
    ("full", "dropout"): ([0, 0.0, 0.5, 0.999], [1, 1.0, -0.01, math.nan, True, "0.1", None]),
    ("adapter", "reduction"): ([1, 8, 768], [0, -1, 8.0, 1.5, True, "8", math.inf, None]),
    ("vpt_deep", "prompt_length"): ([None, 1, 50, 200], [0, -1, 5.0, True, "5", math.nan]),
    ("vpt_deep", "prompt_dropout"): ([None, 0, 0.0, 0.1, 0.99], [1, 1.0, -0.1, False, math.nan, "0.1"]),
    ("vpt_shallow", "location"): ([None, "prepend", "pad", "below"], ["sideways", "", 1, True]),
    ("partial_k", "k"): ([1, 2, 12], [0, -1, 1.0, True, "two", None]),
    ("mlp_k", "dropout"): ([0, 0.1, 0.999], [1.0, -0.1, math.nan, "high"]),
    ("lora", "rank"): ([1, 8, 64], [0, -1, 2.5, 8.0, True, "eight"]),
    ("lora", "alpha"): ([1e-6, 1, 16.0], [0, 0.0, -1.0, math.inf, math.nan, True, "16"]),
    ("lora", "merge_for_eval"): ([True, False], [1, 0, "yes", "true", None]),
    ("convpass", "scale"): ([1e-6, 1.0, 100], [0, -1.0, math.inf, -math.inf, math.nan, True]),
    ("ssf", "init_std"): ([0, 0.0, 0.02, 1, 1.0], [-0.1, 1.01, math.nan, math.inf, "small", True]),
    ("sidetune", "side_input_size"): ([63, 224, 1024], [62, 1025, 2048, 224.0, 64.0, True, None]),
    ("sidetune", "side_weights"): ([None, "a.pth"], [3, 1.5, True, ["a.pth"]]),
    ("vqt", "num_queries"): ([1, 5, 1000], [0, 1001, 1.5, 1.0, True]),
    ("vqt", "query_dropout"): ([0, 0.1, 0.999], [1, 1.0, -0.01, "0.1", math.nan]),
    ("fact_tk", "scale"): ([0.01, 10.0, 100], [0, -1, math.inf, "big"]),
    ("boft", "block_size"): ([1, 4, 64], [0, -4, 4.0, True]),
}


def build(method: str, name: str, value):
    return get_method_class(method).options_cls(**COMPANIONS.get((method, name), {}), **{name: value})


def refuses(method: str, name: str, value) -> bool:
    """True where the options class refuses `value` for `name` with one line naming the option and the value."""
    try:
        build(method, name, value)
    except ValueError as err:
        message = str(err)
        assert f" {name} must be " in message and f"got {value!r}." in message and "\n" not in message, message
        return True
    return False


def probes(rule) -> tuple[list, list]:
    """(accepted, refused) values at the edges of a declaration, from the declaration itself."""
    if rule.kind is bool:
        return [True, False], [1, 0, "yes", "true"]
    if rule.choices is not None:
        return list(rule.choices), ["no-such-choice", 1]
    if rule.kind is None:
        return [], []
    if rule.kind in (str, Path):
        return ["a.pth"] + ([Path("a.pth")] if rule.kind is Path else []), [1, 1.5, True, ["a.pth"]]
    accepted, refused = [], ["x", [1]]
    step = 1 if rule.kind is int else 1e-6
    for edge, is_open, outward in ((rule.low, rule.low_open, -1), (rule.high, rule.high_open, 1)):
        if edge is not None:
            (refused if is_open else accepted).append(edge)
            refused.append(edge + outward * step)
            accepted.append(edge - outward * step if is_open else edge)
    if rule.kind is int:
        refused += [True, 1.5, float(accepted[0])]
    else:
        refused += [True, False, math.nan, math.inf, -math.inf]
    return accepted, refused


@pytest.mark.parametrize("method", METHODS)
def test_every_field_declares_its_help_kind_and_range(method):
    cls = get_method_class(method).options_cls
    assert issubclass(cls, Options)
    cls()  # the defaults pass their own declarations
    for f in fields(cls):
        rule = f.metadata.get("rule")
        assert rule is not None and f.metadata.get("help"), f"{method} {f.name}: declare it with option(default, help)"
        if rule.kind in (int, float):
            assert rule.low is not None or rule.high is not None, f"{method} {f.name}: a number needs a range"
        if rule.kind is bool:
            assert refuses(method, f.name, 1) and refuses(method, f.name, "yes")


@pytest.mark.parametrize("method", METHODS)
def test_each_declared_range_is_enforced_at_its_edges(method):
    for f in fields(get_method_class(method).options_cls):
        accepted, refused = probes(f.metadata["rule"])
        if not f.metadata["rule"].optional:
            refused.append(None)
        assert [v for v in accepted if refuses(method, f.name, v)] == [], f.name
        assert [v for v in refused if not refuses(method, f.name, v)] == [], f.name


@pytest.mark.parametrize(("method", "name"), list(BY_HAND))
def test_the_ranges_of_todays_options_written_by_hand(method, name):
    accepted, refused = BY_HAND[method, name]
    assert [v for v in accepted if refuses(method, name, v)] == []
    assert [v for v in refused if not refuses(method, name, v)] == []


def test_messages_name_the_method_option_range_example_and_value():
    with pytest.raises(ValueError) as err:
        build("lora", "rank", 0)
    assert str(err.value) == "LoRA rank must be a positive integer (e.g. rank=8), got 0."
    with pytest.raises(ValueError) as err:
        build("sidetune", "side_input_size", 62)
    assert str(err.value) == ("sidetune side_input_size must be an integer in [63, 1024] (AlexNet needs at least "
                              "63 px), got 62.")
    with pytest.raises(ValueError, match=r"^VPT location must be one of prepend, pad, below, got 'x'\.$"):
        build("vpt_deep", "location", "x")


def test_a_declaration_its_own_default_breaks_or_a_field_without_one_is_refused():
    with pytest.raises(TypeError, match="do not fit"):
        option(0, "a width", kind=int, low=1)
    with pytest.raises(TypeError, match="do not fit"):
        option(1, "a switch", kind=bool)

    @dataclass
    class Undeclared(Options):
        width: int = 8

    with pytest.raises(TypeError, match="'width' is not declared with methods.options.option"):
        Undeclared()
