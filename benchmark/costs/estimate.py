"""What a planned grid costs in device time, from `make perf` figures: `DRY_RUN=1 PERF=<perf.csv>` on any grid target.

Images. A run trains on its fraction of the training pool (train; a final: train + val) for its epochs, and scores
val after every epoch and test once (benchmark/core/pipeline.py), so it trains `n_train x epochs` images and
evaluates `val x epochs + test`. The split sizes are the ones a dataset family publishes (`split_sizes()` of its
datamodule: VTAB-1k's 800 / 200 and each task's test set, datamodules/vtab.py; the embedded tasks' carving,
datamodules/embedded.py), so no data need be on disk; a
dataset without published sizes is left out of the estimate and named. `n_train` is the fraction of the pool (the
split rounds per class: within a few images), or `shots x classes`.

Speed. Per method the train and eval img/s of the PERF csv, read as the leaderboard reads it
(benchmark/costs/perf_rows.py `method_costs`: the rows of the grid's backbone, or of its architecture,
`vit_base_patch16_224` for `vit_base_patch16_224.orig_in21k`, measured with the recipe's options, else, where the
csv predates a recipe option and lacks Full so, with any: the header says so). Given Full's img/s on another device
(`--full-train-img-s`, `--full-eval-img-s`, e.g. a published GPU figure), each method's are Full's scaled by the csv's
ratios to Full: train img/s = Full's / step_vs_full, eval img/s = Full's x eval_vs_plain. A method the csv did not
measure is counted at Full's speed and named. Device time = images / img/s, train and eval apart, summed over the
runs and divided over `--estimate-devices` devices (each run on one device, the runs dealt out evenly: no
scheduling gaps, no data loading or start-up counted).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from benchmark.core.config import RunConfig, is_search_tag
from benchmark.core.errors import ConfigError
from benchmark.costs.perf_rows import REFERENCE, method_costs
from datamodules import get_datamodule_class

PHASES = ("search", "finals")


def run_images(cfg: RunConfig) -> dict[str, int] | None:
    """The images a planned run trains and evaluates (module docstring); None when its dataset publishes no sizes."""
    sizes = get_datamodule_class(cfg.dataset).split_sizes()
    if sizes is None:
        return None
    resolved = cfg.resolved()
    pool = sizes["train"] + (sizes["val"] if resolved.train_on == "trainval" else 0)
    n_train = (min(pool, resolved.shots * sizes["classes"]) if resolved.shots is not None
               else round(resolved.train_fraction * pool))
    return {"train_images": n_train * resolved.epochs, "eval_images": sizes["val"] * resolved.epochs + sizes["test"]}


def phase(cfg: RunConfig) -> str:
    """`search` for a search point or halving rung (tagged search_*), `finals` for every other run."""
    return "search" if is_search_tag(cfg.tag) else "finals"


def method_speeds(perf_path: str | Path, backbone: str, methods: list[str], full_train_img_s: float | None = None,
                  full_eval_img_s: float | None = None) -> tuple[pd.DataFrame, list[str], str]:
    """(per method train_img_s and eval_img_s, the methods counted at Full's speed, the csv configuration read);
    ConfigError naming the fix when the csv is missing, or measured neither the backbone nor Full."""
    if not Path(perf_path).is_file():
        raise ConfigError(f"PERF={perf_path} is no file; give a `make perf` csv, e.g. "
                          "PERF=results/reference/perf/perf.csv.")
    wanted = list(dict.fromkeys([REFERENCE, *methods]))
    # the backbone, else its architecture (same speed, other weights); the recipe's options, else any (a csv older
    # than a recipe option, e.g. Full's dropout)
    for name, as_recipe in ((backbone, True), (backbone.split(".")[0], True), (backbone, False),
                            (backbone.split(".")[0], False)):
        costs = method_costs(perf_path, name, wanted, recipe_options=as_recipe)
        if REFERENCE in costs.index:
            break
    if REFERENCE not in costs.index:
        raise ConfigError(f"PERF={perf_path} has no row of METHOD={REFERENCE} on BACKBONE={backbone} (or its "
                          f"architecture {backbone.split('.')[0]}), which the estimate scales from; measure it: make "
                          f"perf BACKBONE={backbone.split('.')[0]} METHODS={REFERENCE},<methods>.")
    full = costs.loc[REFERENCE]
    train_vs_full = costs["train_img_s"] / full["train_img_s"]  # 1 / step_vs_full
    speeds = pd.DataFrame({
        "train_img_s": (full_train_img_s or full["train_img_s"]) * train_vs_full,
        "eval_img_s": (full_eval_img_s or full["eval_img_s"]) * costs["eval_vs_plain"]})
    missing = [m for m in wanted if m not in speeds.index]
    speeds = pd.concat([speeds, pd.DataFrame([speeds.loc[REFERENCE]] * len(missing), index=missing)])
    return speeds, missing, str(full["perf"]) + ("" if as_recipe else "; options as measured, not the recipe's")


def estimate(configs: list[RunConfig], speeds: pd.DataFrame, devices: int = 1) -> tuple[pd.DataFrame, list[str]]:
    """Per phase (search, finals) and `total`: runs, train and eval images, and device hours of training and of
    evaluation over `devices` devices; and the datasets left out (no published sizes)."""
    rows, unknown = [], {}
    for cfg in configs:
        images = run_images(cfg)
        if images is None:
            unknown[cfg.dataset] = None
            continue
        speed = speeds.loc[cfg.method]
        rows.append({"phase": phase(cfg), "runs": 1, **images,
                     "train_hours": images["train_images"] / speed["train_img_s"] / 3600 / devices,
                     "eval_hours": images["eval_images"] / speed["eval_img_s"] / 3600 / devices})
    columns = ["runs", "train_images", "eval_images", "train_hours", "eval_hours"]
    table = pd.DataFrame(rows, columns=["phase", *columns]).groupby("phase")[columns].sum().reindex(PHASES,
                                                                                                   fill_value=0)
    table.loc["total"] = table.sum()
    table["hours"] = table["train_hours"] + table["eval_hours"]
    return table, list(unknown)


def estimate_lines(table: pd.DataFrame, unknown: list[str], missing: list[str], source: str, devices: int) -> list[str]:
    """The estimate as the dry run prints it: one line per phase, then what it assumed."""
    lines = [f"Estimated device time on {devices} device{'s' * (devices > 1)} ({source}):"]
    for name, row in table.iterrows():
        lines.append(f"  {name:<7} {int(row['runs']):>6} runs  train {row['train_images'] / 1e6:9.2f}M images "
                     f"{row['train_hours']:9.2f} h  eval {row['eval_images'] / 1e6:9.2f}M images "
                     f"{row['eval_hours']:8.2f} h  = {row['hours']:9.2f} h ({row['hours'] / 24:.2f} days)")
    if missing:
        lines.append(f"  at Full's speed (no row in the perf csv): {', '.join(missing)}")
    if unknown:
        lines.append(f"  left out (no published split sizes): {', '.join(unknown)}")
    return lines


def speed_source(perf_path: str | Path, config: str, full_train_img_s: float | None,
                 full_eval_img_s: float | None) -> str:
    """Where the img/s came from, for the estimate's header."""
    given = [f"Full {name} {value:g} img/s" for name, value in (("train", full_train_img_s),
                                                                ("eval", full_eval_img_s)) if value]
    scaled = f"{' and '.join(given)} scaled by each method's ratio to Full in " if given else ""
    return f"{scaled}{perf_path} [{config}]"


def check_speed_inputs(perf: str | None, full_train_img_s: float | None, full_eval_img_s: float | None,
                       devices: int, dry_run: bool) -> None:
    """The estimate's inputs, refused with the fix before anything is planned or trained."""
    if (full_train_img_s or full_eval_img_s or devices != 1) and not dry_run:
        raise ConfigError("FULL_TRAIN_IMG_S=, FULL_EVAL_IMG_S= and ESTIMATE_DEVICES= are the dry run's estimate: add "
                          "DRY_RUN=1 (and PERF=<perf.csv>).")
    if (full_train_img_s or full_eval_img_s) and not perf:
        raise ConfigError("FULL_TRAIN_IMG_S= / FULL_EVAL_IMG_S= scale a `make perf` csv's ratios to Full: give "
                          "PERF=<perf.csv> too (with DRY_RUN=1).")
    for name, value in (("FULL_TRAIN_IMG_S", full_train_img_s), ("FULL_EVAL_IMG_S", full_eval_img_s)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive img/s (e.g. a published figure of Full on the device), "
                              f"got {value}.")
    if devices < 1:
        raise ConfigError(f"ESTIMATE_DEVICES must be a whole number >= 1 (devices the runs share), got {devices}.")
