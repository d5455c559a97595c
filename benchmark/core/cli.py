"""The command-line value types every entry point shares: lists, switches and method options.

`make` passes each variable given on its command line as the flag of the same name (`make grid SEEDS=0,1 WANDB=1`
runs `--seeds="0,1" --wandb="1"`), so lists take commas or spaces and switches take an optional 1/0.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import typing

import yaml

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def split_list(text: str) -> list[str]:
    """'a,b', 'a b' or 'a, b' -> ['a', 'b']."""
    return [item for item in re.split(r"[,\s]+", text) if item]


def comma_list(kind):
    """An argparse type: a comma (or space) list of `kind` values; a bad item names the list and the reason."""

    def parse(text: str) -> list:
        try:
            return [kind(item) for item in split_list(text)]
        except ValueError as err:  # ConfigError is a ValueError
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    return parse


def on_off(text: str) -> bool:
    value = str(text).strip().lower()
    if value in TRUE or value in FALSE:
        return value in TRUE
    raise argparse.ArgumentTypeError(f"a switch takes 1 or 0 (true/false), got {text!r}")


def add_switch(p: argparse.ArgumentParser, *flags: str, help: str, default: bool = False, dest: str | None = None):
    """`--flag` alone turns it on; `--flag=0` / `--flag=1` (what make passes for FLAG=0 / FLAG=1) set it."""
    return p.add_argument(*flags, nargs="?", const=True, default=default, type=on_off, metavar="0|1", help=help,
                          dest=dest)


def option_value(key: str, text: str, variable: str = "METHOD_ARGS"):
    """One option's value parsed as YAML (10 -> int, 0.1 -> float, null -> None, true -> True). An empty value is
    refused, not read as None: `prompt_length=` would otherwise train with the method's default, recorded as asked."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{variable} {key}= has no value; give {key}=<value> (null for none), or "
                                         f"leave {key} out to keep the recipe's value")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise argparse.ArgumentTypeError(f"{variable} {key}={text} is not a value ({problem}); close the bracket or "
                                         f"quote text, e.g. {key}=[1,2] or {key}='a b'") from None


def method_option(text: str, variable: str = "METHOD_ARGS") -> tuple[str, object]:
    """`key=value` with value parsed as YAML (so 10 -> int, 0.1 -> float, null -> None, true -> True)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{variable} item {text!r} must look like key=value, e.g. prompt_length=10")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    return key, option_value(key, value, variable)


def method_options(text: str, variable: str = "METHOD_ARGS") -> list[tuple[str, object]]:
    """METHOD_ARGS: space- or comma-separated key=value pairs, e.g. "prompt_length=10 prompt_dropout=0"."""
    return [method_option(item, variable) for item in split_list(text)]


def add_method_options(p: argparse.ArgumentParser, help: str) -> None:
    """--method-arg KEY=VALUE (repeatable) and --method-args "k=v k=v" (METHOD_ARGS=), both into `method_options`."""
    p.add_argument("--method-arg", dest="method_options", action="append", type=method_option, default=[],
                   metavar="KEY=VALUE", help=help + " (repeatable)")
    p.add_argument("--method-args", dest="method_options_list", type=method_options, default=[],
                   metavar='"K=V ..."', help="several method options at once (METHOD_ARGS=)")


def merged_method_options(args: argparse.Namespace) -> dict:
    """--method-args first, then each --method-arg (a later value for the same key wins)."""
    return dict(args.method_options_list + args.method_options)


def option_grid(text: str) -> list[dict]:
    """OPTIONS: method options to sweep, `key=v1,v2;key2=v3,v4` (keys apart by ';', values by ','; each value parsed
    as YAML like METHOD_ARGS), as the list of their combinations, the first key varying slowest:
    "prompt_length=1,5;prompt_dropout=0,0.1" -> [{1, 0}, {1, 0.1}, {5, 0}, {5, 0.1}] (as dicts)."""
    axes: dict[str, list] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"OPTIONS part {part!r} must look like key=v1,v2 (keys apart by ';'), "
                                             'e.g. OPTIONS="prompt_length=1,5;prompt_dropout=0,0.1"')
        key, _, values = part.partition("=")
        key = key.strip().replace("-", "_")
        parsed = [option_value(key, v.strip(), "OPTIONS") for v in values.split(",") if v.strip()]
        if key in axes:
            raise argparse.ArgumentTypeError(f"OPTIONS names {key!r} twice; give its values once: {key}=v1,v2")
        if not parsed:
            raise argparse.ArgumentTypeError(f"OPTIONS {key!r} has no value; e.g. {key}=1,5")
        if any(a == b for i, a in enumerate(parsed) for b in parsed[i + 1:]):
            raise argparse.ArgumentTypeError(f"OPTIONS {key!r} lists a value twice: {values.strip()}")
        axes[key] = parsed
    if not axes:
        raise argparse.ArgumentTypeError('OPTIONS is empty; e.g. OPTIONS="prompt_length=1,5,10"')
    return [dict(zip(axes, point, strict=True)) for point in itertools.product(*axes.values())]


def one_option_point(text: str) -> dict:
    """--options of one run: OPTIONS' syntax with one value per key (the run a grid point names)."""
    points = option_grid(text)
    if len(points) != 1:
        raise argparse.ArgumentTypeError(f"OPTIONS {text!r} gives {len(points)} runs; one run takes one value per "
                                         "key (a grid takes several: make grid OPTIONS=...)")
    return points[0]


