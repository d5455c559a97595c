"""The report: Fig. 3, the parameter plot and a Table-1 style table, drawn from the results alone.

    python -m benchmark.report [--results-dir results] [--out results/figures] [--datasets a,b] [--backbone X]
                               [--fraction 1.0] [--wandb]

It reads run JSONs (refreshing results/summary.csv) — never builds a model — and writes PNG + PDF figures and
Markdown + CSV tables. The figures follow Jia et al., "Visual Prompt Tuning", ECCV 2022
(https://arxiv.org/abs/2203.12119): Fig. 3 compares VPT-deep with Linear, Adapter and Bias over training-data
fractions, and Table 1 lists mean top-1 per task, tuned parameters and the number of tasks beating Full.
notebooks/results.ipynb calls the same functions on results/summary.csv.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from benchmark.core.cli import add_switch, comma_list
from benchmark.core.config import EMBEDDED_BACKBONE
from benchmark.core.store import read_summary, write_summary
from datamodules import EMBEDDED_DATASETS
from methods.registry import color, fig3_methods, label, table_order

FIG3_FOCUS = "vpt_deep"
FIG3_COMPARED = ("linear", "adapter", "bias")  # one panel each, as in the paper
FIG3_REFERENCES = ("vpt_shallow", "full")  # drawn in every panel
AHEAD_COLOR, BEHIND_COLOR = "#2ca02c", "#d62728"  # shading: VPT-deep ahead / behind the compared method
PERCENT_RANGE = (1e-3, 100.0)  # tuned-parameter % mapped to marker area on a log scale
MARKER_AREA = (10.0, 190.0)
FRACTION_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# --- loading ---------------------------------------------------------------------------------------------
def load_summary(results_dir: str | Path, refresh: bool = True) -> pd.DataFrame:
    """results/summary.csv, rewritten from the run JSONs first when results/runs exists (and `refresh`)."""
    runs = Path(results_dir) / "runs"
    if refresh and runs.is_dir() and any(runs.rglob("*.json")):
        write_summary(results_dir)
    return read_summary(results_dir)


def comma_filter(frame: pd.DataFrame, column: str, wanted: list[str] | None) -> pd.DataFrame:
    if not wanted:
        return frame
    missing = sorted(set(wanted) - set(frame[column].astype(str)))
    if missing:
        warnings.warn(f"No finished runs for {column} {missing}; present: {sorted(frame[column].unique())}.",
                      stacklevel=3)
    return frame[frame[column].astype(str).isin(wanted)]


def final_runs(summary: pd.DataFrame, datasets: list[str] | None = None, methods: list[str] | None = None,
               backbone: str | None = None) -> pd.DataFrame:
    """The runs a report shows: finished, pretrained, untagged (search points and variants left out), one
    backbone. Where the selection protocol produced a final (train+val) run, it replaces the fixed-recipe run of
    the same dataset, method, fraction and seed."""
    frame = summary[summary["status"] == "ok"].copy()
    if "pretrained" in frame:
        frame = frame[frame["pretrained"].astype(str).str.lower() == "true"]
    if "tag" in frame:
        frame = frame[frame["tag"].fillna("").astype(str) == ""]
    frame = comma_filter(comma_filter(frame, "dataset", datasets), "method", methods)
    if backbone:
        frame = frame[frame["backbone"] == backbone]
    elif frame["backbone"].nunique() > 1:
        counts = frame["backbone"].value_counts().to_dict()
        raise ValueError(f"The results hold runs of several backbones {counts}; a figure compares one. "
                         "Choose it with BACKBONE=<name> (--backbone).")
    if frame.empty:
        raise ValueError("No finished runs match (status ok, pretrained, no tag"
                         f"{', datasets ' + ','.join(datasets) if datasets else ''}"
                         f"{', backbone ' + backbone if backbone else ''}): run `make grid` first or widen the "
                         "filters.")
    frame["selected"] = frame["selected_lr"].notna() if "selected_lr" in frame else False
    frame = frame.sort_values("selected", kind="stable")
    return frame.drop_duplicates(["dataset", "method", "train_fraction", "seed"], keep="last").reset_index(drop=True)


# --- numbers ---------------------------------------------------------------------------------------------
def fraction_curves(final: pd.DataFrame) -> pd.DataFrame:
    """Per (method, fraction): test top-1 averaged over tasks, then mean / std over seeds; tuned-param %."""
    per_seed = final.groupby(["method", "train_fraction", "seed"]).agg(
        top1=("test_top1", "mean"), n_tasks=("dataset", "nunique")).reset_index()
    curves = per_seed.groupby(["method", "train_fraction"]).agg(
        mean=("top1", "mean"), std=("top1", "std"), n_seeds=("seed", "nunique"), n_tasks=("n_tasks", "min"),
    ).reset_index()
    curves["std"] = curves["std"].fillna(0.0)
    curves["tuned_percent"] = curves["method"].map(final.groupby("method")["tuned_percent"].mean())
    if curves["n_tasks"].nunique() > 1:
        warnings.warn("Not every (method, fraction) has results on the same number of tasks; task averages "
                      f"mix {sorted(curves['n_tasks'].unique())} tasks. Finish the grid for a fair figure.",
                      stacklevel=2)
    return curves


def marker_area(tuned_percent) -> np.ndarray:
    """Marker area linear in log10(tuned-parameter %), as the paper's Fig. 3 sizes its markers."""
    low, high = (math.log10(p) for p in PERCENT_RANGE)
    share = (np.log10(np.clip(np.asarray(tuned_percent, dtype=float), *PERCENT_RANGE)) - low) / (high - low)
    return MARKER_AREA[0] + share * (MARKER_AREA[1] - MARKER_AREA[0])


