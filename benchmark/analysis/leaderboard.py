"""The leaderboard (`make report LEADERBOARD=1`): every method ranked per dataset, per suite and overall by mean test
top-1 with its 95% t interval over seeds and its seed-paired difference to Full, beside what it tunes, what its
search cost (the budget) and what it costs to train and to run; and two figures, accuracy against tuned parameters
with the Pareto front and accuracy against training throughput. docs/leaderboard.md says how to read it.

Scopes. A dataset's score is a run's test top-1. A suite's follows its paper (Jia et al., "Visual Prompt Tuning",
ECCV 2022, https://arxiv.org/abs/2203.12119): VTAB-1k the mean over each group's tasks (Natural / Specialized /
Structured, as datamodules declare them) and the mean of those group means; FGVC the mean of its tasks. Overall is
the mean over units: a suite counts once, a dataset outside every suite once. Each mean is taken per seed over the
tasks measured at that fraction, and a method has a score for a seed only where it ran every one of them; the
interval and the paired difference are then over seeds, as for one task (stats.py).

Budget, per (dataset, method, fraction) cell: the search ("full", "halving"; "none": a fixed recipe), its points,
the epochs of a point, and the training images seen by the search and the finals together. A cell's budget record
(`<results>/budget/`, written by the search: benchmark/sweeps/budget.py) says so; a cell without one (a search
older than the records, a fixed-recipe run) is read from its run records: points from a final's `search_points`
(else its search-point runs counted), epochs the finals', images n_train x epochs summed over its finished search
points and finals. A suite's budget sums its tasks' images. A row whose granted budget (search, points, epochs)
differs from its table's most common one is marked UNEQUAL_MARK, so two methods with unequal budgets never stand side
by side unmarked.

Wall time, per method (`wall_time`: leaderboard_wall_time.csv and a section of leaderboard.md): the wall seconds of
its search and of its finals, summed over the board's cells, their total and its share of the whole, and the totals
over every method. Per cell from the same sources as the budget: a record's `search_wall_seconds` and
`final_wall_seconds` (every run the search started), else the runs' `wall_seconds`: the finished search points (tagged
`search_lr<lr>_wd<wd>`, a halving rung `..._e<epochs>`) and the finals.

Costs, from `make perf` (perf.csv): train img/s, peak memory, and eval img/s relative to the plain backbone's, which
Full's evaluation is (no module added), measured merged where the method merges its update while it evaluates (a
methods.base.MergeForEvalTuning subclass, as tests/methods/test_merge_contract.py finds them).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from benchmark.analysis.aggregate import dataset_groups
from benchmark.analysis.plots import CROWDED, label_points
from benchmark.analysis.stats import ONE_SEED, paired_difference, t_interval, verdict
from benchmark.analysis.tables import markdown, number
from benchmark.core.config import is_search_tag
from benchmark.core.store import read_budgets
from benchmark.costs.perf_rows import REFERENCE, method_costs
from datamodules import FGVC_DATASETS, VTAB_DATASETS
from methods.registry import color, label, table_order

SUITES = {"VTAB-1k": VTAB_DATASETS, "FGVC": FGVC_DATASETS}  # suite -> its datasets, in the papers' order
OVERALL = "Overall"
UNEQUAL_MARK = "†"
WALL_TOTAL = "TOTAL"  # the wall-time table's row of every method together
CELL = ["dataset", "method", "train_fraction"]
BUDGET = ["search", "points", "epochs", "images_seen"]
WALL = ["search_seconds", "final_seconds"]  # per cell: where the wall time went
EQUAL_BUDGET = ["search", "points", "epochs"]  # what was granted; images seen also count a point that failed


# --- scopes: datasets, suite groups, suites, overall ---------------------------------------------------------------
def suite_layout(datasets) -> dict[str, dict[str, list[str]]]:
    """Suite -> group -> its datasets among `datasets`, in the suite's order; a suite without groups (FGVC) has one
    group named after itself. The groups are the datamodules' (aggregate.dataset_groups)."""
    groups, present = dataset_groups(datasets), set(datasets)
    layout: dict[str, dict[str, list[str]]] = {}
    for suite, members in SUITES.items():
        for name in (m for m in members if m in present):
            layout.setdefault(suite, {}).setdefault(groups.get(name, suite), []).append(name)
    return layout


