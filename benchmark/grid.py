"""A grid of runs: methods x train fractions (or shots) x method options x seeds x datasets, resumable, one result
JSON per run.

    python -m benchmark.grid --methods full,linear,vpt_deep --fractions 0.1,1.0 --seeds 0,1 \\
        --datasets digits,fashion_heldout [--search] [any benchmark.run option: --epochs 5 --results-dir ...]
    python -m benchmark.grid --methods vpt_deep,linear --shots 1,2,4,8,16 --seeds 0,1,2       # few-shot
    python -m benchmark.grid --methods vpt_deep --options "prompt_length=1,5,10;prompt_dropout=0,0.1"  # ablation

- A run whose result exists with `status: ok` is skipped, so a stopped grid resumes where it stopped.
- A failing run is recorded as `status: failed` with its error and the grid goes on. A search point that failed (an
  lr that diverged) in a cell that chose among its other points is counted apart and does not fail the grid.
- SIGINT / SIGTERM (Ctrl+C, SLURM preemption) stop the grid at once: the run in progress is dropped
  (result files are written atomically, so it leaves nothing half-written) and the next call redoes it.
- `--search` runs the paper's selection protocol per (dataset, method, fraction): benchmark/sweeps/search.py;
  `--search halving` (SEARCH=halving) chooses by successive halving over its points (benchmark/sweeps/halving.py).
- `--leaderboard` (`make leaderboard`): every method under the same search budget (benchmark/sweeps/budget.py),
  every registered method at 10% and 100% of the data with seeds 0,1,2 unless METHODS/FRACTIONS/SEEDS say otherwise.
- DATASETS may name suites: `vtab-1k` (the 19 VTAB-1k tasks), `fgvc` (the five FGVC tasks): datamodules/suites.py.
- `--dry-run` (DRY_RUN=1) checks every run and prints how many would start and the first few; nothing trains.
  With `--perf <perf.csv>` (PERF=) it also estimates their device time from `make perf` figures: images trained and
  evaluated, search and finals apart, over `--estimate-devices` (ESTIMATE_DEVICES=) devices, optionally scaled to
  Full's img/s on another device (FULL_TRAIN_IMG_S=, FULL_EVAL_IMG_S=): benchmark/costs/estimate.py.
- `--shard i/n` (SHARD=i/n) runs only the i-th of n disjoint parts of the grid, so n processes (a SLURM job
  array, several machines) share one grid and one results folder: see `Shard`; a search is dealt out by cells.
- `--jobs n` (JOBS=n) trains n runs at a time in n worker processes on this machine, each with cpu_count / n
  threads (`make fig3` uses 2): see `run_in_workers`; with `--search`, n cells at a time (`search_in_workers`).
- Afterwards results/summary.csv holds one row per run.
"""

from __future__ import annotations

import argparse
import sys

import methods
from benchmark.core.cli import add_switch, comma_list, on_off, option_grid
from benchmark.core.config import RunConfig, check_fraction, check_shots
from benchmark.core.errors import ConfigError
from benchmark.core.store import is_storage_error, storage_problem
from benchmark.costs.estimate import check_speed_inputs, estimate, estimate_lines, method_speeds, speed_source
from benchmark.run import config_from_args
from benchmark.sweeps.budget import MAX_WIDENINGS
from benchmark.sweeps.runner import GridInterrupted, plan_grid, run_grid, stop_on_signals
from benchmark.sweeps.search import SearchGrid, later_rung_runs, plan_search, run_search
from benchmark.sweeps.spec import FIG3_FRACTIONS, PAPER_METHODS, ZOO_FRACTIONS, GridSpec, Shard, describe
from datamodules import EMBEDDED_DATASETS

LEADERBOARD_FRACTIONS = (0.1, 1.0)  # the leaderboard's default data: a low-data and a full-data column
LEADERBOARD_SEEDS = (0, 1, 2)  # its finals: three seeds, for a 95% interval per method
DRY_RUN_SHOWN = 5  # runs a dry run names


