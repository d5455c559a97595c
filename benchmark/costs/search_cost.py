"""What the linear probe's one-pass search costs: `make perf LINEAR_SEARCH=1` / `python -m benchmark.perf
--linear-search`.

For one cell of the embedded default (digits, linear, each train fraction), in one process with the feature cache
already filled (what every run of a grid or search after the first pays): one run of the recipe's epochs, the
paper's 40-point grid (benchmark/sweeps/search.py: PAPER_LRS x PAPER_WDS) trained in one pass
(benchmark/sweeps/heads.py), and the same 40 points as 40 separate runs. Modes run in turn, `repeats` times (so a
slow spell of a shared machine hits all of them); medians are reported, with the one pass's and the 40 runs' time
per one run, in wall seconds and in this process's CPU seconds (steadier on a shared machine).
"""

from __future__ import annotations

import io
import itertools
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchmark.core.config import RunConfig
from benchmark.core.pipeline import run
from benchmark.core.store import atomic_write_text
from benchmark.sweeps.runner import GridRunner
from benchmark.sweeps.search import PAPER_LRS, PAPER_WDS, point_config, train_points

DATASET = "digits"


def timed(step) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, what `step` returned)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = step()
    return time.perf_counter() - start, time.process_time() - cpu, out


def measure_cell(fraction: float, epochs: int | None, repeats: int, separate_repeats: int,
                 recipe: str | None) -> list[dict]:
    """Rows (mode, repeat, seconds, ...) for one train fraction; the 40 separate runs in the first
    `separate_repeats` repeats only (they cost 40 runs each)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="perf-search-") as tmp:
        cell = RunConfig(method="linear", dataset=DATASET, train_fraction=fraction, epochs=epochs, recipe=recipe,
                         results_dir=tmp, force=True)
        run(cell)  # untimed: fills the feature cache and warms the process (imports, decoded datasets)
        points = [point_config(cell, lr, wd, cell.seed) for lr, wd in itertools.product(PAPER_LRS, PAPER_WDS)]
        modes = {"one run": lambda: [run(cell)],
                 f"one pass, {len(points)} heads": lambda: train_points(GridRunner(len(points), io.StringIO()), points),
                 f"{len(points)} runs": lambda: train_points(GridRunner(len(points), io.StringIO()), points,
                                                             one_pass=False)}
        by_point = {}
        for repeat in range(repeats):
            for mode, step in modes.items():
                if mode.endswith(" runs") and repeat >= separate_repeats:
                    continue
                seconds, cpu_seconds, results = timed(step)
                by_point[mode] = {(r["lr"], r["weight_decay"]): r.get("val_top1") for r in results}
                rows.append({"train_fraction": fraction, "mode": mode, "heads": len(results), "repeat": repeat,
                             "seconds": seconds, "cpu_seconds": cpu_seconds, "n_train": results[0].get("n_train"),
                             "epochs": results[0]["epochs"], "failed": sum(r.get("status") != "ok" for r in results)})
                print(f"  @{fraction:g} {mode:22s} {seconds:7.2f} s ({cpu_seconds:.2f} s CPU)", flush=True)
        one_pass, separate = (by_point.get(m) for m in list(modes)[1:])
        gap = (max((abs(one_pass[p] - separate[p]) for p in separate if separate[p] is not None), default=None)
               if separate else None)
    # The two ways of training the grid should give each point the same val top-1
    # (tests/benchmark/sweeps/test_heads.py).
    return [row | {"max_val_top1_gap": gap} for row in rows]


def linear_search_benchmark(fractions: list[float], out: Path, repeats: int = 3, epochs: int | None = None,
                            separate_repeats: int = 1, recipe: str | None = None) -> pd.DataFrame:
    runs = pd.DataFrame([row for f in fractions for row in measure_cell(f, epochs, repeats, separate_repeats, recipe)])
    frame = (runs.groupby(["train_fraction", "mode"], sort=False)
             .agg(heads=("heads", "first"), n_train=("n_train", "first"), epochs=("epochs", "first"),
                  repeats=("repeat", "nunique"), seconds=("seconds", "median"), seconds_min=("seconds", "min"),
                  seconds_max=("seconds", "max"), cpu_seconds=("cpu_seconds", "median"), failed=("failed", "max"),
                  max_val_top1_gap=("max_val_top1_gap", "first"))
             .reset_index())
    for column, ratio in (("seconds", "vs_one_run"), ("cpu_seconds", "cpu_vs_one_run")):
        one_run = frame[frame["mode"] == "one run"].set_index("train_fraction")[column]
        frame[ratio] = frame[column] / frame["train_fraction"].map(one_run)
    frame["recipe"] = recipe or "embedded default's"
    frame["threads"] = torch.get_num_threads()
    frame["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
    atomic_write_text(out, frame.to_csv(index=False, float_format="%.6g"))
    return frame

