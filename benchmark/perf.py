"""Cost of each tuning protocol, measured: `make perf` / `python -m benchmark.perf`.

For every method on one backbone, batch size and image size, each in its own process (so peak RSS is that
method's alone): training images/s and evaluation images/s (median over timed steps after warm-up, timed by a
Lightning callback around each batch of a real Trainer), peak memory (CUDA max allocated on GPU, peak RSS
on CPU), FLOPs per training image (`torch.utils.flop_counter`, forward + backward), the FLOP/s that achieves
and its share of this machine's dense matmul peak, measured in the same run. For the embedded backbone it
also times the data loader of the embedded default, which must outpace training.

    python -m benchmark.perf --backbone vit_base_patch16_224 --batch-size 8 --steps 3 --warmup 1
    python -m benchmark.perf --feature-cache-benchmark    # linear probe, 100 epochs, with vs without cache
    python -m benchmark.perf --linear-search              # the 40-point linear grid in one pass vs one run
    python -m benchmark.perf --loader-benchmark           # training loader, PIL path vs decoded-image cache

Rows are merged into results/perf.csv (one per method x backbone x batch x image size x options) and plotted
to results/figures/perf_<backbone>_bs<batch>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from benchmark.analysis.tables import markdown
from benchmark.core.cli import add_settings, comma_list, settings_from_args
from benchmark.core.config import EMBEDDED_BACKBONE, REPO_ROOT, setting
from benchmark.core.store import atomic_write_text
from benchmark.costs.model_costs import (
    LOADER_DATASET,
    PerfConfig,
    device_name,
    loader_img_s,
    matmul_peak_gflops,
    measure_method,
)
from benchmark.costs.perf_rows import recipe_settings
from benchmark.costs.search_cost import linear_search_benchmark

RESULT_MARK = "PERF_RESULT "
KEY_COLUMNS = ["method", "method_options", "backbone", "batch_size", "img_size", "device", "precision", "compile",
               "checkpointing"]


def run_in_own_process(cfg: PerfConfig) -> dict:
    """`measure_method` in a fresh interpreter: its peak RSS is this method's alone."""
    done = subprocess.run([sys.executable, "-m", "benchmark.perf", "--worker", json.dumps(asdict(cfg))],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if cfg.profile:
        print("\n".join(line for line in done.stdout.splitlines() if not line.startswith(RESULT_MARK)))
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"perf worker for {cfg.method!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")

def merge_rows(path: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """Replace the rows of the same configuration in results/perf.csv, keep the others."""
    if path.is_file():
        old = pd.read_csv(path)
        keys = rows[KEY_COLUMNS].astype(str).agg("|".join, axis=1)
        old = old[~old[KEY_COLUMNS].astype(str).agg("|".join, axis=1).isin(set(keys))]
        rows = pd.concat([old, rows], ignore_index=True)
    atomic_write_text(path, rows.to_csv(index=False, float_format="%.6g"))
    return rows

def markdown_of(frame: pd.DataFrame) -> str:
    return markdown(frame.map(format_cell))


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)

