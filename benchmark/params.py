"""Tuned and total parameters of every registered method on one backbone (head included in tuned).

    python -m benchmark.params --backbone vit_base_patch16_224 --num-classes 200 [--prompt-length 50]
        [--adapter-reduction 8] [--lora-rank 8] [--partial-k 1] [--mlp-k 3] [--csv]

Models are built on PyTorch's meta device from the architecture alone (pretrained=False, no weights, no
memory for values), so a ViT-B count takes about a second per method and needs no download.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd
import torch

from methods import create_backbone, create_method, list_methods

# CLI flag -> (methods it configures, their option name); None leaves the method's own default.
FLAG_OPTIONS = {
    "prompt_length": (("vpt_shallow", "vpt_deep"), "prompt_length"),
    "adapter_reduction": (("adapter",), "reduction"),
    "lora_rank": (("lora",), "rank"),
    "partial_k": (("partial_k",), "k"),
    "mlp_k": (("mlp_k",), "k"),
}


def method_options(method: str, flags: dict) -> dict:
    """The options the CLI flags set for `method`."""
    return {option: flags[flag] for flag, (methods, option) in FLAG_OPTIONS.items()
            if method in methods and flags.get(flag) is not None}


def count_params(backbone: str, num_classes: int, methods: list[str] | None = None, **flags) -> pd.DataFrame:
    """One row per method: method, tuned_params, total_params, tuned_percent."""
    rows = []
    for method in methods or list_methods():
        with torch.device("meta"):
            model = create_method(method, create_backbone(backbone, pretrained=False), num_classes,
                                  **method_options(method, flags))
        tuned, total = model.tuned_params, model.total_params
        rows.append({"method": method, "tuned_params": tuned, "total_params": total,
                     "tuned_percent": round(100 * tuned / total, 4)})
    return pd.DataFrame(rows)


def readable(table: pd.DataFrame) -> str:
    return table.to_string(index=False, formatters={"tuned_params": "{:,d}".format, "total_params": "{:,d}".format,
                                                    "tuned_percent": "{:.4f}".format})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_base_patch16_224", help="any timm ViT name")
    p.add_argument("--num-classes", type=int, default=200, help="classes of the new head (CUB-200: 200)")
    p.add_argument("--prompt-length", type=int, help="VPT prompt tokens p (default: the method's, 50)")
    p.add_argument("--adapter-reduction", type=int, help="adapter bottleneck = dim // R (default 8)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--partial-k", type=int, help="blocks tuned by partial_k (default 1)")
    p.add_argument("--mlp-k", type=int, help="layers of the mlp_k head (default 3)")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    backbone, num_classes, as_csv = args.pop("backbone"), args.pop("num_classes"), args.pop("csv")
    if num_classes < 1:
        print(f"error: --num-classes must be >= 1, got {num_classes}.", file=sys.stderr)
        return 2
    try:
        table = count_params(backbone, num_classes, **args)
    except ValueError as err:  # unknown backbone, an option a method rejects: the message names the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if as_csv:
        print(table.to_csv(index=False, float_format="%.4f"), end="")
    else:
        print(readable(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
