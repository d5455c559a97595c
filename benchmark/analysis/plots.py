"""Fig. 3 and the parameter plot, after Jia et al., "Visual Prompt Tuning", ECCV 2022
(https://arxiv.org/abs/2203.12119): Fig. 3 compares VPT-deep with Linear, Adapter and Bias over training-data
fractions. Colours and labels are the methods' own (methods.registry)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from adjustText import adjust_text
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from methods.registry import color, label, table_order

FIG3_FOCUS = "vpt_deep"
FIG3_COMPARED = ("linear", "adapter", "bias")  # one panel each, as in the paper
FIG3_REFERENCES = ("vpt_shallow", "full")  # drawn in every panel
AHEAD_COLOR, BEHIND_COLOR = "#2ca02c", "#d62728"  # shading: VPT-deep ahead / behind the compared method
PERCENT_RANGE = (1e-3, 100.0)  # tuned-parameter % mapped to marker area on a log scale
MARKER_AREA = (10.0, 190.0)
FRACTION_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CROWDED = 24  # a labelled panel of more points gets a larger canvas, room for their labels
LABEL_GAP = 1.1  # a label moved off another steps by this many label heights, so the two do not touch


def marker_area(tuned_percent) -> np.ndarray:
    """Marker area linear in log10(tuned-parameter %), as the paper's Fig. 3 sizes its markers."""
    low, high = (math.log10(p) for p in PERCENT_RANGE)
    share = (np.log10(np.clip(np.asarray(tuned_percent, dtype=float), *PERCENT_RANGE)) - low) / (high - low)
    return MARKER_AREA[0] + share * (MARKER_AREA[1] - MARKER_AREA[0])

def draw_method(ax, curves: pd.DataFrame, method: str, reference: bool = False) -> bool:
    curve = curves[curves["method"] == method].sort_values("train_fraction")
    if curve.empty:
        return False
    x, y = curve["train_fraction"].to_numpy(), curve["mean"].to_numpy()
    style = dict(lw=1.2, ls="--", alpha=0.8, zorder=2) if reference else dict(lw=2.2, ls="-", zorder=3)
    ax.plot(x, y, color=color(method), **style)
    ax.scatter(x, y, s=marker_area(curve["tuned_percent"]), color=color(method), edgecolors="white",
               linewidths=0.8, zorder=style["zorder"] + 1, alpha=style.get("alpha", 1.0))
    if (curve["n_seeds"] > 1).any():  # the 95% t interval over seeds; a one-seed point has none (NaN: no band)
        ax.fill_between(x, curve["ci_low"].to_numpy(), curve["ci_high"].to_numpy(), color=color(method),
                        alpha=0.12 if reference else 0.2, lw=0, zorder=1)
    return True