def extra_test_sets(text: str) -> dict[str, str]:
    """EXTRA_TEST: `name=dir,name2=dir2` -> {name: dir} (commas only: a folder may hold spaces)."""
    found: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise argparse.ArgumentTypeError(f"EXTRA_TEST item {item!r} must look like name=dir, "
                                             "e.g. EXTRA_TEST=sketch=/data/imagenet-sketch,r=/data/imagenet-r")
        if name.strip() in found:
            raise argparse.ArgumentTypeError(f"EXTRA_TEST names {name.strip()!r} twice; each set needs its own name")
        found[name.strip()] = folder.strip()
    return found


def as_argument_type(parse):
    """argparse shows a type's own message only for ArgumentTypeError: a check's ValueError (ConfigError) becomes
    one, so `--fraction 2` says what FRACTION must be, not "invalid check_fraction value"."""

    def typed(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


def add_settings(p: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of the dataclass `config_cls` (benchmark.core.config.RunConfig), from what `setting()`
    declared there: flags, help, default, type (the field's annotation or its `parse`), choices, switches and their
    `off` flag. `method_options` takes --method-arg (repeatable) and --method-args (METHOD_ARGS=)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta, dest = f.metadata, f.name
        flags = meta.get("flags") or (f"--{dest.replace('_', '-')}",)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dest == "method_options":
            add_method_options(p, meta["help"])
        elif hints[dest] is bool:
            add_switch(p, *flags, default=default, help=meta["help"], dest=dest)
            if meta.get("off"):
                p.add_argument(meta["off"], dest=dest, action="store_false", help=f"{flags[0]}=0")
        else:
            plain = next(t for t in typing.get_args(hints[dest]) or (hints[dest],) if t is not type(None))
            kind = as_argument_type(meta["parse"]) if meta.get("parse") else plain  # plain: argparse's own message
            p.add_argument(*flags, dest=dest, default=default, type=kind, choices=meta.get("choices"),
                           metavar=meta.get("metavar"), help=meta["help"])


def settings_from_args(args: argparse.Namespace) -> dict:
    """The parsed flags of `add_settings` as the dataclass's keyword arguments (the two method-option flags merged)."""
    values = vars(args) | {"method_options": merged_method_options(args)}
    del values["method_options_list"]
    return values