def search_mode(text: str) -> str:
    """SEARCH=: 0 (none: ''), 1 ('full': the whole lr x wd grid) or halving ('halving')."""
    if str(text).strip().lower() in ("full", "halving"):
        return str(text).strip().lower()
    try:
        return "full" if on_off(text) else ""
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"SEARCH must be 0, 1 or halving, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: "--method x" must reach the per-run check below, not be read as "--methods x".
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other option is passed to each run: see python -m benchmark.run -h.",
                                allow_abbrev=False)
    p.add_argument("--methods", type=comma_list(str), default=list(PAPER_METHODS),
                   help=f"comma list of {', '.join(methods.list_methods())} (default: the paper's six)")
    p.add_argument("--fractions", type=comma_list(check_fraction), default=list(FIG3_FRACTIONS),
                   help="comma list of train fractions in (0, 1] (default: 0.1,0.2,0.4,0.8,1.0)")
    p.add_argument("--shots", type=comma_list(check_shots),
                   help="comma list of training examples per class (few-shot), instead of --fractions, e.g. 1,2,4,8,16")
    p.add_argument("--options", type=option_grid, metavar='"K=V1,V2;K2=V3"',
                   help="method options to sweep, each point naming its runs: keys apart by ';', values by ',', e.g. "
                   '"prompt_length=1,5,10;prompt_dropout=0,0.1" (every combination)')
    p.add_argument("--seeds", type=comma_list(int), default=[0], help="comma list of seeds (default: 0)")
    p.add_argument("--datasets", type=comma_list(str), default=list(EMBEDDED_DATASETS),
                   help="comma list of datasets (default: the embedded tasks)")
    p.add_argument("--search", nargs="?", const="full", default="", type=search_mode, metavar="0|1|halving",
                   help="the paper's selection protocol: lr x wd search on val, then final runs on train+val; "
                   "halving: successive halving over the search points (cheaper)")
    p.add_argument("--search-lrs", type=comma_list(float), help="override the search's lr grid")
    p.add_argument("--search-wds", type=comma_list(float), help="override the search's weight-decay grid")
    p.add_argument("--search-lr-factors", type=comma_list(float),
                   help="search each recipe's lr times these factors, e.g. 0.04,0.2,1,5,25 (default for the quick "
                   "recipes: 0.2,1,5); one list fits a grid of methods whose lrs differ")
    p.add_argument("--search-widen", type=int,
                   help=f"leaderboard: times a cell whose chosen lr is an edge of its grid gets one more lr beyond it "
                   f"(default {MAX_WIDENINGS})")
    add_switch(p, "--dry-run", help="check every run and print how many would start and the first few; train nothing")
    p.add_argument("--perf", help="with --dry-run: estimate the runs' device time from this `make perf` csv")
    p.add_argument("--full-train-img-s", type=float, help="with --perf: Full's train img/s on the target device "
                   "(e.g. a published figure); each method's is scaled from it by the csv's ratio to Full")
    p.add_argument("--full-eval-img-s", type=float, help="with --perf: Full's eval img/s on the target device")
    p.add_argument("--estimate-devices", type=int, default=1, help="with --perf: devices the runs are dealt out to "
                   "(default 1)")
    return p

def base_config(run_args: list[str]) -> RunConfig:
    """The options a grid passes through to every run, parsed by benchmark.run's own parser."""
    for flag in ("--method", "--fraction", "--dataset", "--seed", "--shot"):
        if any(a == flag or a.startswith(flag + "=") for a in run_args):
            raise ConfigError(f"{flag} names one run; a grid takes {flag}s (comma list), e.g. {flag}s a,b.")
    return config_from_args(run_args)