def plot(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_img_s", "training images/s"), ("train_mem_mb", "training memory over the built model (MB)"),
              ("pct_of_peak", "% of matmul peak")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (column, label) in zip(axes, panels, strict=True):
        ax.bar(rows["method"], rows[column], color="tab:blue")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    first = rows.iloc[0]
    fig.suptitle(f"{first['backbone']}, batch {first['batch_size']}, {first['img_size']} px, {first['device']}, "
                 f"precision {first['precision']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

def measure_all(args) -> pd.DataFrame:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(args.precision).startswith("bf16") and device.type == "cuda" else torch.float32
    rows, peak = [], 0.0
    for repeat in range(args.repeats):  # methods interleaved: a load change on a shared machine hits all of them
        peak = max(peak, matmul_peak_gflops(device, dtype))
        print(f"[{repeat + 1}/{args.repeats}] dense matmul peak so far: {peak:.1f} GFLOP/s ({dtype}, "
              f"{device_name(device)})", flush=True)
        for method in args.methods:
            cfg = PerfConfig(method=method, backbone=args.backbone, batch_size=args.batch_size,
                             img_size=args.img_size, num_classes=args.num_classes, steps=args.steps,
                             warmup=args.warmup, precision=args.precision, compile=args.compile,
                             checkpointing=args.checkpointing, profile=args.profile,
                             **recipe_settings(method, args.backbone, args.method_options))
            row = run_in_own_process(cfg)
            print(f"  {method:12s} train {row['train_img_s']:9.2f} img/s  eval {row['eval_img_s']:9.2f} img/s  "
                  f"peak {row['peak_mem_mb']:8.0f} MB  {row['achieved_gflops']:7.1f} GFLOP/s", flush=True)
            rows.append(row)
    frame = median_over_repeats(pd.DataFrame(rows))
    frame["repeats"] = args.repeats
    frame["peak_gflops"] = peak
    frame["pct_of_peak"] = 100 * frame["achieved_gflops"] / peak
    full = frame.loc[frame["method"] == "full", "train_step_ms"]
    frame["step_vs_full"] = frame["train_step_ms"] / full.iloc[0] if len(full) else float("nan")
    frame["loader_img_s"] = float("nan")
    if args.backbone == EMBEDDED_BACKBONE:
        frame["loader_img_s"] = loader_img_s(args.backbone, args.batch_size)
        fastest = frame.loc[frame["train_img_s"].idxmax()]
        print(f"loader ({LOADER_DATASET}): {frame['loader_img_s'].iloc[0]:,.0f} img/s vs fastest training "
              f"{fastest['train_img_s']:,.0f} img/s ({fastest['method']})")
    frame["torch"] = torch.__version__
    frame["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
    return frame

def median_over_repeats(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per method: the median of every measured number over the repeats, the rest from the first."""
    numeric = rows.select_dtypes("float").columns  # measurements; integer settings stay as they are
    grouped = rows.groupby("method", sort=False)
    frame = grouped.first()
    frame[numeric] = grouped[numeric].median()
    return frame.reset_index()

def timed_run(argv: list[str]) -> tuple[float, dict]:
    """One `python -m benchmark.run` process, end to end (interpreter start to exit); returns (seconds, result)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmark.run", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"benchmark.run {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    results_dir = Path(argv[argv.index("--results-dir") + 1])
    newest = max((results_dir / "runs").rglob("*.json"), key=lambda path: path.stat().st_mtime_ns)  # this run's
    result = json.loads(newest.read_text())
    return seconds, result

# cold: an empty cache is filled; warm: the same run again (--force), reading it; new seed: another train subset
# (and shuffle) of the same size, so only the train split is computed (val and test features are keyed by their
# content and read): what most runs of a grid over seeds and fractions cost.
CACHE_MODES = (("no cache", "uncached", ["--no-feature-cache"]), ("cache, cold", "cached", []),
               ("cache, warm", "cached", ["--force"]), ("cache, new seed", "cached", ["--force", "--seed", "1"]))

def feature_cache_benchmark(epochs: int, fractions: list[float], out: Path, repeats: int = 1) -> pd.DataFrame:
    """The linear probe on the embedded default at each train fraction, in the CACHE_MODES: no cache, cache
    computed (cold), cache read (warm), another seed (its train split computed, val/test read). process_s is the
    whole command (interpreter and imports included); run_s is the run itself, from the config to the written
    result, which is what each run of a grid or search costs (they share one process). With `repeats`, the modes
    are run in turn that many times (so a slow spell of a shared machine hits all of them) and each is reported
    as its median."""
    rows = []
    for fraction in fractions:
        for repeat in range(repeats):
            with tempfile.TemporaryDirectory(prefix="perf-cache-") as tmp:
                for mode, folder, flags in CACHE_MODES:
                    results_dir = Path(tmp) / folder
                    argv = ["--method", "linear", "--fraction", str(fraction), "--epochs", str(epochs),
                            "--results-dir", str(results_dir), *flags]
                    seconds, result = timed_run(argv)
                    rows.append({"mode": mode, "epochs": epochs, "train_fraction": fraction,
                                 "n_train": result["n_train"], "repeat": repeat, "process_s": seconds,
                                 "run_s": result["wall_seconds"], "test_top1": result["test_top1"],
                                 "val_top1": result["val_top1"]})
                    print(f"  @{fraction:g} {mode:15s} {seconds:7.1f} s end to end ({result['wall_seconds']:.2f} s "
                          f"in run), test top-1 {result['test_top1']:.2f}", flush=True)
    frame = cache_speedups(pd.DataFrame(rows))
    frame["threads"] = torch.get_num_threads()
    frame["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
    atomic_write_text(out, frame.to_csv(index=False, float_format="%.6g"))
    return frame

def cache_speedups(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (fraction, mode): median process_s and run_s over repeats (with the run_s range), and the speed-ups
    against the uncached median of the same fraction."""
    keys = ["train_fraction", "mode"]
    frame = (runs.groupby(keys, sort=False)
             .agg(epochs=("epochs", "first"), n_train=("n_train", "first"), repeats=("repeat", "nunique"),
                  process_s=("process_s", "median"), run_s=("run_s", "median"), run_s_min=("run_s", "min"),
                  run_s_max=("run_s", "max"), test_top1=("test_top1", "median"), val_top1=("val_top1", "median"))
             .reset_index())
    for column in ("process_s", "run_s"):
        uncached = frame[frame["mode"] == "no cache"].set_index("train_fraction")[column]
        frame[f"speedup_{column}"] = frame["train_fraction"].map(uncached) / frame[column]
    return frame

def loader_benchmark_to_csv(args, out: Path) -> pd.DataFrame:
    """`--loader-benchmark`: a generated FGVC-like JPEG folder (ViT-B/16's 224 px bicubic data config), the training
    loader of the PIL path and of the decoded-image cache with the same workers, `--repeats` interleaved (default 5):
    one row per repeat and loader, plus the medians and their ratio in every row."""
    from benchmark.costs.loading import LOADERS, loader_benchmark, loader_summary, write_jpeg_folder

    with tempfile.TemporaryDirectory(prefix="perf-loader-") as tmp:
        folder = write_jpeg_folder(Path(tmp) / "jpeg", n_train=args.images, n_eval=max(args.images // 8, 2))
        rows = loader_benchmark(folder, Path(tmp) / "cache", workers=args.workers, batch_size=args.batch_size or 64,
                                repeats=args.repeats, min_seconds=2.0, loaders=LOADERS)
    summary = loader_summary(rows)
    frame = rows.assign(**{f"median_{k}": v for k, v in summary.items() if k != "repeats"},
                        threads=torch.get_num_threads(), cpu_count=os.cpu_count(), torch=torch.__version__,
                        measured_at=time.strftime("%Y-%m-%d %H:%M"))
    atomic_write_text(out, frame.to_csv(index=False, float_format="%.6g"))
    print(f"median images/s over {summary['repeats']} interleaved repeats: PIL {summary['pil_img_per_s']:,.0f}; cache, "
          f"model inputs {summary['cache_img_per_s']:,.0f} ({summary['cache_ratio']:.2f}x); cache, loader only "
          f"{summary['cache_loader_only_img_per_s']:,.0f} ({summary['cache_loader_only_ratio']:.2f}x) -> {out}")
    return frame

@dataclass
class PerfSettings:
    """The flags of `make perf` / `python -m benchmark.perf`, each declared once (benchmark.core.cli.add_settings)."""

    backbone: str = setting(EMBEDDED_BACKBONE, "timm ViT name (random init: weights cost nothing)")
    methods: list | None = setting(None, "comma-separated methods (default: every registered method)",
                                   parse=comma_list(str))
    batch_size: int | None = setting(None, "default: 64 (embedded backbone), 8 otherwise")
    img_size: int | None = setting(None, "default: the backbone's")
    num_classes: int = setting(100, "classes of the new head")
    steps: int = setting(10, "timed steps per method (median reported)")
    warmup: int = setting(2, "untimed steps before them")
    repeats: int | None = setting(None, "run the method list (or the cache or search benchmark's modes) this many "
                                  "times, interleaved, and report medians (default 1; --linear-search: 3; "
                                  "--loader-benchmark: 5)")
    precision: str = setting("32", "Lightning precision: 32, bf16-mixed, 16-mixed")
    compile: bool = setting(False, "torch.compile each model")
    checkpointing: bool = setting(False, "gradient checkpointing of the backbone blocks")
    method_options: dict = setting(help="method option for every method that has it, e.g. prompt_length=50",
                                   factory=dict)
    profile: bool = setting(False, "also print each method's time by operator")
    out: str = setting("results/perf.csv", "the CSV the rows are merged into (the benchmarks write beside it)")
    figures: str = setting("results/figures", "where the figure goes")
    feature_cache_benchmark: bool = setting(False, "instead: the linear probe end to end with and without the "
                                            "feature cache")
    loader_benchmark: bool = setting(False, "instead: training-loader images/s, PIL path vs decoded-image cache, on "
                                     "a generated JPEG folder")
    workers: int = setting(2, "with --loader-benchmark: loader workers")
    images: int = setting(512, "with --loader-benchmark: training JPEGs")
    linear_search: bool = setting(False, "instead: the linear probe's 40-point lr x wd grid in one pass vs one run "
                                  "and vs 40 runs")
    separate_repeats: int = setting(1, "with --linear-search: repeats that also time the 40 separate runs")
    recipe: str | None = setting(None, "with --linear-search: the runs' recipe (default: the embedded default's)")
    epochs: int | None = setting(None, "with --feature-cache-benchmark (default 100) or --linear-search (default: "
                                 "the recipe's)")
    fractions: list = setting(help="with --feature-cache-benchmark or --linear-search: comma-separated",
                              factory=lambda: [0.1, 1.0], parse=comma_list(float))
    worker: str | None = setting(None, argparse.SUPPRESS)  # one method's PerfConfig as JSON: a child process


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, PerfSettings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = PerfSettings(**settings_from_args(parser().parse_args(argv)))
    if args.worker:  # one method, in this (fresh) process; the parent reads the marked line
        print(RESULT_MARK + json.dumps(measure_method(PerfConfig(**json.loads(args.worker)))), flush=True)
        return 0
    fractions = args.fractions
    args.repeats = args.repeats or (3 if args.linear_search else 5 if args.loader_benchmark else 1)
    if args.linear_search:
        frame = linear_search_benchmark(fractions, Path(args.out).with_name("perf_linear_search.csv"), args.repeats,
                                        args.epochs, args.separate_repeats, args.recipe)
        print(markdown_of(frame[["train_fraction", "mode", "heads", "n_train", "epochs", "repeats", "seconds",
                                    "vs_one_run", "cpu_seconds", "cpu_vs_one_run", "max_val_top1_gap"]]))
        return 0
    if args.loader_benchmark:
        frame = loader_benchmark_to_csv(args, Path(args.out).with_name("perf_loader.csv"))
        print(markdown_of(frame))
        return 0
    if args.feature_cache_benchmark:
        frame = feature_cache_benchmark(args.epochs or 100, fractions,
                                        Path(args.out).with_name("perf_feature_cache.csv"), args.repeats)
        print(markdown_of(frame[["train_fraction", "mode", "repeats", "process_s", "run_s", "speedup_process_s",
                                    "speedup_run_s", "test_top1"]]))
        return 0
    from methods import list_methods

    args.methods = args.methods or list_methods()
    unknown = sorted(set(args.methods) - set(list_methods()))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; METHODS takes a comma-separated subset of "
                         f"{', '.join(list_methods())}.")
    args.batch_size = args.batch_size or (64 if args.backbone == EMBEDDED_BACKBONE else 8)
    os.makedirs(args.figures, exist_ok=True)
    frame = measure_all(args)
    merge_rows(Path(args.out), frame)
    figure = Path(args.figures) / f"perf_{args.backbone}_bs{args.batch_size}.png"
    plot(frame, figure)
    print(markdown_of(frame[["method", "train_img_s", "eval_img_s", "peak_mem_mb", "flops_per_img",
                                "achieved_gflops", "pct_of_peak", "step_vs_full"]]))
    print(f"-> {args.out}, {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
