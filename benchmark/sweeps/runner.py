"""Executing a grid: one run after another or `jobs` at a time in worker processes, skipping finished runs,
recording failed ones, stopping cleanly on SIGINT/SIGTERM.

Runs execute in this process, one after another (or in `--jobs` long-lived workers): importing
torch/timm/Lightning costs seconds per process, which on the embedded default would be a sizeable share of a grid
of 15-second runs; each run seeds itself (`L.seed_everything`) and builds a fresh model, trainer and datamodule,
so nothing leaks between runs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch

from benchmark.core.claims import RunClaim
from benchmark.core.config import RunConfig
from benchmark.core.pipeline import FoundResult, record_failure, run
from benchmark.core.store import finished_ok, read_result, result_path, results_path, write_summary
from benchmark.core.tracking import finish_open_run
from benchmark.sweeps.spec import GridSpec, Shard, describe, validate_all


class GridInterrupted(BaseException):
    """Raised from the SIGINT/SIGTERM handler. A BaseException, so neither `benchmark.core.pipeline` (which records
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

# A search point that failed (an lr that diverged) in a cell that chose among its other points: a result of the search,
# counted apart, not a failure of the grid (its exit status stays 0 when every final run is ok).
FAILED_POINT = "failed search point"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

@dataclass
class GridRunner:
    """Executes runs one by one: skips finished ones, records failures, prints progress with an ETA.

    The ETA is the mean wall time of the runs trained (ok) in this call times the runs still to train, divided by
    the runs trained at a time (`jobs`). Runs still to train leave out the `finished` ones (found done before the
    grid started) not reached yet: a resumed grid of 540 runs with 48 left shows the time of 48.
    """

    total: int
    out: TextIO = sys.stdout
    jobs: int = 1
    finished: int = 0
    done: int = 0
    counts: dict = field(default_factory=lambda: {"ok": 0, "skipped": 0, "failed": 0, "claimed": 0})
    trained_seconds: list = field(default_factory=list)

    def execute(self, cfg: RunConfig, rerun_if=None, record_claimed: bool = True) -> dict:
        """Run `cfg` unless its result exists with status ok (and `rerun_if(result)` is false); never raises
        for a failing run. Returns the result dict (status ok, failed, or claimed: another live process trains it).
        `record_claimed=False`: a claimed run is not counted yet, the caller waits for it (`await_claimed`)."""
        to_train, existing = self.to_train(cfg, rerun_if)
        if to_train is None:
            return existing
        started = time.time()
        result = self.train(to_train, started)
        if record_claimed or result.get("status") != "claimed":
            self.record(cfg, result, time.time() - started)
        return result

    def await_claimed(self, cfg: RunConfig, result: dict, rerun_if=None) -> dict:
        """`cfg`'s result once no other process holds it: for a run that `result` says is claimed, wait until its
        holder lets go, then execute it again (skipped when the holder finished it, trained here when it failed or
        died). A search needs every point's result before it can choose."""
        while result.get("status") == "claimed":
            resolved = cfg.resolved()
            holder = result.get("claimed_by") or {}
            print(f"{self.progress()} waiting {describe(cfg)}: held by pid {holder.get('pid')} on "
                  f"{holder.get('host')}", file=self.out, flush=True)
            RunClaim(resolved.results_dir, resolved.run_id()).wait_released()
            result = self.execute(cfg, rerun_if, record_claimed=False)
        return result

    def to_train(self, cfg: RunConfig, rerun_if=None) -> tuple[RunConfig | None, dict | None]:
        """(the config to train, None), or (None, its finished result) after reporting it skipped."""
        existing = finished_result(cfg)
        stale = existing is not None and rerun_if is not None and rerun_if(existing)
        if existing and not stale:
            self.finish(cfg, "skipped", "already done")
            return None, existing
        return replace(cfg, force=cfg.force or stale), None

    def record(self, cfg: RunConfig, result: dict, seconds: float) -> None:
        if isinstance(result, FoundResult):  # another process finished it after this one looked
            self.finish(cfg, "skipped", "finished by another process")
            return result
        status = result.get("status", "failed")
        if status == "claimed":
            holder = result.get("claimed_by") or {}
            self.finish(cfg, status, f"trained by pid {holder.get('pid')} on {holder.get('host')}")
            return result
        if status == "ok":  # failures often end at once (missing data): they would shrink the ETA
            self.trained_seconds.append(seconds)
        detail = (f"test top-1 {result['test_top1']:.2f} (val {result['val_top1']:.2f})" if status == "ok"
                  else result.get("error", "no error recorded"))
        self.finish(cfg, status, f"{detail} in {format_seconds(seconds)}")
        return result

    @staticmethod
    def train(cfg: RunConfig, started: float) -> dict:
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
        print(f"{self.progress()} {status:7s} {describe(cfg)}: {detail}", file=self.out, flush=True)

    def progress(self) -> str:
        # a run counted as finished may still train (a search's stale final): never below 0
        remaining = max(0, self.total - self.done - max(0, self.finished - self.counts["skipped"]))
        eta = ""
        if self.trained_seconds and remaining:
            mean = sum(self.trained_seconds) / len(self.trained_seconds)
            eta = f", ETA {format_seconds(remaining * mean / self.jobs)}"
        return f"[grid {self.done}/{self.total}{eta}]"

    def absorb(self, cell: RunConfig, counts: dict, trained_seconds: list[float], added: int = 0) -> None:
        """Add the runs a worker did for one search `cell` (its search points and final runs: `counts` by status, the
        wall time of each that trained ok, the runs its widening `added` to the plan) and print one progress line."""
        self.total += added
        for status, count in counts.items():
            self.counts[status] = self.counts.get(status, 0) + count
            self.done += count
        self.trained_seconds += trained_seconds
        done = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
        print(f"{self.progress()} cell    {describe(cell, seed=False)}: {done}", file=self.out, flush=True)

    def excuse_failed_points(self, count: int) -> None:
        """Count `count` failed runs as failed search points: their cell chose among its other points."""
        if count:
            self.counts["failed"] -= count
            self.counts[FAILED_POINT] = self.counts.get(FAILED_POINT, 0) + count

    def summary_line(self) -> str:
        c = self.counts
        points = (f", {c[FAILED_POINT]} search point(s) failed in cells that chose among the rest (each result says "
                  f"why, e.g. an lr that diverged)") if c.get(FAILED_POINT) else ""
        return (f"{self.done}/{self.total} runs: {c['ok']} trained ok, {c['skipped']} already done, "
                f"{c['failed']} failed, {c['claimed']} claimed by other processes{points}")

def finished_result(cfg: RunConfig) -> dict | None:
    """The run's result when it finished ok and FORCE is off (the grid skips it), else None."""
    resolved = cfg.resolved()
    existing = read_result(result_path(resolved.results_dir, resolved.run_id()))
    return existing if finished_ok(existing) and not cfg.force else None

def count_finished(configs: list[RunConfig]) -> int:
    """How many of `configs` the grid will skip as finished (for its ETA)."""
    return sum(finished_result(cfg) is not None for cfg in configs)

def plan_grid(spec: GridSpec, shard: Shard | None = None) -> list[RunConfig]:
    """The runs `run_grid` would start (of `shard` alone), every one of the grid checked first; nothing trains."""
    configs = spec.configs()
    validate_all(configs)
    return [cfg for cfg in (shard.select(configs) if shard is not None else configs) if finished_result(cfg) is None]

def run_grid(spec: GridSpec, out: TextIO = sys.stdout, shard: Shard | None = None, jobs: int = 1) -> GridRunner:
    """Every run of the grid, or of its `shard` (skipping finished ones), `jobs` at a time; writes summary.csv.
    GridInterrupted propagates."""
    configs = spec.configs()
    validate_all(configs)  # the whole grid, in every shard: each refuses the same typo before training
    if shard is not None:
        mine = shard.select(configs)
        print(f"Shard {shard}: {len(mine)} of the grid's {len(configs)} runs", file=out, flush=True)
        configs = mine
    runner = GridRunner(total=len(configs), out=out, jobs=jobs, finished=count_finished(configs))
    try:
        if jobs > 1:
            run_in_workers(runner, configs, jobs, results_path(spec.base.results_dir, "logs"))
        else:
            for cfg in configs:
                runner.execute(cfg)
    finally:
        write_summary(spec.base.results_dir)
    return runner

def run_in_workers(runner: GridRunner, configs: list[RunConfig], jobs: int, log_dir: Path) -> None:
    """Train the grid's unfinished runs in `jobs` worker processes, each taking the next run when it is free.

    Why: a small model's step does not keep 2+ cores busy (per-op dispatch, Python, tiny matmuls), so two runs on
    one thread each finish sooner than the same two one after another on two threads.
    Costliest fractions go first, so the last runs to finish are short ones and no worker idles long at the end.
    This process prints one progress line per run; the workers are `worker_pool`'s.
    """
    pending = sorted((to_train for to_train, _ in map(runner.to_train, configs) if to_train is not None),
                     key=costliest_first)
    with worker_pool(jobs, log_dir) as (pool, threads):
        print(f"Training {len(pending)} runs, {jobs} at a time ({threads} thread(s) each); their output: "
              f"{log_dir}/grid_worker_*.log", file=runner.out, flush=True)
        running = {pool.submit(train_in_worker, cfg): cfg for cfg in pending}
        for future in as_completed(running):
            result, seconds = future.result()
            runner.record(running[future], result, seconds)

def costliest_first(cfg: RunConfig) -> float:
    """Sort key: the most training data first (stable, so the grid's order within a fraction or shot count)."""
    return -(cfg.shots if cfg.shots is not None else cfg.train_fraction)

@contextmanager
def worker_pool(jobs: int, log_dir: Path):
    """(`jobs` spawned worker processes, threads each): the workers split the cores (cpu_count / jobs threads each),
    ignore SIGINT (the grid stops them, like a run, at once: results are atomic) and write their runs' output to
    `log_dir/grid_worker_<pid>.log`. Leaving by an exception (GridInterrupted, a worker that died) stops them now,
    not after their runs."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                               initargs=(threads, str(log_dir), os.getpid()))
    try:
        yield pool, threads
    except BaseException:
        for process in multiprocessing.active_children():  # the pool's workers: this process has no other children
            # SIGKILL: Lightning's trainer catches SIGTERM, ends that fit and lets the worker go on to its next
            # queued run; results are written atomically, so a killed run leaves nothing half-written
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()

def start_worker(threads: int, log_dir: str, grid_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the grid decides
    threading.Thread(target=exit_when_orphaned, args=(grid_pid,), daemon=True, name="grid-watch").start()
    torch.set_num_threads(threads)
    log = open(Path(log_dir) / f"grid_worker_{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115 — the worker's
    os.dup2(log.fileno(), 1)  # stdout and stderr (progress bars, warnings) for its lifetime
    os.dup2(log.fileno(), 2)

def exit_when_orphaned(grid_pid: int, every: float = 1.0) -> None:
    """End this worker once the grid that started it is gone: a grid killed by SIGKILL (the OOM killer, `kill -9`)
    cannot stop its workers, which would train on with nobody to collect their cells. The run in flight leaves
    nothing half-written (atomic results) and its claim is stale once this process is gone (core/claims.py)."""
    while os.getppid() == grid_pid:
        time.sleep(every)
    os._exit(1)  # from this thread: the main thread is inside a fit and would not look


def train_in_worker(cfg: RunConfig) -> tuple[dict, float]:
    started = time.time()
    result = GridRunner.train(cfg, started)
    sys.stdout.flush()
    sys.stderr.flush()
    return result, time.time() - started