def in_a_suite(dataset: str) -> bool:
    return any(dataset in members for members in SUITES.values())


def scope_scores(at: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """At one fraction: a (method, seed) x scope table of scores (NaN where a method lacks a task of the scope for
    that seed) and each scope's datasets. Columns: the overall scope, suites, their groups, then datasets."""
    wide = at.pivot_table(index=["method", "seed"], columns="dataset", values="test_top1")
    scores, members = {}, {}
    units = {name: wide[name] for name in wide.columns if not in_a_suite(name)}
    for suite, groups in suite_layout(wide.columns).items():
        tasks = [t for group in groups.values() for t in group]
        means = {g: wide[group].mean(axis=1, skipna=False) for g, group in groups.items()}
        name = f"{suite} ({len(tasks)} tasks" + (f", mean of {len(groups)} groups)" if len(groups) > 1 else ")")
        scores[name], members[name] = pd.concat(means, axis=1).mean(axis=1, skipna=False), tasks
        units[suite] = scores[name]
        for group, group_tasks in groups.items() if len(groups) > 1 else ():
            scores[f"{suite} {group} ({len(group_tasks)} tasks)"] = means[group]
            members[f"{suite} {group} ({len(group_tasks)} tasks)"] = group_tasks
    overall = pd.DataFrame({OVERALL: pd.concat(units, axis=1).mean(axis=1, skipna=False)})
    wide_scopes = pd.concat([overall, pd.DataFrame(scores, index=wide.index), wide[sorted(wide.columns)]], axis=1)
    return wide_scopes, {OVERALL: sorted(wide.columns)} | members | {d: [d] for d in sorted(wide.columns)}


# --- budgets -------------------------------------------------------------------------------------------------------
def images_seen(runs: pd.DataFrame) -> pd.Series:
    """Training images each run saw: n_train x epochs."""
    return pd.to_numeric(runs["n_train"], errors="coerce") * pd.to_numeric(runs["epochs"], errors="coerce")


def search_runs(summary: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """The finished search points of `final`'s cells: tagged search_*, same backbone and recipe as the cell's finals,
    no few-shot or option-grid point (their cells are not the leaderboard's)."""
    if "tag" not in summary:
        return summary.iloc[0:0]
    points = summary[(summary["status"] == "ok") & summary["tag"].fillna("").astype(str).map(is_search_tag)]
    for column in ("shots", "options"):
        if column in points:
            points = points[points[column].isna() | (points[column].astype(str) == "")]
    keys = CELL + [c for c in ("backbone", "recipe") if c in points and c in final]
    return points.merge(final[keys].drop_duplicates(), on=keys)


def derived_budgets(summary: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """Cells without a budget record: points from the finals' `search_points` (else the search-point runs counted;
    0: a fixed recipe), the finals' epochs, images seen over the finished search points and the finals."""
    recorded = final["search_points"] if "search_points" in final else pd.Series(np.nan, index=final.index)
    budget = (final.assign(images=images_seen(final), recorded=pd.to_numeric(recorded, errors="coerce"),
                           seconds=wall_seconds(final))
              .groupby(CELL).agg(epochs=("epochs", "max"), images_seen=("images", "sum"), recorded=("recorded", "max"),
                                 final_seconds=("seconds", lambda v: v.sum(min_count=1))))
    points = search_runs(summary, final)
    searched = (points.assign(images=images_seen(points), seconds=wall_seconds(points)).groupby(CELL)
                .agg(counted=("tag", "nunique"), search_images=("images", "sum"),
                     search_seconds=("seconds", lambda v: v.sum(min_count=1))))
    budget = budget.join(searched).fillna({"counted": 0, "search_images": 0})
    budget["search_seconds"] = budget["search_seconds"].where(budget["counted"] > 0, 0.0)  # no search: it cost 0
    budget["points"] = budget["recorded"].fillna(budget["counted"]).astype(int)
    budget["images_seen"] += budget["search_images"]
    budget["search"] = np.where(budget["points"] > 0, "full", "none")
    return budget[BUDGET + WALL]


def wall_seconds(runs: pd.DataFrame) -> pd.Series:
    """Each run's recorded wall seconds (NaN where a run record lacks them)."""
    return pd.to_numeric(runs.get("wall_seconds", pd.Series(np.nan, index=runs.index)), errors="coerce")


def recorded_budgets(records: list[dict], final: pd.DataFrame) -> pd.DataFrame:
    """The budget records (benchmark/sweeps/budget.py) of `final`'s cells: same backbone and recipe, no few-shot or
    option-grid cell; images seen are the search's and the finals'."""
    frame = pd.DataFrame(records)
    if frame.empty:
        return pd.DataFrame(columns=BUDGET + WALL, index=pd.MultiIndex.from_tuples([], names=CELL))
    plain = frame["shots"].isna() & frame["options"].fillna("").astype(str).isin(["", "{}"])
    keys = CELL + [c for c in ("backbone", "recipe") if c in final]
    frame = frame[plain].merge(final[keys].drop_duplicates(), on=keys)
    frame["images_seen"] = frame["search_images"] + frame["final_images"]
    frame = frame.rename(columns={"search_wall_seconds": "search_seconds", "final_wall_seconds": "final_seconds"})
    return frame.set_index(CELL).reindex(columns=BUDGET + WALL)


def cell_budgets(summary: pd.DataFrame, final: pd.DataFrame, records: list[dict] | None = None) -> pd.DataFrame:
    """Per (dataset, method, fraction) cell: search, points, epochs, images seen, and the search's and the finals'
    wall seconds; a budget record, where the search wrote one, wins over what the run records tell (module
    docstring)."""
    budget = recorded_budgets(records or [], final).combine_first(derived_budgets(summary, final))
    return budget.reset_index()[[*CELL, *BUDGET, *WALL]]


def wall_time(budgets: pd.DataFrame) -> pd.DataFrame:
    """Per method (most costly first), then TOTAL: the wall seconds of its search and its finals over the cells of
    `budgets` (cell_budgets), their total and that total's share (%) of every method's."""
    per_method = budgets[WALL].astype(float).groupby(budgets["method"]).sum(min_count=1)
    per_method["total_seconds"] = per_method["search_seconds"] + per_method["final_seconds"]  # NaN: unknown
    per_method = per_method.sort_values("total_seconds", ascending=False, kind="stable")
    whole = per_method.sum(min_count=1).rename(WALL_TOTAL).to_frame().T  # the methods whose times are known
    table = pd.concat([per_method, whole]).rename_axis("method").reset_index()
    table.insert(1, "label", [WALL_TOTAL if m == WALL_TOTAL else label(m) for m in table["method"]])
    seconds = whole["total_seconds"].iloc[0]
    return table.assign(share_percent=100 * table["total_seconds"] / seconds if seconds > 0 else math.nan)


def span(values) -> str:
    """One value as it is, several as their range: the points or epochs of a suite's tasks."""
    values = sorted({int(v) for v in values if pd.notna(v)})
    return "?" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def scope_budget(budgets: pd.DataFrame, method: str, datasets: list[str]) -> dict:
    rows = budgets[(budgets["method"] == method) & budgets["dataset"].isin(datasets)]
    return {"search": "/".join(sorted(set(rows["search"]))) or "?", "points": span(rows["points"]),
            "epochs": span(rows["epochs"]),
            "images_seen": rows["images_seen"].sum(min_count=len(datasets))}  # NaN unless every task's is known


def mark_unequal(board: pd.DataFrame) -> pd.Series:
    """True for rows whose granted budget (EQUAL_BUDGET) differs from the board's most common one (ties: the
    best-ranked row's)."""
    keys = board[EQUAL_BUDGET].astype(str).agg("|".join, axis=1)
    counts = keys.value_counts(sort=False)
    reference = max(keys, key=lambda k: (counts[k], -list(keys).index(k)))
    return keys != reference


# --- the boards ----------------------------------------------------------------------------------------------------
def board(scores: pd.Series) -> pd.DataFrame:
    """One scope's rows: per method the mean, 95% t interval and seeds of `scores` (indexed by method, seed), and its
    difference to Full paired by seed with interval and verdict; sorted by mean (ties: Table 1's order), ranked."""
    scores = scores.dropna()
    reference = scores.xs(REFERENCE, level="method") if REFERENCE in scores.index.get_level_values(0) else None
    rows = []
    for method in table_order(scores.index.get_level_values("method")):
        by_seed = scores.xs(method, level="method")
        interval = t_interval(by_seed)
        row = {"method": method, "label": label(method), "mean": interval.mean, "ci_low": interval.low,
               "ci_high": interval.high, "n_seeds": interval.n}
        if reference is not None and method != REFERENCE:
            difference = paired_difference(by_seed, reference)
            row |= {"diff": difference.mean, "diff_low": difference.low, "diff_high": difference.high,
                    "diff_n": difference.n, "vs_full": verdict(difference) if difference.n else ""}
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values("mean", ascending=False, kind="stable", ignore_index=True)
    return frame.assign(rank=np.arange(1, len(frame) + 1))


def leaderboard(final: pd.DataFrame, summary: pd.DataFrame, perf_path: str | Path | None = None,
                budget_records: list[dict] | None = None) -> pd.DataFrame:
    """Every board at every fraction, stacked: one row per (train_fraction, scope, method) with its rank, numbers,
    tuned %, budget (and `unequal_budget`) and costs."""
    budgets = cell_budgets(summary, final, budget_records)
    costs = method_costs(perf_path, str(final["backbone"].iloc[0]), final["method"].unique())
    boards = []
    for fraction in sorted(final["train_fraction"].unique()):
        at = final[np.isclose(final["train_fraction"], fraction)]
        wide, members = scope_scores(at)
        for scope in wide.columns:
            rows = board(wide[scope])
            if rows.empty:
                continue
            tuned = at[at["dataset"].isin(members[scope])].groupby("method")["tuned_percent"].mean()
            extra = [scope_budget(budgets[np.isclose(budgets["train_fraction"], fraction)], m, members[scope])
                     for m in rows["method"]]
            rows = pd.concat([rows, pd.DataFrame(extra)], axis=1)
            rows = rows.assign(train_fraction=fraction, scope=scope, tasks=len(members[scope]),
                               tuned_percent=rows["method"].map(tuned), unequal_budget=mark_unequal(rows))
            boards.append(rows.join(costs, on="method"))
    frame = pd.concat(boards, ignore_index=True)
    return frame.reindex(columns=["train_fraction", "scope", "tasks", "rank", "method", "label", "mean", "ci_low",
                                  "ci_high", "n_seeds", "diff", "diff_low", "diff_high", "diff_n", "vs_full",
                                  "tuned_percent", *BUDGET, "unequal_budget",
                                  *costs.columns])


# --- Markdown ------------------------------------------------------------------------------------------------------
def count_text(value) -> str:
    """1234567 -> 1.23M: images seen, read at a glance."""
    if pd.isna(value):
        return "?"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.0f}"


def interval_text(mean, low, high) -> str:
    return number(mean) + (" (n=1)" if pd.isna(low) else f" ± {number((high - low) / 2)}")


def difference_text(diff, low, high, outcome) -> str:
    if pd.isna(diff):
        return "–"
    return f"{diff:+.2f} ({ONE_SEED})" if pd.isna(low) else f"{diff:+.2f} [{low:+.2f}, {high:+.2f}] {outcome}"


def eval_text(row) -> str:
    if pd.isna(row.get("eval_vs_plain", math.nan)):
        return "–"
    return f"{row['eval_vs_plain']:.2f}×" + (" merged" if row["merged"] else "")


def board_markdown(rows: pd.DataFrame, columns: dict[str, pd.Series] | None = None) -> str:
    shown = pd.DataFrame({
        "#": rows["rank"],
        "Method": rows["label"] + np.where(rows["unequal_budget"], f" {UNEQUAL_MARK}", ""),
        "Top-1 (%)": [interval_text(*v) for v in zip(rows["mean"], rows["ci_low"], rows["ci_high"], strict=True)],
        "vs Full (paired)": [difference_text(*v) for v in zip(
            rows["diff"], rows["diff_low"], rows["diff_high"], rows["vs_full"], strict=True)],
    })
    for name, values in (columns or {}).items():
        shown[name] = values.to_numpy()
    shown["Tuned (%)"] = rows["tuned_percent"].map(lambda v: f"{v:.3g}")
    shown["Budget: search · points · epochs · images"] = [f"{s} · {p} · {e} · {count_text(i)}" for s, p, e, i in zip(
        rows["search"], rows["points"], rows["epochs"], rows["images_seen"], strict=True)]
    shown["Train img/s"] = rows["train_img_s"].map(lambda v: number(v, 0))
    shown["Peak mem (MB)"] = rows["peak_mem_mb"].map(lambda v: number(v, 0))
    shown["Eval speed (× plain)"] = [eval_text(row) for _, row in rows.iterrows()]
    return markdown(shown)


def fraction_markdown(at: pd.DataFrame) -> list[str]:
    overall = at[at["scope"] == OVERALL].reset_index(drop=True)
    others = [s for s in at["scope"].unique() if s != OVERALL]
    tasks = at.drop_duplicates("scope").set_index("scope")["tasks"]
    # beside Overall: the suites' and groups' means, or the datasets' where no suite is present
    shown = [s for s in others if tasks[s] > 1] or (others if len(others) > 1 else [])
    means = {scope: overall["method"].map(at[at["scope"] == scope].set_index("method")["mean"]).map(number)
             for scope in shown}
    text = [f"## {100 * at['train_fraction'].iloc[0]:g}% of the training data", "", f"**{OVERALL}** "
            f"({int(overall['tasks'].iloc[0])} tasks)", "", board_markdown(overall, means)]
    for scope in others if len(others) > 1 else ():
        text += ["", f"**{scope}**", "", board_markdown(at[at["scope"] == scope].reset_index(drop=True))]
    return text


def duration_text(seconds) -> str:
    """3725 -> 1.03 h: the wall-time table's durations, in the unit that reads best."""
    if pd.isna(seconds):
        return "?"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def wall_time_markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({"Method": table["label"]})
    for column, name in (("search_seconds", "Search"), ("final_seconds", "Finals"), ("total_seconds", "Total")):
        shown[name] = table[column].map(duration_text)
    shown["Share of the whole"] = table["share_percent"].map(lambda v: "?" if pd.isna(v) else f"{v:.1f}%")
    return "\n".join(["## Wall time", "", "Where the wall time went, per method: its search (every point, halving "
                      "rungs and widenings included) and its final runs, summed over the cells above (seconds in "
                      "leaderboard_wall_time.csv).", "", markdown(shown)])


def leaderboard_markdown(frame: pd.DataFrame) -> str:
    seeds = int(frame["n_seeds"].max())
    text = ["# Leaderboard", "", f"Test top-1 (%): mean ± half-width of the 95% confidence interval over up to {seeds} "
            "seeds (Student t); vs Full: the difference to Full paired by seed, mean [95% CI] and verdict (beats / "
            f"tie / below; {ONE_SEED}: one seed, no interval). Sorted by mean. Suites: VTAB-1k the mean of its group "
            "means, FGVC the mean of its tasks; Overall the mean over suites and the datasets outside them. Budget: "
            "the search (full, halving; none: a fixed recipe), its points, the epochs per run and the training images "
            "seen by the search and the final runs. "
            f"{UNEQUAL_MARK}: a budget unlike the table's most common one, so not ranked on equal terms. Eval speed: "
            "eval img/s over Full's (the plain backbone), merged where the method folds its update into the weights "
            "for evaluation; train img/s, memory and eval speed from `make perf`"
            + (f" ({frame['perf'].dropna().iloc[0]})." if frame["perf"].notna().any() else " (no perf.csv: –).")]
    for fraction in sorted(frame["train_fraction"].unique()):
        text += ["", *fraction_markdown(frame[frame["train_fraction"] == fraction])]
    return "\n".join(text) + "\n"


# --- figures -------------------------------------------------------------------------------------------------------
def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for the points of the upper-left envelope: no other point has an x as small or smaller and a higher y (of
    two identical points, the first). A running maximum over the points sorted by x, y descending within one x."""
    ordered = points.sort_values([x, y], ascending=[True, False], kind="stable")
    best_before = ordered[y].cummax().shift(fill_value=-math.inf)
    return (ordered[y] > best_before).reindex(points.index)


def plot_front(rows: pd.DataFrame, x: str, xlabel: str, title: str, smaller_is_better: bool) -> Figure:
    """Top-1 with its interval against `x` (log), the Pareto front as a step line through the non-dominated points."""
    fig = Figure(figsize=(8, 5.5) if len(rows) <= CROWDED else (12, 8), layout="constrained")
    FigureCanvasAgg(fig)  # the labels are measured with the canvas' renderer
    ax = fig.subplots()
    rows = rows.dropna(subset=[x, "mean"]).reset_index(drop=True)
    for _, row in rows.iterrows():
        error = None if pd.isna(row["ci_low"]) else [[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]]
        ax.errorbar(row[x], row["mean"], yerr=error, marker="o", ms=6, capsize=2, ls="none", color=color(row["method"]))
    front = rows[pareto_front(rows.assign(key=rows[x] if smaller_is_better else -rows[x]), "key", "mean")]
    front = front.sort_values(x)
    ax.step(front[x], front["mean"], where="post" if smaller_is_better else "pre", color="0.3", ls="--", lw=1,
            label="Pareto front", zorder=0)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 2000, not 2×10³
    # minor ticks labelled only within one decade, where no major tick but one may show; over more they would crowd
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if np.log10(np.divide(*ax.get_xlim()[::-1])) <= 1
                                               else ""))
    ax.set_xlabel(xlabel)
    seeds = int(rows["n_seeds"].max())
    ax.set_ylabel(f"test top-1 (%){f', mean ± 95% CI over {seeds} seeds' if seeds > 1 else ''}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", frameon=False)
    ax.set_title(title, fontsize=10)
    label_points(ax, rows[x], rows["mean"], [row["label"] + (f" {UNEQUAL_MARK}" if row["unequal_budget"] else "")
                                             for _, row in rows.iterrows()], [color(m) for m in rows["method"]])
    return fig


def leaderboard_figures(frame: pd.DataFrame) -> dict[str, Figure]:
    """Per fraction, on the Overall scope: accuracy against tuned parameters (%), and against train img/s when
    perf.csv measured the methods."""
    figures = {}
    for fraction in sorted(frame["train_fraction"].unique()):
        rows = frame[(frame["train_fraction"] == fraction) & (frame["scope"] == OVERALL)]
        where = f"{OVERALL.lower()}, {100 * fraction:g}% of the training data"
        where += f"; {UNEQUAL_MARK}: unequal budget" if rows["unequal_budget"].any() else ""
        figures[f"leaderboard_params_frac{fraction:g}"] = plot_front(
            rows, "tuned_percent", "tuned parameters (% of the model, log)",
            f"Accuracy against tuned parameters ({where})", smaller_is_better=True)
        if rows["train_img_s"].notna().any():
            figures[f"leaderboard_cost_frac{fraction:g}"] = plot_front(
                rows, "train_img_s", "training images/s (`make perf`, log; right is cheaper)",
                f"Accuracy against training throughput ({where})", smaller_is_better=False)
    return figures


def write_leaderboard(final: pd.DataFrame, summary: pd.DataFrame, out: Path, results_dir: str | Path,
                      perf_path: str | Path | None = None) -> tuple[dict[str, Path], dict[str, pd.DataFrame]]:
    """leaderboard.md (the boards, then the wall time), leaderboard.csv, leaderboard_wall_time.csv and the figures
    (PNG + PDF) into `out`, the budgets read from `results_dir`'s records; returns the paths and the tables by name
    (`leaderboard`, `leaderboard_wall_time`)."""
    records = read_budgets(results_dir)
    frame = leaderboard(final, summary, perf_path, records)
    tables = {"leaderboard": frame, "leaderboard_wall_time": wall_time(cell_budgets(summary, final, records))}
    written = {f"{name}.csv": out / f"{name}.csv" for name in tables} | {"leaderboard.md": out / "leaderboard.md"}
    for name, table in tables.items():
        table.to_csv(written[f"{name}.csv"], index=False)
    written["leaderboard.md"].write_text(leaderboard_markdown(frame) + "\n" + wall_time_markdown(
        tables["leaderboard_wall_time"]) + "\n")
    for name, fig in leaderboard_figures(frame).items():
        for suffix in ("png", "pdf"):
            written[f"{name}.{suffix}"] = out / f"{name}.{suffix}"
            fig.savefig(written[f"{name}.{suffix}"], dpi=150)
    return written, tables
