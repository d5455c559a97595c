"""The report's views of few-shot grids, option grids (ablations) and extra test sets. Reads results only.

- Few-shot (`make grid SHOTS=1,2,4,8,16`): test top-1 against shots per class on a log2 axis, one line per method, as
  NOAH's few-shot figure (Zhang et al. 2022, https://arxiv.org/abs/2206.04673) and the Fig. 3 of VPT draw theirs.
  Few-shot runs never enter the fraction curves, nor fraction runs these (`final_runs` keeps them apart).
- Option grids (`make grid OPTIONS="prompt_length=1,5,10"`): test top-1 against each swept option, one line per
  method (and per combination of the other swept options), as VPT's prompt-length and prompt-depth ablations
  (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119, Sec. 4.3). Categorical values (`prompt_layers=1-6`)
  are placed in the order of the numbers they hold (1, 1-3, 1-6, 1-12, 7-12, 12).
- Extra test sets (EXTRA_TEST=...): one table column per set, the mean over seeds of `extra_test/<name>/top1`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from benchmark.analysis.aggregate import fraction_curves, one_run_per_point, runs_of_one_backbone
from benchmark.analysis.stats import seed_intervals
from methods.registry import color, label, table_order

EXTRA_PREFIX = "extra_test/"
OPTION_PREFIX = "option/"
LINE_STYLES = ("-", "--", ":", "-.")


def finished_runs(summary: pd.DataFrame, datasets: list[str] | None = None, methods: list[str] | None = None,
                  backbone: str | None = None, *, recipe: str | None = None, epochs: int | None = None) -> pd.DataFrame:
    """Finished, pretrained, untagged runs of one backbone (all of them when it is the only one), any protocol; one
    per point (dataset, method, fraction or shots, options, seed), the selection protocol's final run where it has
    one; a cell whose seeds mix recipes or epochs is refused (one_run_per_point)."""
    frame = runs_of_one_backbone(summary, datasets, methods, backbone, plain=False, recipe=recipe, epochs=epochs)
    return one_run_per_point(frame, [c for c in ("dataset", "method", "train_fraction", "shots", "options", "seed")
                                     if c in frame])


def has_options(frame: pd.DataFrame) -> pd.Series:
    if "options" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["options"].notna() & (frame["options"].astype(str) != "")


def has_shots(frame: pd.DataFrame) -> pd.Series:
    return frame["shots"].notna() if "shots" in frame else pd.Series(False, index=frame.index)


# --- few-shot ----------------------------------------------------------------------------------------------------
def shot_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset or "mean", method, shots): test top-1 over seeds as fraction_curves aggregates fractions (task
    mean per seed, then mean, std and 95% t interval over seeds), from the few-shot runs without options."""
    shots = runs[has_shots(runs) & ~has_options(runs)]
    if shots.empty:
        return pd.DataFrame()
    shots = shots.assign(train_fraction=shots["shots"].astype(int))  # the x axis fraction_curves groups by
    tasks = sorted(shots["dataset"].unique())
    parts = [fraction_curves(shots).assign(dataset="mean")] if len(tasks) > 1 else []
    parts += [fraction_curves(shots[shots["dataset"] == task]).assign(dataset=task) for task in tasks]
    return pd.concat(parts, ignore_index=True).rename(columns={"train_fraction": "shots"})


def draw_curve(ax, x, curve: pd.DataFrame, method: str, style: str = "-", name: str | None = None) -> None:
    """The mean over seeds, and with more than one seed the band of its 95% t interval (as Fig. 3's)."""
    ax.plot(x, curve["mean"].to_numpy(), marker="o", ls=style, lw=2, color=color(method), label=name or label(method))
    if int(curve["n_seeds"].max()) > 1:
        ax.fill_between(x, curve["ci_low"].to_numpy(), curve["ci_high"].to_numpy(), color=color(method), alpha=0.15,
                        lw=0)


