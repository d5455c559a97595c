"""Does `SEARCH=halving` choose what the full search chooses? The measurement issue 30 asks for, per search cell of
two results folders that searched the same cells: one with the full search (the leaderboard's default), one with
successive halving (benchmark/sweeps/halving.py).

    python -m benchmark.report --results-dir <full search results> --compare-search <halving results> [--out DIR]

writes search_agreement.md and search_agreement.csv (default: <full>/figures). Per cell (dataset, backbone, method,
fraction, recipe; the budget records of both folders, benchmark/sweeps/budget.py): each search's choice (lr, weight
decay) and whether they are the same point; the accuracy lost by the halving choice, `full - halving`, twice: on the
finals (mean test top-1 of each folder's final runs, over the seeds both have) and on the points (test top-1 of the
full search's own run at each choice, one run set, so no seed noise between the two); the val gap, the full search's
val top-1 at its choice minus at the halving choice (how close the full search itself found the two: a gap of a few
val images is a near tie); and each search's epochs.
Totals: the cells, the share choosing the same point, the mean loss on the finals and on the points, and the halving
search's epochs over the full search's and over the finals'. Cells of one folder only are left out; few-shot and
option-grid cells too (the leaderboard has neither).

To measure without training the full search's finals again, run the halving search on a copy of the full folder's
`runs/` (docs/performance.md): where halving chooses the same point its finals are the same runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.analysis.aggregate import load_summary
from benchmark.analysis.tables import markdown, number
from benchmark.core.config import search_tag
from benchmark.core.store import read_budgets

KEYS = ["dataset", "backbone", "method", "train_fraction", "recipe"]  # a search cell
CHOICE = ["lr", "weight_decay"]


def choices(records: list[dict]) -> pd.DataFrame:
    """One row per plain cell of the budget records: its choice, its search's and its finals' epochs."""
    rows = [{key: record.get(key) for key in KEYS} | {
        "search": record.get("search"), "lr": float(record["selected_lr"]),
        "weight_decay": float(record["selected_weight_decay"]), "search_epochs": record.get("search_epochs"),
        "final_epochs": record.get("final_epochs")} for record in records
        if record.get("shots") is None and not record.get("options")]
    return pd.DataFrame(rows, columns=[*KEYS, "search", *CHOICE, "search_epochs", "final_epochs"])


def finals_by_seed(summary: pd.DataFrame) -> pd.DataFrame:
    """Test top-1 of every finished final run (trained on train+val, untagged), one row per cell and seed."""
    ok = summary[(summary["status"] == "ok") & (summary["tag"].fillna("").astype(str) == "")
                 & (summary["train_on"] == "trainval")]
    return ok[[*KEYS, "seed", "test_top1"]]


def point_top1(summary: pd.DataFrame, cell: dict, lr: float, weight_decay: float, split: str = "test") -> float:
    """`split` top-1 of the search's own run at (lr, weight decay) in `cell` (NaN when it has none): the full search
    trains each point once, at the search seed."""
    runs = summary[(summary["status"] == "ok") & (summary["tag"] == search_tag(lr, weight_decay))]
    for key in KEYS:
        runs = runs[runs[key] == cell[key]]
    return float(runs[f"{split}_top1"].mean()) if len(runs) else math.nan


def mean_over_common_seeds(full: pd.DataFrame, halving: pd.DataFrame) -> tuple[float, float]:
    """(full's mean, halving's mean) of one cell's finals over the seeds both folders have (NaN, NaN: none)."""
    common = sorted(set(full["seed"]) & set(halving["seed"]))
    if not common:
        return math.nan, math.nan
    return (float(full.set_index("seed").loc[common, "test_top1"].mean()),
            float(halving.set_index("seed").loc[common, "test_top1"].mean()))


def agreement(full_records: list[dict], halving_records: list[dict], full_summary: pd.DataFrame,
              halving_summary: pd.DataFrame) -> pd.DataFrame:
    """Per cell searched by both: the two choices, `same`, the finals' and the points' accuracy and loss, epochs."""
    cells = choices(full_records).merge(choices(halving_records), on=KEYS, suffixes=("_full", "_halving"))
    full_finals, halving_finals = finals_by_seed(full_summary), finals_by_seed(halving_summary)
    rows = []
    for _, cell in cells.iterrows():
        key = cell[KEYS].to_dict()
        in_cell = [(frame[KEYS] == pd.Series(key)).all(axis=1) for frame in (full_finals, halving_finals)]
        final_full, final_halving = mean_over_common_seeds(full_finals[in_cell[0]], halving_finals[in_cell[1]])
        point_full = point_top1(full_summary, key, cell["lr_full"], cell["weight_decay_full"])
        point_halving = point_top1(full_summary, key, cell["lr_halving"], cell["weight_decay_halving"])
        val_gap = (point_top1(full_summary, key, cell["lr_full"], cell["weight_decay_full"], "val")
                   - point_top1(full_summary, key, cell["lr_halving"], cell["weight_decay_halving"], "val"))
        same = bool(np.isclose(cell["lr_full"], cell["lr_halving"])
                    and np.isclose(cell["weight_decay_full"], cell["weight_decay_halving"]))
        rows.append(key | {
            "lr_full": cell["lr_full"], "weight_decay_full": cell["weight_decay_full"],
            "lr_halving": cell["lr_halving"], "weight_decay_halving": cell["weight_decay_halving"], "same": same,
            "final_full": final_full, "final_halving": final_halving, "final_lost": final_full - final_halving,
            "point_full": point_full, "point_halving": point_halving, "point_lost": point_full - point_halving,
            "val_gap": val_gap,
            "search_epochs_full": cell["search_epochs_full"], "search_epochs_halving": cell["search_epochs_halving"],
            "final_epochs": cell["final_epochs_halving"]})
    return pd.DataFrame(rows)


