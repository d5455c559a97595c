"""From the results store to the numbers a report shows: final runs, Fig. 3 curves, the Table-1 style table and the
hyperparameters the selection protocol chose. Reads results only; never builds a model."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.analysis.stats import ONE_SEED, VERDICTS, paired_difference, ppt, seed_intervals, verdict
from benchmark.core.store import FAILED, NOT_A_RECORD, SKIP_REASONS, load_runs, read_summary, write_summary
from datamodules import get_datamodule_class
from datamodules.vtab import VTAB_TASKS
from methods.registry import label, table_order

# The one rule of what a point's seeds may mix: one recipe and one number of epochs (and one backbone, which
# runs_of_one_backbone keeps); one_run_per_point refuses a cell that mixes them.
RECIPE_KEYS = ("recipe", "epochs")


def load_summary(results_dir: str | Path, refresh: bool = True) -> pd.DataFrame:
    """results/summary.csv, rewritten from the run JSONs first when results/runs exists (and `refresh`); then its
    `attrs` hold what load_runs left out ("skipped") and how many run files it read ("files")."""
    runs = Path(results_dir) / "runs"
    if refresh and runs.is_dir() and any(runs.rglob("*.json")):
        frame = load_runs(results_dir)
        write_summary(results_dir, frame)
        summary = read_summary(results_dir)
        summary.attrs |= frame.attrs
        return summary
    return read_summary(results_dir)


def skipped_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """What a report leaves out, one row (path, reason, detail) each: the run files load_runs could not read as run
    records (summary.attrs["skipped"]) and the runs that did not finish (status not ok, detail their error)."""
    rows = list(summary.attrs.get("skipped", []))
    if "status" in summary:
        failed = summary[summary["status"] != "ok"]
        errors = failed["error"] if "error" in failed else "status " + failed["status"].astype(str)
        rows += [(str(path), FAILED, "" if pd.isna(error) else str(error))
                 for path, error in zip(failed.get("path", pd.Series("", index=failed.index)), errors, strict=True)]
    return pd.DataFrame(rows, columns=["path", "reason", "detail"])


def skipped_line(skipped: pd.DataFrame, total: int, what: str = "run files", named: int = 5) -> str:
    """One line: how many of `total` were skipped, per reason how many, naming the first `named` files (a failed
    run with the first line of its error) and counting the rest."""
    plural = {NOT_A_RECORD: "not run records", FAILED: "failed runs"}
    parts = []
    for reason in SKIP_REASONS:
        rows = skipped[skipped["reason"] == reason]
        if rows.empty:
            continue
        shown = [path + (f": {str(detail).splitlines()[0][:100] if detail else '?'}" if reason == FAILED else "")
                 for path, detail in zip(rows["path"].iloc[:named], rows["detail"].iloc[:named], strict=True)]
        named -= len(shown)
        rest = [f"{len(rows) - len(shown)} more"] if shown and len(rows) > len(shown) else []
        parts.append(f"{len(rows)} {plural.get(reason, reason) if len(rows) > 1 else reason}"
                     + (f" ({'; '.join(shown + rest)})" if shown else ""))
    return f"Skipped {len(skipped)} of {total} {what}: {', '.join(parts)}"

def comma_filter(frame: pd.DataFrame, column: str, wanted: list[str] | None) -> pd.DataFrame:
    if not wanted:
        return frame
    missing = sorted(set(wanted) - set(frame[column].astype(str)))
    if missing:
        warnings.warn(f"No finished runs for {column} {missing}; present: {sorted(frame[column].unique())}.",
                      stacklevel=3)
    return frame[frame[column].astype(str).isin(wanted)]

def runs_of_one_backbone(summary: pd.DataFrame, datasets: list[str] | None = None, methods: list[str] | None = None,
                         backbone: str | None = None, *, plain: bool = True, recipe: str | None = None,
                         epochs: int | None = None) -> pd.DataFrame:
    """Finished, pretrained, untagged (search points and variants left out) runs of one backbone, filtered by
    dataset, method, recipe and epochs; `plain` also leaves out the few-shot and option-grid runs, which have
    figures of their own (ablations.py), and warns about filters that match nothing."""
    missing = [c for c in ("status", "dataset", "method", "backbone", "seed") if c not in summary]
    if missing:
        raise ValueError(f"The results hold no run records with {', '.join(missing)} (a summary.csv written by "
                         "another tool?): point RESULTS= at a folder holding runs/ or the suite's summary.csv.")
    frame = summary[summary["status"] == "ok"].copy()
    if "pretrained" in frame:
        frame = frame[frame["pretrained"].astype(str).str.lower() == "true"]
    if "tag" in frame:
        frame = frame[frame["tag"].fillna("").astype(str) == ""]
    for column in ("shots", "options") if plain else ():
        if column in frame:
            frame = frame[frame[column].isna() | (frame[column].astype(str) == "")]
    with warnings.catch_warnings():
        if not plain:  # the report calls final_runs too: its warnings are enough
            warnings.simplefilter("ignore")
        frame = comma_filter(comma_filter(frame, "dataset", datasets), "method", methods)
    if recipe is not None:  # a summary without the column matches no filter
        frame = frame[frame.get("recipe", pd.Series(index=frame.index)).astype(str) == recipe]
    if epochs is not None:
        frame = frame[pd.to_numeric(frame.get("epochs", pd.Series(index=frame.index)), errors="coerce") == epochs]
    if backbone:
        frame = frame[frame["backbone"] == backbone]
    elif frame["backbone"].nunique() > 1:
        counts = frame["backbone"].value_counts().to_dict()
        raise ValueError(f"The results hold runs of several backbones {counts}; a figure compares one. "
                         "Choose it with BACKBONE=<name> (--backbone).")
    return frame


def one_run_per_point(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Where the selection protocol produced a final (train+val) run, it replaces the fixed-recipe run of the same
    point (`keys`); then a cell (the point without its seed) whose seeds mix recipes or epochs is refused."""
    selected = frame["selected_lr"].notna() if "selected_lr" in frame else pd.Series(False, index=frame.index)
    frame = frame.assign(selected=selected).sort_values("selected", kind="stable")
    frame = frame.drop_duplicates(keys, keep="last").reset_index(drop=True)
    one_recipe_per_cell(frame, [k for k in keys if k != "seed"])
    return frame