def band_text(n_seeds: int) -> str:
    return f", band: 95% CI over {n_seeds} seeds (Student t)" if n_seeds > 1 else ", 1 seed"


def plot_shots(curves: pd.DataFrame, title: str | None = None) -> Figure:
    """Top-1 against training examples per class (log2 x), one panel per task (and their mean first)."""
    panels = list(dict.fromkeys(curves["dataset"]))
    fig = Figure(figsize=(5.2 * len(panels), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=False))
    shots = sorted(int(k) for k in curves["shots"].unique())
    for ax, panel in zip(axes, panels, strict=True):
        here = curves[curves["dataset"] == panel]
        for method in table_order(here["method"].unique()):
            curve = here[here["method"] == method].sort_values("shots")
            draw_curve(ax, curve["shots"].to_numpy(float), curve, method)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(shots))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("training examples per class (shots)")
        ax.set_title(f"mean of {here['n_tasks'].max()} tasks" if panel == "mean" else panel)
        ax.grid(True, alpha=0.3)
    n_seeds = int(curves["n_seeds"].max())
    axes[0].set_ylabel(f"test top-1 (%), mean{band_text(n_seeds)}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 8), frameon=False)
    fig.suptitle(title or "Few-shot: accuracy against training examples per class")
    return fig


# --- option grids ------------------------------------------------------------------------------------------------
def swept_options(runs: pd.DataFrame) -> list[str]:
    """The option keys that take more than one value among the option-grid runs."""
    grid = runs[has_options(runs)]
    keys = [c[len(OPTION_PREFIX):] for c in grid.columns if c.startswith(OPTION_PREFIX)]
    return [k for k in keys if grid[OPTION_PREFIX + k].dropna().astype(str).nunique() > 1]


def value_order(value) -> tuple:
    """Numbers in value order; a text like '1-6' or '1+3' by the numbers it holds, then as text."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, float(value), "")
    numbers = tuple(int(n) for n in re.findall(r"\d+", str(value)))
    return (1, numbers, str(value))


def value_text(value) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def option_curves(runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per (method, other swept options, value of `key`): test top-1 averaged over tasks per seed, then mean / std
    and 95% t interval over seeds, the tuned-parameter % and how many tasks and seeds; `position` orders the
    values."""
    grid = runs[has_options(runs) & runs[OPTION_PREFIX + key].notna()].copy()
    others = [k for k in swept_options(runs) if k != key]
    data = [f"{int(k)} shots" if pd.notna(k) else f"{100 * f:g}% data"
            for k, f in zip(grid["shots"] if "shots" in grid else [np.nan] * len(grid), grid["train_fraction"],
                            strict=True)]
    mixed = len(set(data)) > 1  # one curve per amount of training data: never averaged over fractions or shots
    grid["variant"] = ["; ".join([d] * mixed + [f"{k}={value_text(row[OPTION_PREFIX + k])}" for k in others
                                                if pd.notna(row[OPTION_PREFIX + k])])
                       for d, (_, row) in zip(data, grid.iterrows(), strict=True)]
    grid["value"] = grid[OPTION_PREFIX + key]
    if numeric(grid["value"]) and (grid["value"] % 1 == 0).all():  # whole numbers stored as floats beside NaNs
        grid["value"] = grid["value"].astype(int)
    group = ["method", "variant", "value"]
    per_seed = grid.groupby([*group, "seed"], dropna=False).agg(
        top1=("test_top1", "mean"), n_tasks=("dataset", "nunique"), tuned_percent=("tuned_percent", "mean"))
    per_seed = per_seed.reset_index()
    curves = seed_intervals(per_seed, group, "top1").rename(columns={"n": "n_seeds"}).merge(
        per_seed.groupby(group).agg(n_tasks=("n_tasks", "min"), tuned_percent=("tuned_percent", "mean")).reset_index(),
        on=group)
    order = sorted(curves["value"].unique(), key=value_order)
    curves["position"] = curves["value"].map({v: i for i, v in enumerate(order)})
    return curves.assign(option=key).sort_values(["method", "variant", "position"], ignore_index=True)


def numeric(values) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)