def totals(cells: pd.DataFrame) -> dict:
    """The issue's three numbers over every compared cell: same point, accuracy lost, compute."""
    halving_epochs = float(cells["search_epochs_halving"].sum())
    different = cells[~cells["same"]]
    return {"cells": len(cells), "same": int(cells["same"].sum()), "same_share": float(cells["same"].mean()),
            "val_gap_median": float(different["val_gap"].median()) if len(different) else math.nan,
            "final_lost_mean": float(cells["final_lost"].mean()), "final_lost_max": float(cells["final_lost"].max()),
            "point_lost_mean": float(cells["point_lost"].mean()),
            "halving_over_full_search": halving_epochs / float(cells["search_epochs_full"].sum()),
            "halving_over_finals": halving_epochs / float(cells["final_epochs"].sum())}


def agreement_markdown(cells: pd.DataFrame) -> str:
    """The totals in a few lines, then the cells, different choices first."""
    if cells.empty:
        return "No cell was searched in both folders.\n"
    t = totals(cells)
    lines = [f"- **Same point**: {t['same']} of {t['cells']} cells ({t['same_share']:.0%}); where they differ, the "
             "full search's val top-1 at its choice is above that at the halving choice by "
             f"{number(t['val_gap_median'])} points (median; its own runs of the recipe's epochs).",
             f"- **Accuracy lost** (full - halving, test top-1): finals {number(t['final_lost_mean'], 3)} on average "
             f"(at most {number(t['final_lost_max'])}); the full search's own runs at each choice "
             f"{number(t['point_lost_mean'], 3)}.",
             f"- **Compute**: the halving search trained {t['halving_over_full_search']:.2f}x the full search's "
             f"epochs and {t['halving_over_finals']:.2f}x its finals'.", ""]
    shown = cells.sort_values(["same", "dataset", "train_fraction", "method"])
    table = pd.DataFrame({
        "task": shown["dataset"], "fraction": shown["train_fraction"].map(lambda f: f"{f:g}"),
        "method": shown["method"],
        "full: lr / wd": [f"{lr:g} / {wd:g}" for lr, wd in zip(shown["lr_full"], shown["weight_decay_full"],
                                                                strict=True)],
        "halving: lr / wd": [("same" if same else f"{lr:g} / {wd:g}") for same, lr, wd in
                             zip(shown["same"], shown["lr_halving"], shown["weight_decay_halving"], strict=True)],
        "final full": shown["final_full"].map(number), "halving": shown["final_halving"].map(number),
        "lost": shown["final_lost"].map(number), "point full": shown["point_full"].map(number),
        "point halving": shown["point_halving"].map(number), "point lost": shown["point_lost"].map(number),
        "val gap": shown["val_gap"].map(number)})
    return "\n".join(lines) + "\n" + markdown(table)


def write_search_agreement(full_dir: str | Path, halving_dir: str | Path, out: str | Path | None = None
                           ) -> dict[str, Path]:
    """search_agreement.md and .csv of two results folders (module docstring) into `out`."""
    out = Path(out or Path(full_dir) / "figures")
    cells = agreement(read_budgets(full_dir), read_budgets(halving_dir), load_summary(full_dir),
                      load_summary(halving_dir))
    if cells.empty:
        raise ValueError(f"No search cell has a budget record in both {full_dir} and {halving_dir}: run the same "
                         "grid with SEARCH=halving into the second folder first (docs/performance.md).")
    out.mkdir(parents=True, exist_ok=True)
    written = {"search_agreement.csv": out / "search_agreement.csv", "search_agreement.md": out / "search_agreement.md"}
    cells.to_csv(written["search_agreement.csv"], index=False)
    written["search_agreement.md"].write_text(f"# SEARCH=halving against the full search\n\nFull: {full_dir}; "
                                              f"halving: {halving_dir}.\n\n{agreement_markdown(cells)}")
    return written