def one_recipe_per_cell(frame: pd.DataFrame, cell: list[str]) -> None:
    """ValueError when the runs of one cell (the columns `cell`) differ in RECIPE_KEYS: their mean over seeds would
    mix training protocols. It names up to three such cells, what each mixes, and the filters that choose."""
    keys = [k for k in RECIPE_KEYS if k in frame]
    if frame.empty or not keys:
        return
    values = [frame[k].map(lambda v: "?" if pd.isna(v) else f"{v:g}" if isinstance(v, float) else str(v))
              for k in keys]
    protocol = f"{keys[0]} " + values[0]  # "recipe quick (epochs 2)"
    for key, value in zip(keys[1:], values[1:], strict=True):
        protocol = protocol + f" ({key} " + value + ")"
    frame = frame.assign(protocol=protocol)
    groups = frame.groupby(cell, dropna=False, sort=True)
    mixed = [(point, runs) for point, runs in groups if runs["protocol"].nunique() > 1]
    if not mixed:
        return
    texts = []
    for point, runs in mixed[:3]:  # each protocol with its seeds, in the order of their first seed
        seeds = sorted(runs.groupby("protocol")["seed"].agg(sorted).items(), key=lambda item: item[1][0])
        texts.append(f"{cell_text(dict(zip(cell, point, strict=True)))}: "
                     + "; ".join(f"{name} seeds {', '.join(str(seed) for seed in group)}" for name, group in seeds))
    more = f" (and {len(mixed) - 3} more)" if len(mixed) > 3 else ""
    raise ValueError(f"A point's seeds are averaged only when made with one recipe and one number of epochs; "
                     f"{len(mixed)} point{'s' * (len(mixed) > 1)} mix them: {' | '.join(texts)}{more}. Keep one "
                     "with RECIPE=<name> and/or EPOCHS=<n> (--recipe, --epochs).")