# --- Fig. 3 ----------------------------------------------------------------------------------------------
def draw_method(ax, curves: pd.DataFrame, method: str, reference: bool = False) -> bool:
    curve = curves[curves["method"] == method].sort_values("train_fraction")
    if curve.empty:
        return False
    x, y, std = curve["train_fraction"].to_numpy(), curve["mean"].to_numpy(), curve["std"].to_numpy()
    style = dict(lw=1.2, ls="--", alpha=0.8, zorder=2) if reference else dict(lw=2.2, ls="-", zorder=3)
    ax.plot(x, y, color=color(method), **style)
    ax.scatter(x, y, s=marker_area(curve["tuned_percent"]), color=color(method), edgecolors="white",
               linewidths=0.8, zorder=style["zorder"] + 1, alpha=style.get("alpha", 1.0))
    if (curve["n_seeds"] > 1).any():  # the +- std band over seeds
        ax.fill_between(x, y - std, y + std, color=color(method), alpha=0.12 if reference else 0.2, lw=0,
                        zorder=1)
    return True


def shade_gap(ax, curves: pd.DataFrame, focus: str, other: str) -> None:
    """Fill between the two curves: one colour where `focus` is ahead, another where it is behind."""
    a = curves[curves["method"] == focus].set_index("train_fraction")["mean"]
    b = curves[curves["method"] == other].set_index("train_fraction")["mean"]
    x = np.array(sorted(set(a.index) & set(b.index)))
    if len(x) == 0:
        return
    ya, yb = a.loc[x].to_numpy(), b.loc[x].to_numpy()
    ax.fill_between(x, ya, yb, where=ya >= yb, interpolate=True, color=AHEAD_COLOR, alpha=0.22, lw=0, zorder=0)
    ax.fill_between(x, ya, yb, where=ya < yb, interpolate=True, color=BEHIND_COLOR, alpha=0.22, lw=0, zorder=0)


def format_fraction_axis(ax, fractions) -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training data used")
    ax.grid(True, alpha=0.3)


