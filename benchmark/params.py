"""Tuned and total parameters of every registered method on one backbone (head included in tuned).

    python -m benchmark.params --backbone vit_base_patch16_224 --num-classes 200 \
        [--method-args "prompt_length=10 partial_k.k=2 lora.rank=4"] [--methods a,b] [--csv]

A method option `key=value` applies to every method that has the option; `method.key=value` to that method only
(both partial_k and mlp_k have a `k`). By default every method that supports the backbone's family is counted;
`--support-matrix` prints which methods support which family, `--family-table` each family's row, `--peft-table` the
peft tuners' table (methods/peft_table.py: layers, options, families, merging; docs/methods.md). Models are built
on PyTorch's meta device from the architecture alone (pretrained=False, no weights, no memory for values), so a ViT-B
count takes about a second per method and needs no download.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import pandas as pd
import torch

from backbones import FAMILIES, create_backbone, family_of, family_table
from benchmark.core.cli import add_switch, comma_list, method_options
from methods import create_method, get_method_class, list_methods
from methods.registry import label, methods_for_family, support_matrix


def options_for(method: str, given: list[tuple[str, object]]) -> dict:
    """The options of `given` that reach `method`: `key` where the method has it, `method.key` always."""
    accepted = {f.name for f in fields(get_method_class(method).options_cls)}
    chosen = {}
    for key, value in given:
        target, _, option = key.rpartition(".")
        if target == method or (not target and option in accepted):
            chosen[option] = value
    return chosen


def count_params(backbone: str, num_classes: int, methods: list[str] | None = None,
                 given: list[tuple[str, object]] = ()) -> pd.DataFrame:
    """One row per method: method, tuned_params, total_params, tuned_percent. By default every method that supports
    the backbone's family; methods named explicitly must support it."""
    with torch.device("meta"):
        family = family_of(create_backbone(backbone, pretrained=False)).name  # create_backbone refuses the rest
    chosen = methods or methods_for_family(family)
    if not chosen:
        raise ValueError(f"No registered method supports {family} backbones yet (see --support-matrix).")
    rows = []
    for method in chosen:
        with torch.device("meta"):
            model = create_method(method, create_backbone(backbone, pretrained=False), num_classes,
                                  **options_for(method, given))
        tuned, total = model.tuned_params, model.total_params
        rows.append({"method": method, "tuned_params": tuned, "total_params": total,
                     "tuned_percent": round(100 * tuned / total, 4)})
    return pd.DataFrame(rows)


def support_markdown() -> str:
    """The methods x backbone-families table of docs/backbones.md, from each method's class fact `families`."""
    header = "| Method | " + " | ".join(FAMILIES) + " |\n|:---|" + ":---:|" * len(FAMILIES) + "\n"
    rows = [f"| `{m}` ({label(m)}) | " + " | ".join("✓" if f in families else "–" for f in FAMILIES) + " |"
            for m, families in support_matrix().items()]
    return header + "\n".join(rows) + "\n"


def peft_markdown() -> str:
    """The peft tuners' table of docs/methods.md, from methods/peft_table.py's rows (and the types it refuses)."""
    from methods.peft_table import TUNERS, UNSUPPORTED, PeftOptions

    lines = ["| Method | peft type | Layers (default targets) | Options not peft's | Families | Merges | Starts as "
             "backbone | Paper |", "|:---|:---|:---|:---|:---|:---:|:---:|:---|"]
    for name, row in TUNERS.items():
        options = ", ".join(f"`{key}={value}`" for key, value in row.defaults.items()) or "–"
        if not issubclass(get_method_class(name).options_cls, PeftOptions):
            options = "its own (below)"  # the seven hand-tuned wrappers of methods/peft_tuners.py
        lines.append(f"| `{name}` ({row.label}) | `peft:{row.peft_type}` | {row.layers} | {options} | "
                     f"{', '.join(row.families)} | {'✓' if row.merges else '–'} | {'✓' if row.identity else '–'} | "
                     f"{row.paper} |")
    lines += ["", "Refused (`METHOD=peft:<type>` says why):", ""]
    lines += [f"- `{peft_type}`: {why}." for peft_type, why in UNSUPPORTED.items()]
    return "\n".join(lines) + "\n"


def readable(table: pd.DataFrame) -> str:
    return table.to_string(index=False, formatters={"tuned_params": "{:,d}".format, "total_params": "{:,d}".format,
                                                    "tuned_percent": "{:.4f}".format})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_base_patch16_224",
                   help="a timm model of a supported family (ViT, Swin, ResNet, ConvNeXt)")
    p.add_argument("--num-classes", type=int, default=200, help="classes of the new head (CUB-200: 200)")
    p.add_argument("--methods", type=comma_list(str), help="comma list (default: every registered method)")
    p.add_argument("--method-args", type=method_options, default=[], metavar='"K=V M.K=V ..."',
                   help="method options: key=value for every method with that option, method.key=value for one")
    add_switch(p, "--csv", help="print CSV instead of a table")
    p.add_argument("--list-methods", action="store_true", help="list the registered methods and exit")
    add_switch(p, "--support-matrix", help="print the methods x backbone-families table (Markdown) and exit")
    add_switch(p, "--family-table", help="print the backbone families' rows (Markdown) and exit")
    add_switch(p, "--peft-table", help="print the peft tuners' table (Markdown) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list_methods:
        print("Methods (METHOD=): " + ", ".join(f"{m} ({label(m)})" for m in list_methods()))
        return 0
    if args.support_matrix:
        print(support_markdown(), end="")
        return 0
    if args.family_table:
        print(family_table(), end="")
        return 0
    if args.peft_table:
        print(peft_markdown(), end="")
        return 0
    if args.num_classes < 1:
        print(f"error: --num-classes must be >= 1, got {args.num_classes}.", file=sys.stderr)
        return 2
    try:
        table = count_params(args.backbone, args.num_classes, args.methods, args.method_args)
    except ValueError as err:  # unknown backbone or method, an option a method rejects: the message names the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table.to_csv(index=False, float_format="%.4f") if args.csv else readable(table), end="\n" * (not args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