def cell_text(point: dict) -> str:
    """`digits / vpt_deep @ 0.1`, `@ 4 shots`, with the options of an option-grid cell in brackets."""
    shots, options, fraction = point.get("shots"), point.get("options"), point.get("train_fraction")
    amount = (f"{int(shots)} shots" if shots is not None and pd.notna(shots)
              else f"{fraction:g}" if isinstance(fraction, float) else str(fraction))
    extra = f" [{options}]" if isinstance(options, str) and options else ""
    return f"{point.get('dataset')} / {point.get('method')} @ {amount}{extra}"


def final_runs(summary: pd.DataFrame, datasets: list[str] | None = None, methods: list[str] | None = None,
               backbone: str | None = None, *, recipe: str | None = None, epochs: int | None = None) -> pd.DataFrame:
    """The runs a report shows (runs_of_one_backbone, no few-shot or option-grid runs), one per dataset, method,
    fraction and seed."""
    frame = runs_of_one_backbone(summary, datasets, methods, backbone, recipe=recipe, epochs=epochs)
    if frame.empty:
        raise ValueError("No finished runs match (status ok, pretrained, no tag"
                         f"{', datasets ' + ','.join(datasets) if datasets else ''}"
                         f"{', backbone ' + backbone if backbone else ''}"
                         f"{', recipe ' + recipe if recipe is not None else ''}"
                         f"{f', epochs {epochs}' if epochs is not None else ''}): run `make grid` first or widen the "
                         "filters.")
    return one_run_per_point(frame, ["dataset", "method", "train_fraction", "seed"])

def fraction_curves(final: pd.DataFrame) -> pd.DataFrame:
    """Per (method, fraction): test top-1 averaged over tasks, then mean, std and 95% t interval (ci_low, ci_high)
    over seeds; tuned-param %."""
    per_seed = final.groupby(["method", "train_fraction", "seed"]).agg(
        top1=("test_top1", "mean"), n_tasks=("dataset", "nunique")).reset_index()
    curves = seed_intervals(per_seed, ["method", "train_fraction"], "top1").rename(columns={"n": "n_seeds"})
    curves = curves.merge(per_seed.groupby(["method", "train_fraction"])["n_tasks"].min().reset_index(),
                          on=["method", "train_fraction"])
    curves["tuned_percent"] = curves["method"].map(final.groupby("method")["tuned_percent"].mean())
    if curves["n_tasks"].nunique() > 1:
        warnings.warn("Not every (method, fraction) has results on the same number of tasks; task averages "
                      f"mix {sorted(curves['n_tasks'].unique())} tasks. Finish the grid for a fair figure.",
                      stacklevel=2)
    return curves

def dataset_groups(datasets) -> dict[str, str]:
    """A dataset's group — VTAB-1k's Natural / Specialized / Structured, which the paper averages separately — when
    its datamodule class declares `group`, or for a VTAB task, from datamodules.vtab's task table."""
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
    tasks, PPT and the verdict against Full per task. Per task, `<task>_std` holds the std over seeds and
    `<task>_ci_low` / `_ci_high` the 95% t interval of the mean; `<task>_diff` (with `_diff_low`, `_diff_high`,
    `_diff_n`) the paired difference to Full and `<task>_vs_full` its verdict (beats / tie / below / n=1)."""
    fraction = table_fraction(final, fraction)
    at = final[np.isclose(final["train_fraction"], fraction)]
    per_task = seed_intervals(at, ["method", "dataset"]).set_index(["method", "dataset"])
    means = per_task["mean"].unstack("dataset")
    tasks = sorted(means.columns)
    rows = []
    for method in table_order(means.index):
        runs = at[at["method"] == method]
        row = {"method": method, "label": label(method), "train_fraction": fraction,
               "tuned_percent": runs["tuned_percent"].mean(), "seeds": int(per_task.loc[method, "n"].max())}
        row |= {task: means.loc[method, task] for task in tasks}
        for stat in ("std", "ci_low", "ci_high"):
            row |= {f"{task}_{stat}": per_task[stat].get((method, task), math.nan) for task in tasks}
        for group, members in group_members(tasks).items():
            row[f"{group} mean"] = means.loc[method, members].mean()
        row["mean"] = means.loc[method, tasks].mean()
        row["ppt"] = ppt(row["mean"], runs["tuned_params"].mean()) if "tuned_params" in runs else math.nan
        if "full" in means.index and method != "full":
            row |= versus_full(at, method, tasks)
        rows.append(row)
    return pd.DataFrame(rows)

def fraction_tables(final: pd.DataFrame) -> pd.DataFrame:
    """`results_table` at every train fraction present, stacked (the `train_fraction` column tells them apart): Fig. 3
    as numbers, with each point's interval and its paired verdict against Full."""
    return pd.concat([results_table(final, f) for f in sorted(final["train_fraction"].unique())], ignore_index=True)

