"""Markdown tables: the suite's one table writer, the Table-1 style results table, the paired differences to Full
and the paper beside us."""

from __future__ import annotations

import math

import pandas as pd

from methods.registry import label, table_order

# how the selected-lr table marks a choice at an end of the searched lr grid (search.lr_edge's names)
EDGE_MARKS = {"highest": "↑", "lowest": "↓"}


def number(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown would need the tabulate package for these few lines)."""
    cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join([":---"] + ["---:"] * (len(frame.columns) - 1)) + "|")
    return "\n".join(lines)

def table_markdown(table: pd.DataFrame, hparams: pd.DataFrame, paper: pd.DataFrame | None = None,
                   unmatched: list[str] | None = None) -> str:
    tasks = [c for c in table.columns if f"{c}_std" in table.columns]
    groups = [c for c in table.columns if c.endswith(" mean")]
    seeds = int(table["seeds"].max())
    shown = pd.DataFrame({"Method": table["label"], "Tuned params (%)": table["tuned_percent"].map(
        lambda v: f"{v:.3g}")})
    for task in tasks:
        shown[task] = [interval_cell(m, lo, hi, seeds) for m, lo, hi in
                       zip(table[task], table[f"{task}_ci_low"], table[f"{task}_ci_high"], strict=True)]
    for group in groups:
        shown[group] = table[group].map(number)
    shown["Mean"] = table["mean"].map(number)
    shown["PPT"] = table["ppt"].map(number)
    for column in [c for c in table.columns if c.startswith("extra_test/")]:  # domain shift (analysis/ablations.py)
        shown[f"{column.split('/')[1]} (extra test)"] = table[column].map(number)
    if "beats_full" in table:
        shown["vs Full: beats / tie / below"] = [verdict_counts(*counts) for counts in zip(
            table["beats_full"], table["ties_full"], table["below_full"], table["untested_full"], strict=True)]
    fraction = f"{100 * table['train_fraction'].iloc[0]:g}%"
    spread = (f"mean ± half-width of the 95% confidence interval over {seeds} seeds (Student t, n − 1 degrees of "
              "freedom; a cell marked n=1 has one seed and no interval)" if seeds > 1
              else "mean of 1 seed (n=1: no confidence interval)")
    text = [f"Test top-1 (%) at {fraction} of the training data, {spread}. PPT: V-PETL Bench's performance-parameter "
            "trade-off, mean top-1 × exp(−log10(tuned params / 10^7 + 1)). vs Full: tasks where the 95% interval of "
            "the difference to Full, paired by seed, lies above 0 (beats), contains 0 (tie) or lies below 0.",
            "", markdown(shown)]
    if "beats_full" in table:
        text += ["", f"Difference to Full at {fraction} (points), paired by seed: mean [95% CI] and verdict.", "",
                 markdown(difference_frame(table, tasks))]
    if paper is not None and not paper.empty:
        text += ["", *paper_markdown(paper, unmatched or [])]
    if not hparams.empty:
        rank = {m: i for i, m in enumerate(table_order(hparams["method"]))}
        picked = hparams.assign(rank=hparams["method"].map(rank), Method=hparams["method"].map(label),
                                Fraction=hparams["train_fraction"].map(lambda f: f"{100 * f:g}%"),
                                choice=[f"{lr:g}{EDGE_MARKS.get(edge, '')} / {wd:g}" for lr, wd, edge in
                                        zip(hparams["lr"], hparams["weight_decay"], hparams["lr_edge"], strict=True)])
        pivot = picked.pivot_table(index=["rank", "train_fraction", "Method", "Fraction"], columns="dataset",
                                   values="choice", aggfunc="first").reset_index().drop(columns=["rank",
                                                                                                 "train_fraction"])
        pivot.columns.name = None
        text += ["", "Selected by the paper's protocol (val top-1 at the last epoch; ties -> smaller lr): lr / wd.",
                 "", markdown(pivot.fillna("–"))]
        edges = int((hparams["lr_edge"] != "").sum())
        if edges:
            text += ["", f"{EDGE_MARKS['highest']} / {EDGE_MARKS['lowest']}: the largest / smallest lr searched "
                     f"({edges} of {len(hparams)} choices), so the best may lie outside the grid: widen it with "
                     "SEARCH_LR_FACTORS= (or SEARCH_LRS=)."]
    return "\n".join(text) + "\n"


def fractions_markdown(stacked: pd.DataFrame) -> str:
    """`aggregate.fraction_tables` as one table per task: a row per method, a column per train fraction, each cell
    the mean ± interval and, for every method but Full, its paired difference to Full at that fraction."""
    tasks = [c for c in stacked.columns if f"{c}_std" in stacked.columns]
    seeds = int(stacked["seeds"].max())
    fractions = sorted(stacked["train_fraction"].unique())
    text = [f"Test top-1 (%) against the training fraction (the numbers behind Fig. 3): mean ± half-width of the 95% "
            f"confidence interval over {seeds} seed{'s' * (seeds > 1)}, and after the semicolon the difference to "
            "Full at that fraction, paired by seed: mean [95% CI] and verdict (beats: the interval lies above 0, tie: "
            "it holds 0, below: under 0; n=1: one seed, no interval)."]
    methods = table_order(stacked["method"].unique())
    for task in tasks:
        shown = pd.DataFrame({"Method": [label(m) for m in methods]})
        for fraction in fractions:
            at = stacked[stacked["train_fraction"] == fraction].set_index("method")
            shown[f"{100 * fraction:g}%"] = [fraction_cell(at, m, task, seeds) for m in methods]
        text += ["", f"**{task}**", "", markdown(shown)]
    return "\n".join(text) + "\n"

def fraction_cell(at: pd.DataFrame, method: str, task: str, seeds: int) -> str:
    if method not in at.index:
        return "–"
    row = at.loc[method]
    cell = interval_cell(row[task], row[f"{task}_ci_low"], row[f"{task}_ci_high"], seeds)
    if f"{task}_diff" in at.columns and not pd.isna(row[f"{task}_diff"]):
        cell += "; " + difference_cell(row[f"{task}_diff"], row[f"{task}_diff_low"], row[f"{task}_diff_high"],
                                       row[f"{task}_vs_full"])
    return cell

def interval_cell(mean, low, high, seeds: int) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(low):
        return number(mean) + (" (n=1)" if seeds > 1 else "")
    return f"{number(mean)} ± {number((high - low) / 2)}"

def verdict_counts(beats, ties, below, untested) -> str:
    if pd.isna(beats):
        return "–"
    if beats + ties + below == 0:
        return "n=1"  # one seed everywhere: no interval, no verdict
    return f"{int(beats)} / {int(ties)} / {int(below)}" + (f" (+{int(untested)} n=1)" if untested else "")

def difference_frame(table: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    rows = table[table["method"] != "full"]
    shown = pd.DataFrame({"Method": rows["label"]})
    for task in tasks:
        if f"{task}_diff" not in rows:
            continue
        shown[task] = [difference_cell(d, lo, hi, v) for d, lo, hi, v in zip(
            rows[f"{task}_diff"], rows[f"{task}_diff_low"], rows[f"{task}_diff_high"], rows[f"{task}_vs_full"],
            strict=True)]
    return shown

def difference_cell(diff, low, high, verdict) -> str:
    if pd.isna(diff):
        return "–"
    return f"{diff:+.2f} (n=1)" if pd.isna(low) else f"{diff:+.2f} [{low:+.2f}, {high:+.2f}] {verdict}"

def paper_markdown(paper: pd.DataFrame, unmatched: list[str]) -> list[str]:
    shown = pd.DataFrame({"Method": paper["label"], "Task": paper["task"], "Paper": paper["paper"].map(number),
                          "Measured": paper["measured"].map(number), "Δ": paper["delta"].map(lambda d: f"{d:+.2f}"),
                          "Seeds": paper["seeds"].astype(int)})
    text = ["Beside the paper: VPT (Jia et al., ECCV 2022, arXiv 2203.12119) Table 1, ViT-B/16 ImageNet-21k, 100% of "
            "the training data, per task (sources: benchmark/analysis/vpt_paper_table1.csv); group rows are means "
            "over their tasks, VTAB-1k the mean of the three group means; Δ = measured − paper.", "", markdown(shown)]
    if unmatched:
        text += ["", f"Measured without a sourced paper number: {', '.join(unmatched)}."]
    return text