def interval_error(row) -> list[list[float]] | None:
    """Matplotlib's yerr for a point's 95% t interval: [[below], [above]]; None for one seed (no interval)."""
    if row["n_seeds"] < 2:
        return None
    return [[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]]


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
        handles.append(Patch(color="0.6", alpha=0.3, label=f"band: 95% CI over {n_seeds} seeds (Student t)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title or "Fig. 3: VPT-deep against other protocols over training-data size "
                 "(marker area ∝ log tuned-parameter %)")
    return fig

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
            ax.errorbar(row["tuned_percent"], row["mean"], yerr=interval_error(row),
                        marker=markers[row["train_fraction"]], color=color(method), ms=7, capsize=2, ls="none")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel("tuned parameters (% of the model)")
    n_seeds = int(curves["n_seeds"].max())
    ax.set_ylabel(f"test top-1 (%), task mean{f' ± 95% CI over {n_seeds} seeds' if n_seeds > 1 else ''}")
    ax.grid(True, which="both", alpha=0.3)
    method_handles = [Line2D([], [], color=color(m), marker="o", ls="none", label=label(m))
                      for m in table_order(curves["method"])]
    fraction_handles = [Line2D([], [], color="0.3", marker=markers[f], ls="none", label=f"{100 * f:g}% data")
                        for f in fractions]
    fig.legend(handles=method_handles + fraction_handles, loc="outside right center", frameon=False)
    ax.set_title(title or "Accuracy against tuned parameters")
    return fig


def separate_labels(ax, texts: list, renderer) -> None:
    """Moves each label into the axes sideways where it sticks out, then, if it overlaps one before it, up or down by
    whole steps of LABEL_GAP label heights, the nearest free place inside the axes first (down before up); a label
    with no free place within 40 steps stays. adjustText's forces leave a few overlaps among dozens of crowded labels
    (4 pairs of the leaderboard reference's 68 at 10%), and the figures promise none."""
    inside = ax.get_window_extent(renderer)
    placed = []
    for text in texts:
        box = text.get_window_extent(renderer)
        dx = max(inside.x0 - box.x0, min(0.0, inside.x1 - box.x1))
        for step in sorted(range(-40, 41), key=abs):
            dy = step * LABEL_GAP * box.height
            moved = box.translated(dx, dy)
            if (inside.y0 <= moved.y0 and moved.y1 <= inside.y1
                    and not any(moved.overlaps(other) for other in placed)):
                break
        else:
            dy, moved = 0.0, box.translated(dx, 0)
        if dx or dy:
            shifted = ax.transData.transform(text.get_position()) + (dx, dy)
            text.set_position(ax.transData.inverted().transform(shifted))
        placed.append(moved)


def label_points(ax, xs, ys, labels, colors) -> None:
    """Each point's label, moved by adjustText and then `separate_labels` until no two overlap, joined to its point
    by a grey line (from the label's box to the point). Call it on finished axes: it draws the figure first, so that
    the labels are placed on the final layout."""
    ax.figure.canvas.draw()
    texts = [ax.text(x, y, text, fontsize=7, color=colour) for x, y, text, colour in
             zip(xs, ys, labels, colors, strict=True)]
    adjust_text(texts, ax=ax)
    separate_labels(ax, texts, ax.figure.canvas.get_renderer())
    for text, x, y in zip(texts, xs, ys, strict=True):
        ax.add_patch(FancyArrowPatch(posA=text.get_position(), posB=(x, y), patchA=text, shrinkB=0, arrowstyle="-",
                                     color="0.6", lw=0.5))


def plot_zoo(points: pd.DataFrame, title: str | None = None) -> Figure:
    """Every method at one training-data fraction: test top-1 against tuned-parameter % (log x), one panel per task,
    each point labelled with its method (the PETL surveys' accuracy-vs-parameters view)."""
    tasks = sorted(points["dataset"].unique())
    crowded = points.groupby("dataset").size().max() > CROWDED
    fig = Figure(figsize=(9.5 * len(tasks), 8) if crowded else (6.5 * len(tasks), 5.5), layout="constrained")
    FigureCanvasAgg(fig)  # the labels are measured with the canvas' renderer
    axes = np.atleast_1d(fig.subplots(1, len(tasks), sharey=False))
    for ax, task in zip(axes, tasks, strict=True):
        for _, row in points[points["dataset"] == task].iterrows():
            ax.errorbar(row["tuned_percent"], row["mean"], yerr=interval_error(row), marker="o", ms=7,
                        color=color(row["method"]), capsize=2, ls="none")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_xlabel("tuned parameters (% of the model)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    n_seeds = int(points["n_seeds"].max())
    axes[0].set_ylabel(f"test top-1 (%){f', mean ± 95% CI over {n_seeds} seeds' if n_seeds > 1 else ''}")
    fraction = float(points["train_fraction"].iloc[0])
    fig.suptitle(title or f"Every method at {100 * fraction:g}% of the training data: accuracy against tuned "
                 "parameters")
    for ax, task in zip(axes, tasks, strict=True):
        rows = points[points["dataset"] == task]
        label_points(ax, rows["tuned_percent"], rows["mean"], [label(m) for m in rows["method"]],
                     [color(m) for m in rows["method"]])
    return fig