def versus_full(at: pd.DataFrame, method: str, tasks: list[str]) -> dict:
    """Per task, the difference to Full paired by seed (one fraction, one dataset) with its t interval and verdict;
    counts of beats / ties / below / n=1 over the tasks both ran."""
    by_seed = at.set_index("seed")
    row, counts = {}, dict.fromkeys((*VERDICTS, ONE_SEED), 0)
    for task in tasks:
        scores = [by_seed.loc[(by_seed["method"] == m) & (by_seed["dataset"] == task), "test_top1"]
                  for m in (method, "full")]
        difference = paired_difference(*scores)
        if difference.n == 0:
            continue
        row |= {f"{task}_diff": difference.mean, f"{task}_diff_low": difference.low,
                f"{task}_diff_high": difference.high, f"{task}_diff_n": difference.n,
                f"{task}_vs_full": verdict(difference)}
        counts[verdict(difference)] += 1
    return row | {"beats_full": counts["beats"], "ties_full": counts["tie"], "below_full": counts["below"],
                  "untested_full": counts[ONE_SEED], "tasks_compared": sum(counts.values())}

def group_members(tasks) -> dict[str, list[str]]:
    groups = dataset_groups(tasks)
    members: dict[str, list[str]] = {}
    for task in tasks:
        if task in groups:
            members.setdefault(groups[task], []).append(task)
    return members

def selected_hparams(final: pd.DataFrame) -> pd.DataFrame:
    """The lr and weight decay the selection protocol chose, per method, task and fraction (empty if none), and
    `lr_edge`: 'lowest' / 'highest' where the chosen lr is an end of the searched grid ('' inside it or unrecorded)."""
    columns = ["method", "dataset", "train_fraction", "lr", "weight_decay", "val_top1", "lr_edge"]
    if "selected_lr" not in final or final["selected_lr"].isna().all():
        return pd.DataFrame(columns=columns)
    chosen = final[final["selected_lr"].notna()]
    chosen = chosen.assign(lr_edge=chosen.get("selected_lr_edge", pd.Series("", index=chosen.index)).fillna(""))
    return (chosen.groupby(["method", "dataset", "train_fraction"])
            .agg(lr=("selected_lr", "first"), weight_decay=("selected_weight_decay", "first"),
                 val_top1=("selected_val_top1", "first"), lr_edge=("lr_edge", "first"))
            .reset_index()[columns])


def zoo_points(final: pd.DataFrame, fraction: float | None = None) -> pd.DataFrame:
    """Per (task, method) at one train fraction (default: the largest present): test top-1 mean, std and 95% t
    interval over seeds and the tuned-parameter %, the points of the zoo figure."""
    fraction = table_fraction(final, fraction)
    at = final[np.isclose(final["train_fraction"], fraction)]
    points = seed_intervals(at, ["dataset", "method"]).rename(columns={"n": "n_seeds"})
    points = points.merge(at.groupby(["dataset", "method"])["tuned_percent"].mean().reset_index(),
                          on=["dataset", "method"])
    points["train_fraction"] = fraction
    order = {m: i for i, m in enumerate(table_order(points["method"]))}
    return points.sort_values(["dataset", "method"], key=lambda c: c.map(order) if c.name == "method" else c,
                              ignore_index=True)
