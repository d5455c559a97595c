"""`make perf`'s rows: the settings each method is measured with (its recipe's optimizer and options) and the costs
read back from perf.csv per method (train and eval img/s, peak memory, eval speed relative to the plain backbone's,
merged or not), which the leaderboard (benchmark/analysis/leaderboard.py) shows and a dry run's estimate
(benchmark/costs/estimate.py) scales. Light on purpose: reading a csv needs no torch model code."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pandas as pd

from benchmark.core.config import EMBEDDED_BACKBONE, load_recipe
from methods import get_method_class, list_methods
from methods.base import MergeForEvalTuning

REFERENCE = "full"  # the paired difference's reference, and the plain backbone's evaluation speed
# perf.csv's columns that make one measurement configuration; the leaderboard reads one configuration
PERF_CONFIG = ["batch_size", "img_size", "device", "precision", "compile", "checkpointing"]


def recipe_settings(method: str, backbone: str, given: dict) -> dict:
    """Optimizer and method options from the method's recipe (quick for the embedded backbone, paper otherwise),
    options overridden by `given` where the method has them. VPT's prompt length is its cost knob."""
    accepted = {f.name for f in fields(get_method_class(method).options_cls)}
    try:
        recipe = load_recipe("quick" if backbone == EMBEDDED_BACKBONE else "paper", method)
    except (ValueError, OSError):  # no such recipe: SGD and the method's own defaults
        recipe = {}
    options = {k: v for k, v in {**recipe.get("method_options", {}), **given}.items() if k in accepted}
    return {"optimizer": recipe.get("optimizer", "sgd"), "method_options": options}


def known(method: str) -> bool:
    return method in list_methods()


def merges(method: str, options: str = "{}") -> bool:
    """Whether the method evaluates with its update merged: a class fact, which its merge_for_eval may switch off."""
    return (known(method) and issubclass(get_method_class(method), MergeForEvalTuning)
            and json.loads(options).get("merge_for_eval", True))


def measured_as_recipe(perf: pd.DataFrame, backbone: str) -> pd.Series:
    """True for perf.csv rows measured with the options plain `make perf` gives each method (its recipe's), the
    options of the leaderboard's runs; a row of other METHOD_ARGS measured another model."""
    stated = {m: recipe_settings(m, backbone, {})["method_options"] for m in perf["method"].unique()}
    options = perf.get("method_options", pd.Series("{}", index=perf.index)).fillna("{}").map(json.loads)
    return pd.Series([options[i] == stated[m] for i, m in zip(perf.index, perf["method"], strict=True)],
                     index=perf.index, dtype=bool)


def method_costs(perf_path: str | Path | None, backbone: str, methods, recipe_options: bool = True) -> pd.DataFrame:
    """Per method: train_img_s, peak_mem_mb, eval_img_s, eval_vs_plain (its eval img/s over Full's), merged, and
    the perf configuration measured (`perf`); empty when perf.csv is absent or holds none of `methods` on `backbone`
    with their recipe's options (`recipe_options=False`: with any options). Of several configurations the one that
    measured most of `methods` counts (then the latest measurement of each)."""
    columns = ["train_img_s", "peak_mem_mb", "eval_img_s", "eval_vs_plain", "merged", "perf"]
    if perf_path is None or not Path(perf_path).is_file():
        return pd.DataFrame(columns=columns)
    perf = pd.read_csv(perf_path)
    perf = perf[(perf["backbone"] == backbone) & perf["method"].isin([m for m in methods if known(m)])]
    perf = perf[measured_as_recipe(perf, backbone)] if recipe_options and not perf.empty else perf
    if perf.empty:
        return pd.DataFrame(columns=columns)
    config = [c for c in PERF_CONFIG if c in perf]
    perf = perf.assign(perf=perf[config].astype(str).agg(", ".join, axis=1))
    if "measured_at" in perf:
        perf = perf.sort_values("measured_at", kind="stable")
    coverage = perf.groupby("perf", sort=False)["method"].nunique()
    chosen = perf[perf["perf"] == coverage.idxmax()].drop_duplicates("method", keep="last").set_index("method")
    chosen["eval_vs_plain"] = chosen["eval_img_s"] / chosen["eval_img_s"].get(REFERENCE, math.nan)
    chosen["merged"] = [merges(m, options) for m, options in chosen["method_options"].fillna("{}").items()]
    return chosen[columns]
