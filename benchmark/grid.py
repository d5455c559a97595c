"""A grid of runs: methods x train fractions x seeds x datasets, resumable, one result JSON per run.

    python -m benchmark.grid --methods full,linear,vpt_deep --fractions 0.1,1.0 --seeds 0,1 \\
        --datasets digits,fashion_heldout [--search] [any benchmark.run option: --epochs 5 --results-dir ...]

- A run whose result exists with `status: ok` is skipped, so a stopped grid resumes where it stopped.
- A failing run is recorded as `status: failed` with its error and the grid goes on.
- SIGINT / SIGTERM (Ctrl+C, SLURM preemption) stop the grid at once: the run in progress is dropped
  (result files are written atomically, so it leaves nothing half-written) and the next call redoes it.
- `--search` runs the paper's selection protocol per (dataset, method, fraction): benchmark/search.py.
- `--shard i/n` (SHARD=i/n) runs only the i-th of n disjoint parts of the grid, so n processes (a SLURM job
  array, several machines) share one grid and one results folder: see `Shard`.
- `--jobs n` (JOBS=n) trains n runs at a time in n worker processes on this machine, each with cpu_count / n
  threads (`make fig3` uses 2): see `run_in_workers`.
- Afterwards results/summary.csv holds one row per run.

Runs execute in this process, one after another (or in `--jobs` long-lived workers): importing
torch/timm/Lightning costs seconds per process, which on the embedded default would be a sizeable share of a grid
of 15-second runs; each run seeds itself (`L.seed_everything`) and builds a fresh model, trainer and datamodule,
so nothing leaks between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import multiprocessing
import os
import re
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from benchmark.core.cli import add_switch, comma_list
from benchmark.core.config import RunConfig, check_fraction
from benchmark.core.errors import ConfigError
from benchmark.core.store import read_result, result_path, write_summary
from benchmark.core.validate import validate_config
from methods.registry import fig3_methods

PAPER_FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.0)  # the training-data ratios of Fig. 3 (Jia et al., ECCV 2022)
PAPER_METHODS = tuple(fig3_methods())  # full, linear, bias, adapter, vpt_shallow, vpt_deep


class GridInterrupted(BaseException):
    """Raised from the SIGINT/SIGTERM handler. A BaseException, so neither `benchmark.run` (which records
    `Exception`s as failed runs) nor Lightning (which re-raises non-KeyboardInterrupt errors after its
    teardown, instead of calling sys.exit as it does for KeyboardInterrupt) swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class stop_on_signals:
    """Context manager: SIGINT/SIGTERM raise GridInterrupted once; later signals are ignored while we clean up."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise GridInterrupted(signum)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def describe(cfg: RunConfig) -> str:
    tag = f" {cfg.tag}" if cfg.tag else ""
    on = " trainval" if cfg.train_on == "trainval" else ""
    return f"{cfg.method} {cfg.dataset} frac={cfg.train_fraction:g} seed={cfg.seed}{on}{tag}"


@dataclass
class GridRunner:
    """Executes runs one by one: skips finished ones, records failures, prints progress with an ETA.

    The ETA is the mean wall time of the runs trained (ok) in this call times the runs still to go, divided by
    the runs trained at a time (`jobs`).
    """

    total: int
    out: TextIO = sys.stdout
    jobs: int = 1
    done: int = 0
    counts: dict = field(default_factory=lambda: {"ok": 0, "skipped": 0, "failed": 0})
    trained_seconds: list = field(default_factory=list)

    def execute(self, cfg: RunConfig, rerun_if=None) -> dict:
        """Run `cfg` unless its result exists with status ok (and `rerun_if(result)` is false); never raises
        for a failing run. Returns the result dict (status ok or failed)."""
        to_train, existing = self.to_train(cfg, rerun_if)
        if to_train is None:
            return existing
        started = time.time()
        result = self.train(to_train, started)
        self.record(cfg, result, time.time() - started)
        return result

    def to_train(self, cfg: RunConfig, rerun_if=None) -> tuple[RunConfig | None, dict | None]:
        """(the config to train, None), or (None, its finished result) after reporting it skipped."""
        resolved = cfg.resolved()
        existing = read_result(result_path(resolved.results_dir, resolved.run_id()))
        stale = existing is not None and rerun_if is not None and rerun_if(existing)
        if existing and existing.get("status") == "ok" and not cfg.force and not stale:
            self.finish(cfg, "skipped", "already done")
            return None, existing
        return replace(cfg, force=cfg.force or stale), None

    def record(self, cfg: RunConfig, result: dict, seconds: float) -> None:
        status = result.get("status", "failed")
        if status == "ok":  # failures often end at once (missing data): they would shrink the ETA
            self.trained_seconds.append(seconds)
        detail = (f"test top-1 {result['test_top1']:.2f} (val {result['val_top1']:.2f})" if status == "ok"
                  else result.get("error", "no error recorded"))
        self.finish(cfg, status, f"{detail} in {format_seconds(seconds)}")
        return result

    @staticmethod
    def train(cfg: RunConfig, started: float) -> dict:
        from benchmark.core.tracking import finish_open_run
        from benchmark.run import record_failure, run

        try:
            result = run(cfg)
        except Exception as err:  # noqa: BLE001 — e.g. a dataset missing on disk (ConfigError from prepare)
            resolved = cfg.resolved()
            result = record_failure(resolved, result_path(resolved.results_dir, resolved.run_id()), started, err)
        finish_open_run(failed=result.get("status") != "ok")  # a failed run leaves its W&B run open
        return result

    def finish(self, cfg: RunConfig, status: str, detail: str) -> None:
        self.done += 1
        self.counts[status] += 1
        remaining = self.total - self.done
        eta = ""
        if self.trained_seconds and remaining:
            mean = sum(self.trained_seconds) / len(self.trained_seconds)
            eta = f", ETA {format_seconds(remaining * mean / self.jobs)}"
        print(f"[grid {self.done}/{self.total}{eta}] {status:7s} {describe(cfg)}: {detail}", file=self.out,
              flush=True)

    def summary_line(self) -> str:
        c = self.counts
        return (f"{self.done}/{self.total} runs: {c['ok']} trained ok, {c['skipped']} already done, "
                f"{c['failed']} failed")


@dataclass
class GridSpec:
    """What to sweep; every other run setting comes from `base` (a RunConfig with the CLI's run options)."""

    methods: list[str]
    fractions: list[float]
    seeds: list[int]
    datasets: list[str]
    base: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        examples = {"methods": "vpt_deep,linear", "fractions": "0.1,1.0", "seeds": "0,1", "datasets": "digits"}
        for name, example in examples.items():
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{name.upper()} is empty; give at least one value, e.g. {name.upper()}={example}.")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name.upper()} lists a value twice: {values}.")

    def configs(self) -> list[RunConfig]:
        """Dataset-major order: a stopped grid leaves whole datasets finished, and the report can draw them."""
        return [replace(self.base, dataset=d, method=m, train_fraction=f, seed=s)
                for d, m, f, s in itertools.product(self.datasets, self.methods, self.fractions, self.seeds)]


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` disjoint parts of a grid (`SHARD=index/count`, index counted from 0).

    The grid's runs are ranked by the sha256 of their run id and dealt out in turn: the parts are disjoint, together
    they are the whole grid, their sizes differ by at most one, and every machine and Python computes the same
    parts (hashlib, not `hash()`, which PYTHONHASHSEED salts). Ranking by a hash instead of dealing out the grid's
    own order spreads cheap and costly runs alike: METHODS x FRACTIONS dealt in order to 5 shards would give each
    shard a single fraction. Each shard runs its part in the grid's order. Every shard must get the same grid.
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not int(match[1]) < int(match[2]):
            raise ConfigError(f"SHARD must be i/n with 0 <= i < n (part i of n, counted from 0), got {text!r}; "
                              "e.g. SHARD=0/3, SHARD=1/3 and SHARD=2/3 together run the whole grid.")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, configs: list[RunConfig]) -> list[RunConfig]:
        """This shard's runs, in the grid's order."""
        digests = [hashlib.sha256(cfg.resolved().run_id().encode()).hexdigest() for cfg in configs]
        ranked = sorted(range(len(configs)), key=lambda k: (digests[k], k))
        mine = set(ranked[self.index::self.count])
        return [cfg for k, cfg in enumerate(configs) if k in mine]


def validate_all(configs: list[RunConfig]) -> None:
    """Check every run before the first trains: one typo must not surface hours into a grid."""
    problems: dict[str, None] = {}
    for cfg in configs:
        try:
            validate_config(cfg)
        except ConfigError as err:
            problems.update({f"{describe(cfg)}: {p}" if len(configs) > 1 else p: None for p in err.problems})
    if problems:
        raise ConfigError(list(problems))


def run_grid(spec: GridSpec, out: TextIO = sys.stdout, shard: Shard | None = None, jobs: int = 1) -> GridRunner:
    """Every run of the grid, or of its `shard` (skipping finished ones), `jobs` at a time; writes summary.csv.
    GridInterrupted propagates."""
    configs = spec.configs()
    validate_all(configs)  # the whole grid, in every shard: each refuses the same typo before training
    if shard is not None:
        mine = shard.select(configs)
        print(f"Shard {shard}: {len(mine)} of the grid's {len(configs)} runs", file=out, flush=True)
        configs = mine
    runner = GridRunner(total=len(configs), out=out, jobs=jobs)
    try:
        if jobs > 1:
            run_in_workers(runner, configs, jobs, Path(spec.base.results_dir) / "logs")
        else:
            for cfg in configs:
                runner.execute(cfg)
    finally:
        write_summary(spec.base.results_dir)
    return runner


# --- several runs at a time --------------------------------------------------------------------------------
def run_in_workers(runner: GridRunner, configs: list[RunConfig], jobs: int, log_dir: Path) -> None:
    """Train the grid's unfinished runs in `jobs` worker processes, each taking the next run when it is free.

    Why: a small model's step does not keep 2+ cores busy (per-op dispatch, Python, tiny matmuls), so two runs on
    one thread each finish sooner than the same two one after another on two threads (README, "Grids").
    Costliest fractions go first, so the last runs to finish are short ones and no worker idles long at the end.
    Workers split the cores (cpu_count / jobs threads each), ignore SIGINT (the grid stops them, like a run, at
    once: results are atomic), and write their runs' output to `log_dir/grid_worker_<pid>.log`; this process
    prints one progress line per run.
    """
    pending = [to_train for to_train, _ in map(runner.to_train, configs) if to_train is not None]
    pending.sort(key=lambda cfg: -cfg.train_fraction)  # stable: the grid's order within a fraction
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"Training {len(pending)} runs, {jobs} at a time ({threads} thread(s) each); their output: "
          f"{log_dir}/grid_worker_*.log", file=runner.out, flush=True)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                               initargs=(threads, str(log_dir)))
    try:
        running = {pool.submit(train_in_worker, cfg): cfg for cfg in pending}
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                result, seconds = future.result()
                runner.record(running.pop(future), result, seconds)
    except BaseException:  # GridInterrupted, or a worker that died: stop the others now, not after their runs
        for process in multiprocessing.active_children():  # the pool's workers: this process has no other children
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def start_worker(threads: int, log_dir: str) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the grid decides
    torch.set_num_threads(threads)
    log = open(Path(log_dir) / f"grid_worker_{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115 — the worker's
    os.dup2(log.fileno(), 1)  # stdout and stderr (progress bars, warnings) for its lifetime
    os.dup2(log.fileno(), 2)


def train_in_worker(cfg: RunConfig) -> tuple[dict, float]:
    started = time.time()
    result = GridRunner.train(cfg, started)
    sys.stdout.flush()
    sys.stderr.flush()
    return result, time.time() - started


# --- command line ------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    import methods
    from datamodules import EMBEDDED_DATASETS

    # allow_abbrev=False: "--method x" must reach the per-run check below, not be read as "--methods x".
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other option is passed to each run: see python -m benchmark.run -h.",
                                allow_abbrev=False)
    p.add_argument("--methods", type=comma_list(str), default=list(PAPER_METHODS),
                   help=f"comma list of {', '.join(methods.list_methods())} (default: the paper's six)")
    p.add_argument("--fractions", type=comma_list(check_fraction), default=list(PAPER_FRACTIONS),
                   help="comma list of train fractions in (0, 1] (default: 0.1,0.2,0.4,0.8,1.0)")
    p.add_argument("--seeds", type=comma_list(int), default=[0], help="comma list of seeds (default: 0)")
    p.add_argument("--datasets", type=comma_list(str), default=list(EMBEDDED_DATASETS),
                   help="comma list of datasets (default: the embedded tasks)")
    add_switch(p, "--search", help="the paper's selection protocol: lr x wd search on val, then final runs on "
               "train+val")
    p.add_argument("--search-lrs", type=comma_list(float), help="override the search's lr grid")
    p.add_argument("--search-wds", type=comma_list(float), help="override the search's weight-decay grid")
    return p


def base_config(run_args: list[str]) -> RunConfig:
    """The options a grid passes through to every run, parsed by benchmark.run's own parser."""
    from benchmark.run import config_from_args

    for flag in ("--method", "--fraction", "--dataset", "--seed"):
        if any(a == flag or a.startswith(flag + "=") for a in run_args):
            raise ConfigError(f"{flag} names one run; a grid takes {flag}s (comma list), e.g. {flag}s a,b.")
    return config_from_args(run_args)


def shard_arg(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def default_jobs(args: argparse.Namespace) -> int:
    """JOBS= as given; else 2 for the embedded Fig. 3 (its small model trains faster as 2 x 1 thread than 1 x 2
    threads), 1 otherwise and for a search (whose final runs wait for their cell's search)."""
    if args.jobs is not None:
        return args.jobs
    return 2 if args.fig3 and not args.search else 1


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every run ok, 1 some failed (recorded), 2 bad input (nothing ran), 128+signal if stopped."""
    p = parser()  # --shard is the grid command's own: a W&B sweep (benchmark.sweep) shares the rest, not this
    p.add_argument("--shard", type=shard_arg, help="i/n: run only part i of n disjoint parts of the grid (i from 0)")
    p.add_argument("--jobs", type=int, help="runs trained at a time, in worker processes (default 1; --fig3: 2)")
    p.add_argument("--fig3", action="store_true", help="the embedded Fig. 3: the defaults above, two runs at a time "
                   "(the small model trains faster as 2 x 1 thread than 1 x 2 threads; a search runs one at a time)")
    args, run_args = p.parse_known_args(argv)
    args.jobs = default_jobs(args)
    try:
        spec = GridSpec(args.methods, args.fractions, args.seeds, args.datasets, base_config(run_args))
        with stop_on_signals():
            if args.search:
                from benchmark.search import SearchGrid, run_search

                if args.shard or args.jobs > 1:
                    raise ConfigError("SHARD= and JOBS= split plain grids, not SEARCH=1 ones (a final run needs its "
                                      "cell's whole search). Split a search by DATASETS= or METHODS= per process "
                                      "instead, all writing to one RESULTS folder.")

                runner = run_search(spec, SearchGrid.override(args.search_lrs, args.search_wds))
            else:
                if args.search_lrs or args.search_wds:
                    raise ConfigError("--search-lrs/--search-wds (SEARCH_LRS/SEARCH_WDS) need --search (SEARCH=1).")
                if args.jobs < 1:
                    raise ConfigError(f"JOBS must be a whole number >= 1 (runs trained at a time), got {args.jobs}.")
                runner = run_grid(spec, shard=args.shard, jobs=args.jobs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except GridInterrupted as stop:
        print(f"\nGrid stopped by {stop}: finished runs are recorded in {spec.base.results_dir}/runs and "
              f"{spec.base.results_dir}/summary.csv; run the same command again to resume.", file=sys.stderr)
        return 128 + stop.signum
    print(f"Grid done: {runner.summary_line()}. Summary: {spec.base.results_dir}/summary.csv")
    return 1 if runner.counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