def plot_fig3(curves: pd.DataFrame, title: str | None = None) -> Figure:
    """Three panels — VPT-deep vs Linear, vs Adapter, vs Bias — over training-data fraction, as Fig. 3."""
    fig = Figure(figsize=(14, 4.8), layout="constrained")
    axes = fig.subplots(1, len(FIG3_COMPARED), sharey=True)
    fractions = sorted(curves["train_fraction"].unique())
    for ax, other in zip(axes, FIG3_COMPARED, strict=True):
        shade_gap(ax, curves, FIG3_FOCUS, other)
        for reference in FIG3_REFERENCES:
            draw_method(ax, curves, reference, reference=True)
        drawn = [m for m in (other, FIG3_FOCUS) if draw_method(ax, curves, m)]
        missing = [label(m) for m in (other, FIG3_FOCUS) if m not in drawn]
        if missing:
            ax.text(0.5, 0.5, f"no results for {', '.join(missing)}", transform=ax.transAxes, ha="center",
                    color="0.4")
        ax.set_title(f"{label(FIG3_FOCUS)} vs {label(other)}")
        format_fraction_axis(ax, fractions)
    n_tasks, n_seeds = int(curves["n_tasks"].max()), int(curves["n_seeds"].max())
    axes[0].set_ylabel(f"test top-1 (%), mean of {n_tasks} task{'s' * (n_tasks > 1)}")
    shown = [m for m in table_order(curves["method"]) if m in (FIG3_FOCUS, *FIG3_COMPARED, *FIG3_REFERENCES)]
    handles = [Line2D([], [], color=color(m), lw=2, ls="--" if m in FIG3_REFERENCES else "-", marker="o",
                      label=label(m)) for m in shown]
    handles += [Patch(color=AHEAD_COLOR, alpha=0.35, label=f"{label(FIG3_FOCUS)} ahead"),
                Patch(color=BEHIND_COLOR, alpha=0.35, label=f"{label(FIG3_FOCUS)} behind")]
    if n_seeds > 1:
        handles.append(Patch(color="0.6", alpha=0.3, label=f"± std over {n_seeds} seeds"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title or "Fig. 3: VPT-deep against other protocols over training-data size "
                 "(marker area ∝ log tuned-parameter %)")
    return fig


# --- parameter plot ----------------------------------------------------------------------------------------
def plot_params(curves: pd.DataFrame, title: str | None = None) -> Figure:
    """Top-1 against tuned-parameter % (log x): one point per method and fraction."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    fractions = sorted(curves["train_fraction"].unique())
    markers = {f: FRACTION_MARKERS[i % len(FRACTION_MARKERS)] for i, f in enumerate(fractions)}
    for method in table_order(curves["method"]):
        curve = curves[curves["method"] == method].sort_values("train_fraction")
        ax.plot(curve["tuned_percent"], curve["mean"], color=color(method), lw=0.8, alpha=0.5)
        for _, row in curve.iterrows():
            ax.errorbar(row["tuned_percent"], row["mean"], yerr=row["std"] if row["n_seeds"] > 1 else None,
                        marker=markers[row["train_fraction"]], color=color(method), ms=7, capsize=2, ls="none")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel("tuned parameters (% of the model)")
    ax.set_ylabel("test top-1 (%), task mean")
    ax.grid(True, which="both", alpha=0.3)
    method_handles = [Line2D([], [], color=color(m), marker="o", ls="none", label=label(m))
                      for m in table_order(curves["method"])]
    fraction_handles = [Line2D([], [], color="0.3", marker=markers[f], ls="none", label=f"{100 * f:g}% data")
                        for f in fractions]
    fig.legend(handles=method_handles + fraction_handles, loc="outside right center", frameon=False)
    ax.set_title(title or "Accuracy against tuned parameters")
    return fig


# --- tables ----------------------------------------------------------------------------------------------
def dataset_groups(datasets) -> dict[str, str]:
    """A dataset's group — VTAB-1k's Natural / Specialized / Structured, which the paper averages separately — when
    its datamodule class declares `group`, or for a VTAB task, from datamodules.vtab's task table."""
    from datamodules import get_datamodule_class
    from datamodules.vtab import VTAB_TASKS

    groups = {}
    for name in datasets:
        try:
            cls = get_datamodule_class(name)
        except ValueError:  # a dataset registered by code this checkout lacks: no group, still reported
            continue
        group = getattr(cls, "group", None) or getattr(VTAB_TASKS.get(getattr(cls, "task", None)), "group", None)
        if group:
            groups[name] = str(group).capitalize()
    return groups


def table_fraction(final: pd.DataFrame, fraction: float | None) -> float:
    present = sorted(final["train_fraction"].unique())
    if fraction is None:
        return float(present[-1])
    match = [f for f in present if math.isclose(f, fraction)]
    if not match:
        raise ValueError(f"No results at train fraction {fraction:g}; present: {', '.join(f'{f:g}' for f in present)}"
                         " (choose one with --fraction).")
    return float(match[0])


def results_table(final: pd.DataFrame, fraction: float | None = None) -> pd.DataFrame:
    """Table-1 style: one row per method; mean test top-1 per task (and per group), tuned-param %, the mean over
    tasks and how many tasks beat Full. `<task>_std` columns hold the std over seeds."""
    fraction = table_fraction(final, fraction)
    at = final[np.isclose(final["train_fraction"], fraction)]
    per_task = at.groupby(["method", "dataset"])["test_top1"].agg(["mean", "std", "count"])
    means, stds = per_task["mean"].unstack("dataset"), per_task["std"].unstack("dataset")
    tasks = sorted(means.columns)
    rows = []
    for method in table_order(means.index):
        row = {"method": method, "label": label(method), "train_fraction": fraction,
               "tuned_percent": at.loc[at["method"] == method, "tuned_percent"].mean(),
               "seeds": int(per_task.loc[method, "count"].max())}
        row |= {task: means.loc[method, task] for task in tasks}
        row |= {f"{task}_std": stds.loc[method, task] for task in tasks}
        for group, members in group_members(tasks).items():
            row[f"{group} mean"] = means.loc[method, members].mean()
        row["mean"] = means.loc[method, tasks].mean()
        if "full" in means.index and method != "full":
            both = means.loc[[method, "full"], tasks].dropna(axis=1)
            row["beats_full"] = int((both.loc[method] > both.loc["full"]).sum())
            row["tasks_compared"] = both.shape[1]
        rows.append(row)
    return pd.DataFrame(rows)


def group_members(tasks) -> dict[str, list[str]]:
    groups = dataset_groups(tasks)
    members: dict[str, list[str]] = {}
    for task in tasks:
        if task in groups:
            members.setdefault(groups[task], []).append(task)
    return members


def selected_hparams(final: pd.DataFrame) -> pd.DataFrame:
    """The lr and weight decay the selection protocol chose, per method, task and fraction (empty if none)."""
    if "selected_lr" not in final or final["selected_lr"].isna().all():
        return pd.DataFrame(columns=["method", "dataset", "train_fraction", "lr", "weight_decay", "val_top1"])
    chosen = final[final["selected_lr"].notna()]
    return (chosen.groupby(["method", "dataset", "train_fraction"])
            .agg(lr=("selected_lr", "first"), weight_decay=("selected_weight_decay", "first"),
                 val_top1=("selected_val_top1", "first"))
            .reset_index())


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


# --- the whole report ------------------------------------------------------------------------------------
def report_title(final: pd.DataFrame) -> str:
    tasks = sorted(final["dataset"].unique())
    seeds = final["seed"].nunique()
    return (f"{final['backbone'].iloc[0]} on {', '.join(tasks)} ({seeds} seed{'s' * (seeds > 1)}): VPT-deep vs "
            "other protocols; marker area ∝ log tuned-parameter %")


def write_report(results_dir: str | Path = "results", out_dir: str | Path | None = None,
                 datasets: list[str] | None = None, methods: list[str] | None = None, backbone: str | None = None,
                 fraction: float | None = None, use_wandb: bool = False) -> dict[str, Path]:
    """Fig. 3, the parameter plot (PNG + PDF) and the tables (Markdown + CSV) into `out_dir`."""
    out = Path(out_dir or Path(results_dir) / "figures")
    out.mkdir(parents=True, exist_ok=True)
    final = final_runs(load_summary(results_dir), datasets, methods, backbone)
    curves = fraction_curves(final)
    written: dict[str, Path] = {}
    for name, fig in (("fig3", plot_fig3(curves, report_title(final))), ("params", plot_params(curves))):
        for suffix in ("png", "pdf"):
            written[f"{name}.{suffix}"] = out / f"{name}.{suffix}"
            fig.savefig(written[f"{name}.{suffix}"], dpi=150)
    table, hparams = results_table(final, fraction), selected_hparams(final)
    frames = {"table": table, "fig3_data": curves, "selected_hparams": hparams}
    for name, frame in frames.items():
        written[f"{name}.csv"] = out / f"{name}.csv"
        frame.to_csv(written[f"{name}.csv"], index=False)
    written["table.md"] = out / "table.md"
    written["table.md"].write_text(table_markdown(table, hparams))
    if use_wandb:
        from benchmark.core.tracking import log_report

        log_report([p for p in written.values() if p.suffix == ".png"], frames, str(results_dir))
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", "--results", default="results")
    p.add_argument("--out", help="default: <results-dir>/figures")
    p.add_argument("--datasets", type=comma_list(str), help="comma list (default: every dataset with results)")
    p.add_argument("--methods", type=comma_list(str), help="comma list (default: every method with results)")
    p.add_argument("--backbone", help="needed when the results hold several backbones")
    p.add_argument("--fraction", type=float, help="train fraction of the table (default: the largest present)")
    add_switch(p, "--wandb", help="log figures and tables to a W&B report run")
    p.add_argument("--fig3", action="store_true",
                   help="the embedded Fig. 3: the embedded tasks, the paper's six methods, the embedded backbone")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.fig3:
        args.datasets, args.methods = list(EMBEDDED_DATASETS), fig3_methods()
        args.backbone = args.backbone or EMBEDDED_BACKBONE
    try:
        written = write_report(args.results_dir, args.out, args.datasets, args.methods, args.backbone,
                               args.fraction, args.wandb)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written["table.md"].read_text())
    print("Wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