def shard_arg(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

def default_jobs(args: argparse.Namespace) -> int:
    """JOBS= as given; else 2 for the embedded Fig. 3 and zoo, searched or not (their small model trains faster as
    2 x 1 thread than 1 x 2 threads), 1 otherwise."""
    if args.jobs is not None:
        return args.jobs
    if args.leaderboard:
        return 2 if all(d in EMBEDDED_DATASETS for d in args.datasets) else 1
    return 2 if args.fig3 or args.zoo else 1


def switched_on(argv: list[str], flag: str) -> bool:
    """Whether `flag` is on in `argv`, alone or as make passes it (`--flag=1`)."""
    return any(a == flag or (a.startswith(flag + "=") and a.split("=", 1)[1].strip().lower() in ("1", "true", "yes"))
               for a in argv)

def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The grid's own options (with JOBS= resolved) and the run options it passes through."""
    p = parser()  # --shard is the grid command's own: a W&B sweep (benchmark.sweep) shares the rest, not this
    p.add_argument("--shard", type=shard_arg, help="i/n: run only part i of n disjoint parts of the grid (i from 0)")
    p.add_argument("--jobs", type=int, help="runs trained at a time, in worker processes (default 1; --fig3: 2)")
    p.add_argument("--fig3", action="store_true", help="the embedded Fig. 3: the defaults above, two runs (or search "
                   "cells) at a time (the small model trains faster as 2 x 1 thread than 1 x 2 threads)")
    p.add_argument("--zoo", action="store_true", help="the embedded zoo: every registered method at 100%% of the "
                   "training data (METHODS= and FRACTIONS= still override), two runs at a time")
    add_switch(p, "--leaderboard", help="every method under the same search budget (benchmark/sweeps/budget.py): "
               "every registered method at 10%% and 100%% of the data, seeds 0,1,2 (METHODS=, FRACTIONS=, SEEDS= "
               "override)")
    given = sys.argv[1:] if argv is None else argv
    if "--zoo" in given:
        p.set_defaults(methods=methods.list_methods(), fractions=list(ZOO_FRACTIONS))
    if switched_on(given, "--leaderboard"):
        p.set_defaults(methods=methods.list_methods(), fractions=list(LEADERBOARD_FRACTIONS),
                       seeds=list(LEADERBOARD_SEEDS))
    args, run_args = p.parse_known_args(argv)
    args.jobs = default_jobs(args)
    return args, run_args

def grid_spec(args: argparse.Namespace, run_args: list[str], argv: list[str] | None) -> GridSpec:
    """The grid of the parsed command line `argv` (benchmark.sweep shares it); SHOTS= with FRACTIONS= is refused."""
    argv = sys.argv[1:] if argv is None else argv
    if args.shots and any(a == "--fractions" or a.startswith("--fractions=") for a in argv):
        raise ConfigError("SHOTS= and FRACTIONS= are two ways to say how much trains; give one of them (SHOTS: "
                          "examples per class, FRACTIONS: shares of each class).")
    base = base_config(run_args)
    if args.options and base.options:
        raise ConfigError("OPTIONS of a grid is its option axis: give the values there, not as --options of a run.")
    return GridSpec(args.methods, args.fractions, args.seeds, args.datasets, base, shots=args.shots,
                    options=args.options)

def search_grid(args: argparse.Namespace) -> SearchGrid | None:
    """The search the command asks for (the leaderboard's equal budget, SEARCH=1 or halving), or None: a plain grid."""
    if args.leaderboard:
        if args.search_lrs:
            raise ConfigError("The leaderboard centres every method's lrs on its own recipe lr: drop SEARCH_LRS= and "
                              "give SEARCH_LR_FACTORS= (e.g. 0.2,1,5) instead.")
        widen = MAX_WIDENINGS if args.search_widen is None else args.search_widen
        return SearchGrid.equal_budget(args.search_wds, args.search_lr_factors, halving=args.search == "halving",
                                       widen=widen)
    if args.search_widen is not None:
        raise ConfigError("SEARCH_WIDEN= is the leaderboard's rule: use it with `make leaderboard` (--leaderboard).")
    if args.search:
        return SearchGrid.override(args.search_lrs, args.search_wds, args.search_lr_factors,
                                   halving=args.search == "halving")
    if args.search_lrs or args.search_wds or args.search_lr_factors:
        raise ConfigError("--search-lrs/--search-wds/--search-lr-factors (SEARCH_LRS/SEARCH_WDS/"
                          "SEARCH_LR_FACTORS) need --search (SEARCH=1).")
    return None

def dry_run(spec: GridSpec, grid: SearchGrid | None, shard: Shard | None, args: argparse.Namespace) -> int:
    """Print the runs the grid would start (how many, the first few) after checking every one, and with --perf the
    estimate of their device time; train nothing."""
    if grid is None:
        known = plan_grid(spec, shard)
        count, note, planned = len(known), "", known
    else:
        known, count, cells = plan_search(spec, grid, shard)
        planned = known + [cfg for cell in cells for cfg in later_rung_runs(cell, spec.seeds, grid)]
        note = f" in {len(cells)} search cells (search points, then finals"
        note += ("; later halving rungs counted, named once the earlier ones are done" if grid.halving else "")
        note += (f"; up to {grid.widen} widening(s) per cell at an lr edge, not counted" if grid.widen else "") + ")"
    print(f"Dry run: {count} runs would start{note}; nothing trained.")
    for cfg in known[:DRY_RUN_SHOWN]:
        print(f"  {describe(cfg)}")
    if count > DRY_RUN_SHOWN:
        print(f"  ... and {count - min(len(known), DRY_RUN_SHOWN)} more")
    if args.perf and planned:
        print("\n".join(estimated(planned, args)))
    return 0

def estimated(planned: list, args: argparse.Namespace) -> list[str]:
    """The dry run's estimate of `planned` runs' device time (benchmark/costs/estimate.py)."""
    backbone = planned[0].resolved().backbone
    speeds, missing, config = method_speeds(args.perf, backbone, sorted({cfg.method for cfg in planned}),
                                            args.full_train_img_s, args.full_eval_img_s)
    table, unknown = estimate(planned, speeds, args.estimate_devices)
    source = speed_source(args.perf, config, args.full_train_img_s, args.full_eval_img_s)
    return estimate_lines(table, unknown, missing, source, args.estimate_devices)

def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every run ok (failed search points aside, where their cell still chose), 1 some failed
    (recorded), 2 bad input (nothing ran), 128+signal if stopped."""
    args, run_args = parse_args(argv)
    spec = None
    try:
        spec = grid_spec(args, run_args, argv)
        with stop_on_signals():
            if args.jobs < 1:
                raise ConfigError(f"JOBS must be a whole number >= 1 (runs trained at a time), got {args.jobs}.")
            grid = search_grid(args)
            check_speed_inputs(args.perf, args.full_train_img_s, args.full_eval_img_s, args.estimate_devices,
                               args.dry_run)
            if args.dry_run:
                return dry_run(spec, grid, args.shard, args)
            if grid is not None:
                runner = run_search(spec, grid, jobs=args.jobs, shard=args.shard)
            else:
                runner = run_grid(spec, shard=args.shard, jobs=args.jobs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the results folder's disk: the finished runs are on it, the rest is redone next time
        if not is_storage_error(err):
            raise
        print(f"error: {storage_problem(err, spec and spec.base.results_dir)}", file=sys.stderr)
        return 1
    except GridInterrupted as stop:
        print(f"\nGrid stopped by {stop}: finished runs are recorded in {spec.base.results_dir}/runs and "
              f"{spec.base.results_dir}/summary.csv; run the same command again to resume.", file=sys.stderr)
        return 128 + stop.signum
    print(f"Grid done: {runner.summary_line()}. Summary: {spec.base.results_dir}/summary.csv")
    return 1 if runner.counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
