"""The command-line value types every entry point shares: lists, switches and method options.

`make` passes each variable given on its command line as the flag of the same name (`make grid SEEDS=0,1 WANDB=1`
runs `--seeds="0,1" --wandb="1"`), so lists take commas or spaces and switches take an optional 1/0.
"""

from __future__ import annotations

import argparse
import re

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


def method_option(text: str) -> tuple[str, object]:
    """`key=value` with value parsed as YAML (so 10 -> int, 0.1 -> float, null -> None, true -> True)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"method option {text!r} must look like key=value, e.g. prompt_length=10")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def method_options(text: str) -> list[tuple[str, object]]:
    """METHOD_ARGS: space- or comma-separated key=value pairs, e.g. "prompt_length=10 prompt_dropout=0"."""
    return [method_option(item) for item in split_list(text)]


def add_method_options(p: argparse.ArgumentParser, help: str) -> None:
    """--method-arg KEY=VALUE (repeatable) and --method-args "k=v k=v" (METHOD_ARGS=), both into `method_options`."""
    p.add_argument("--method-arg", dest="method_options", action="append", type=method_option, default=[],
                   metavar="KEY=VALUE", help=help + " (repeatable)")
    p.add_argument("--method-args", dest="method_options_list", type=method_options, default=[],
                   metavar='"K=V ..."', help="several method options at once (METHOD_ARGS=)")


def merged_method_options(args: argparse.Namespace) -> dict:
    """--method-args first, then each --method-arg (a later value for the same key wins)."""
    return dict(args.method_options_list + args.method_options)
