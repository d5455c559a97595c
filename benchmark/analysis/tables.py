"""Markdown tables: the suite's one table writer, and the Table-1 style results table."""

from __future__ import annotations

import math

import pandas as pd

from methods.registry import label, table_order


def number(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown would need the tabulate package for these few lines)."""
    cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join([":---"] + ["---:"] * (len(frame.columns) - 1)) + "|")
    return "\n".join(lines)

def table_markdown(table: pd.DataFrame, hparams: pd.DataFrame) -> str:
    tasks = [c for c in table.columns if f"{c}_std" in table.columns]
    groups = [c for c in table.columns if c.endswith(" mean")]
    shown = pd.DataFrame({"Method": table["label"], "Tuned params (%)": table["tuned_percent"].map(
        lambda v: f"{v:.3g}")})
    for task in tasks:
        shown[task] = [number(m) + (f" ± {number(s)}" if n > 1 else "")
                       for m, s, n in zip(table[task], table[f"{task}_std"], table["seeds"], strict=True)]
    for group in groups:
        shown[group] = table[group].map(number)
    shown["Mean"] = table["mean"].map(number)
    for column in [c for c in table.columns if c.startswith("extra_test/")]:  # domain shift (analysis/ablations.py)
        shown[f"{column.split('/')[1]} (extra test)"] = table[column].map(number)
    if "beats_full" in table:
        shown["Tasks > Full"] = [f"{int(b)}/{int(n)}" if not pd.isna(b) else "–"
                                 for b, n in zip(table["beats_full"], table["tasks_compared"], strict=True)]
    seeds = int(table["seeds"].max())
    text = [f"Test top-1 (%) at {100 * table['train_fraction'].iloc[0]:g}% of the training data, mean"
            f"{f' ± std over {seeds} seeds' if seeds > 1 else ' (1 seed)'}.", "", markdown(shown)]
    if not hparams.empty:
        rank = {m: i for i, m in enumerate(table_order(hparams["method"]))}
        picked = hparams.assign(rank=hparams["method"].map(rank), Method=hparams["method"].map(label),
                                Fraction=hparams["train_fraction"].map(lambda f: f"{100 * f:g}%"),
                                choice=[f"{lr:g} / {wd:g}"
                                        for lr, wd in zip(hparams["lr"], hparams["weight_decay"], strict=True)])
        pivot = picked.pivot_table(index=["rank", "train_fraction", "Method", "Fraction"], columns="dataset",
                                   values="choice", aggfunc="first").reset_index().drop(columns=["rank",
                                                                                                 "train_fraction"])
        pivot.columns.name = None
        text += ["", "Selected by the paper's protocol (val top-1 at the last epoch; ties -> smaller lr): lr / wd.",
                 "", markdown(pivot.fillna("–"))]
    return "\n".join(text) + "\n"