def plot_option_sweep(curves: pd.DataFrame, title: str | None = None) -> Figure:
    """Top-1 against one swept option: its values on x (a log axis for numbers spanning more than 10x, else in
    order), a line per method and combination of the other swept options."""
    key = str(curves["option"].iloc[0])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    values = sorted(curves["value"].unique(), key=value_order)
    as_number = numeric(values)
    for method in table_order(curves["method"].unique()):
        for k, variant in enumerate(sorted(curves.loc[curves["method"] == method, "variant"].unique())):
            curve = curves[(curves["method"] == method) & (curves["variant"] == variant)].sort_values("position")
            x = curve["value"].to_numpy(float) if as_number else curve["position"].to_numpy(float)
            name = label(method) + (f" ({variant})" if variant else "")
            draw_curve(ax, x, curve, method, LINE_STYLES[k % len(LINE_STYLES)], name)
    if as_number and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    ticks = [float(v) for v in values] if as_number else list(range(len(values)))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(
        (lambda v, _: f"{v:g}") if as_number else (lambda v, _: value_text(values[int(round(v))]))))
    ax.set_xlabel("blocks with prompts (counted from 1)" if key == "prompt_layers" else key)
    n_seeds, n_tasks = int(curves["n_seeds"].max()), int(curves["n_tasks"].max())
    ax.set_ylabel(f"test top-1 (%), mean of {n_tasks} task{'s' * (n_tasks > 1)}{band_text(n_seeds)}")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(title or f"Ablation: accuracy against {key}")
    return fig


# --- extra test sets ---------------------------------------------------------------------------------------------
def extra_test_sets(frame: pd.DataFrame) -> list[str]:
    return sorted(c[len(EXTRA_PREFIX):-len("/top1")] for c in frame.columns
                  if c.startswith(EXTRA_PREFIX) and c.endswith("/top1"))


def with_extra_test_columns(table: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """`table` (results_table's rows) with one `extra_test/<name>/top1` column per extra test set: the mean over the
    seeds (and tasks) of the table's fraction that evaluated it; NaN where a method has none."""
    names = extra_test_sets(final)
    if not names or table.empty:
        return table
    at = final[np.isclose(final["train_fraction"], float(table["train_fraction"].iloc[0]))]
    means = at.groupby("method")[[f"{EXTRA_PREFIX}{n}/top1" for n in names]].mean()
    return table.join(means, on="method")


# --- the report's part ---------------------------------------------------------------------------------------------
def write_ablations(summary: pd.DataFrame, out: Path, datasets: list[str] | None = None,
                    methods: list[str] | None = None, backbone: str | None = None, *, recipe: str | None = None,
                    epochs: int | None = None) -> dict[str, Path]:
    """shots.png/.pdf + shots_data.csv when the results hold few-shot runs; ablation_<key>.png/.pdf per swept
    option + ablation_data.csv when they hold option grids. {} when neither."""
    runs = finished_runs(summary, datasets, methods, backbone, recipe=recipe, epochs=epochs)
    figures, frames = {}, {}
    shots = shot_curves(runs)
    if not shots.empty:
        figures["shots"], frames["shots_data"] = plot_shots(shots), shots
    sweeps = [option_curves(runs, key) for key in swept_options(runs)]
    for curves in sweeps:
        figures[f"ablation_{curves['option'].iloc[0]}"] = plot_option_sweep(curves)
    if sweeps:
        frames["ablation_data"] = pd.concat(sweeps, ignore_index=True)
    written = {}
    for name, fig in figures.items():
        for suffix in ("png", "pdf"):
            written[f"{name}.{suffix}"] = out / f"{name}.{suffix}"
            fig.savefig(written[f"{name}.{suffix}"], dpi=150)
    for name, frame in frames.items():
        written[f"{name}.csv"] = out / f"{name}.csv"
        frame.to_csv(written[f"{name}.csv"], index=False)
    return written
