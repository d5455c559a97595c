"""Grids and the selection protocol on the embedded default with a 1-epoch budget: real runs, real files."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmark.core.config import REPO_ROOT, RunConfig
from benchmark.core.store import read_result, result_path
from benchmark.grid import main
from benchmark.sweeps.runner import run_grid
from benchmark.sweeps.search import SearchGrid, run_search, search_tag, select
from benchmark.sweeps.spec import GridSpec

BACKBONE = "vit_embedded_p7_28"


def run_file(results_dir, dataset, method, name):
    return result_path(results_dir, f"{dataset}/{BACKBONE}/{method}/{name}")


def test_grid_records_failures_goes_on_and_resumes(tmp_path):
    results = tmp_path / "results"
    empty = tmp_path / "no-fashion-mnist-here"
    empty.mkdir()
    # fashion_heldout reads Fashion-MNIST from DATA_ROOT: empty there, so its runs fail; digits ignores DATA_ROOT.
    base = RunConfig(epochs=1, results_dir=str(results), data_root=str(empty))
    out = io.StringIO()
    runner = run_grid(GridSpec(["linear"], [0.1], [0, 1], ["fashion_heldout", "digits"], base), out=out)

    assert runner.counts == {"ok": 2, "skipped": 0, "failed": 2, "claimed": 0}
    failed = read_result(run_file(results, "fashion_heldout", "linear", "frac0.1_seed0"))
    assert failed["status"] == "failed" and "Fashion-MNIST" in failed["error"]
    for seed in (0, 1):  # the grid went on after the failures
        assert read_result(run_file(results, "digits", "linear", f"frac0.1_seed{seed}"))["status"] == "ok"
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[grid 1/4] failed") and "Fashion-MNIST" in lines[0]  # no ETA before a run trained
    assert lines[2].startswith("[grid 3/4, ETA ") and " ok " in lines[2]
    assert lines[-1].startswith("[grid 4/4]") and "test top-1" in lines[-1]

    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == 4 and sorted(summary["status"]) == ["failed", "failed", "ok", "ok"]

    done = run_file(results, "digits", "linear", "frac0.1_seed0")
    stamp = done.stat().st_mtime_ns
    again = run_grid(GridSpec(["linear"], [0.1], [0, 1], ["digits"], base), out=io.StringIO())
    assert again.counts == {"ok": 0, "skipped": 2, "failed": 0, "claimed": 0} and not again.trained_seconds
    assert done.stat().st_mtime_ns == stamp


def test_grid_with_two_jobs_trains_each_run_once_records_failures_and_resumes(tmp_path):
    """JOBS=2: worker processes train the runs (costliest fraction first); every run has its result, a failing one
    is recorded, progress lines come from this process, the workers' output goes to their logs; a second call
    trains nothing."""
    results = tmp_path / "results"
    empty = tmp_path / "no-fashion-mnist-here"
    empty.mkdir()
    base = RunConfig(epochs=1, results_dir=str(results), data_root=str(empty))
    spec = GridSpec(["linear", "bias"], [0.1, 0.2], [0], ["digits", "fashion_heldout"], base)
    out = io.StringIO()
    runner = run_grid(spec, out=out, jobs=2)

    assert runner.counts == {"ok": 4, "skipped": 0, "failed": 4, "claimed": 0}
    for method in ("linear", "bias"):
        for fraction in ("0.1", "0.2"):
            assert read_result(run_file(results, "digits", method, f"frac{fraction}_seed0"))["status"] == "ok"
            failed = read_result(run_file(results, "fashion_heldout", method, f"frac{fraction}_seed0"))
            assert failed["status"] == "failed" and "Fashion-MNIST" in failed["error"]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Training 8 runs, 2 at a time")
    progress = [line for line in lines if line.startswith("[grid ")]
    assert len(progress) == 8 and progress[-1].startswith("[grid 8/8")
    assert "frac=0.2" in progress[0] or "frac=0.2" in progress[1]  # the larger fraction was handed out first
    logs = list((results / "logs").glob("grid_worker_*.log"))
    assert logs and any("trainable params" in log.read_text() for log in logs)
    assert len(pd.read_csv(results / "summary.csv")) == 8

    again = run_grid(GridSpec(["linear", "bias"], [0.1, 0.2], [0], ["digits"], base), out=io.StringIO(), jobs=2)
    assert again.counts == {"ok": 0, "skipped": 4, "failed": 0, "claimed": 0}


def test_grid_cli_rejects_bad_input_before_training(tmp_path, capsys):
    code = main(["--methods", "linear,vpt_dep", "--fractions", "0.1", "--datasets", "digits", "--results-dir",
                 str(tmp_path)])
    assert code == 2
    assert "Did you mean 'vpt_deep'?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        main(["--fractions", "0.1,1.5"])
    assert main(["--method", "linear", "--results-dir", str(tmp_path)]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["--search", "--lr", "0.1", "--results-dir", str(tmp_path)]) == 2
    assert "SEARCH_LRS" in capsys.readouterr().err
    assert main(["--search-lrs", "0.1", "--results-dir", str(tmp_path)]) == 2
    assert "need --search" in capsys.readouterr().err
    assert main(["--search-lr-factors", "0.2,1,5", "--results-dir", str(tmp_path)]) == 2
    assert "need --search" in capsys.readouterr().err
    assert main(["--search", "--search-lrs", "0.1", "--search-lr-factors", "1", "--results-dir", str(tmp_path)]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(["--jobs", "0", "--results-dir", str(tmp_path)]) == 2
    assert "JOBS must be a whole number >= 1" in capsys.readouterr().err
    assert main(["--search-widen", "1", "--results-dir", str(tmp_path)]) == 2
    assert "SEARCH_WIDEN= is the leaderboard's rule" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--search", "halve"])
    assert "SEARCH must be 0, 1 or halving" in capsys.readouterr().err
    assert main(["--search", "--jobs", "0", "--results-dir", str(tmp_path)]) == 2
    assert "JOBS must be a whole number >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_grid_stops_cleanly_on_signal_and_resumes(tmp_path, signum):
    """The signal goes once the grid says its second run trains: after the progress line of the first run, the
    next `trainable params` line (printed as a fit starts). Output is read line by line as it comes, never slept
    on; stderr goes to a file, so no unread pipe can fill up and block the grid. A watchdog kills a grid that never
    gets there, so a broken grid fails the test with its output instead of hanging it."""
    results = tmp_path / "results"
    command = [sys.executable, "-m", "benchmark.grid", "--methods", "linear,full", "--fractions", "0.1",
               "--datasets", "digits", "--epochs", "30", "--results-dir", str(results)]
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(900, proc.kill)  # generous: a loaded machine is slow, never this slow
    watchdog.start()
    try:
        seen, first_recorded = [], False
        for line in proc.stdout:
            seen.append(line)
            first_recorded = first_recorded or line.startswith("[grid 1/2")
            if first_recorded and line.startswith("trainable params"):
                break
        assert first_recorded and seen[-1].startswith("trainable params"), \
            "".join(seen)[-3000:] + stderr_path.read_text()[-3000:]
        assert proc.poll() is None
        proc.send_signal(signum)
        proc.stdout.read()  # to the end: the grid exits
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = stderr_path.read_text()

    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "run the same command again to resume" in stderr
    assert read_result(run_file(results, "digits", "linear", "frac0.1_seed0"))["status"] == "ok"  # finished: kept
    assert not run_file(results, "digits", "full", "frac0.1_seed0").exists()  # interrupted: not recorded
    assert len(pd.read_csv(results / "summary.csv")) == 1

    # The next call resumes: the finished run is skipped (the 30-epoch one is left out to keep the test short).
    resumed = run_grid(GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(epochs=30, results_dir=str(results))),
                       out=io.StringIO())
    assert resumed.counts["skipped"] == 1 and not resumed.trained_seconds


GRID_WITH_A_SLEEPING_WORKER = """
import os, sys, time
from pathlib import Path
from benchmark.sweeps.runner import worker_pool

def nap(pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    with worker_pool(1, Path(sys.argv[1])) as (pool, _):
        pool.submit(nap, sys.argv[2]).result()
"""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (/proc/<pid>/stat's third field)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_worker_exits_when_its_grid_is_killed_with_sigkill(tmp_path):
    """SIGKILL (the OOM killer, kill -9) gives the grid no chance to stop its workers: each watches its parent and
    ends itself. The worker here sleeps in its task as a run would train, so only the watch can end it."""
    script, pid_file = tmp_path / "grid.py", tmp_path / "worker.pid"
    script.write_text(GRID_WITH_A_SLEEPING_WORKER)
    grid = subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs"), str(pid_file)], cwd=REPO_ROOT,
                            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)})
    worker = None
    try:
        deadline = time.monotonic() + 300  # generous: the worker imports torch first
        while not pid_file.exists() or not pid_file.read_text():
            assert grid.poll() is None and time.monotonic() < deadline, "the worker never started its task"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert alive(worker)
        grid.kill()
        grid.wait()
        deadline = time.monotonic() + 120
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(worker), "the worker trains on after its grid was killed"
    finally:
        if grid.poll() is None:
            grid.kill()
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_select_best_val_ties_to_smaller_lr_ignoring_failures():
    ok = lambda val: {"status": "ok", "val_top1": val, "seed": 0}
    points = [(1.0, 0.0, ok(80.0)), (0.1, 0.01, ok(80.0)), (0.1, 0.0, ok(80.0)), (0.5, 0.0, ok(79.0)),
              (5.0, 0.0, {"status": "failed", "error": "NonFiniteLossError"}), (2.5, 0.0, ok(float("nan")))]
    lr, wd, _ = select(points)
    assert (lr, wd) == (0.1, 0.0)
    assert select([(5.0, 0.0, {"status": "failed"})]) is None


def test_search_selects_on_val_and_retrains_on_trainval(tmp_path):
    results = tmp_path / "results"
    base = RunConfig(epochs=1, results_dir=str(results))
    spec = GridSpec(["linear"], [0.1], [0], ["digits"], base)
    runner = run_search(spec, SearchGrid(lrs=(0.05, 2.0), weight_decays=(0.0,)))
    assert runner.counts == {"ok": 3, "skipped": 0, "failed": 0, "claimed": 0}

    points = {lr: read_result(run_file(results, "digits", "linear", f"frac0.1_seed0_{search_tag(lr, 0.0)}"))
              for lr in (0.05, 2.0)}
    assert all(p["train_on"] == "train" and p["status"] == "ok" for p in points.values())
    best = max(points, key=lambda lr: (points[lr]["val_top1"], -lr))
    final = read_result(run_file(results, "digits", "linear", "frac0.1_seed0_trainval"))
    assert final["train_on"] == "trainval" and final["status"] == "ok"
    assert final["selected_lr"] == best and final["lr"] == best and final["selected_weight_decay"] == 0.0
    assert final["n_train"] > points[best]["n_train"]  # train + val
    assert [p["lr"] for p in final["selection"]["points"]] == [0.05, 2.0]

    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == 3 and summary["selected_lr"].notna().sum() == 1

    again = run_search(spec, SearchGrid(lrs=(0.05, 2.0), weight_decays=(0.0,)))
    assert again.counts["skipped"] == 3 and not again.trained_seconds


def test_search_with_two_jobs_runs_whole_cells_in_workers_costliest_first(tmp_path):
    """JOBS=2 with SEARCH=1: each worker takes a whole cell (its search points, then its final run with the lr its
    own search chose), the largest fractions first; one progress line per cell here, each run's line in the
    worker's log; a second call trains nothing."""
    results = tmp_path / "results"
    spec = GridSpec(["bias"], [0.1, 0.2, 0.4], [0], ["digits"], RunConfig(epochs=1, results_dir=str(results)))
    grid = SearchGrid(lrs=(0.01, 0.05), weight_decays=(0.0,))
    out = io.StringIO()
    runner = run_search(spec, grid, jobs=2, out=out)

    assert runner.counts == {"ok": 9, "skipped": 0, "failed": 0, "claimed": 0} and len(runner.trained_seconds) == 9
    for fraction in ("0.1", "0.2", "0.4"):
        points = {lr: read_result(run_file(results, "digits", "bias", f"frac{fraction}_seed0_{search_tag(lr, 0.0)}"))
                  for lr in (0.01, 0.05)}
        best = max(points, key=lambda lr: (points[lr]["val_top1"], -lr))
        final = read_result(run_file(results, "digits", "bias", f"frac{fraction}_seed0_trainval"))
        assert final["status"] == "ok" and final["selected_lr"] == best == final["lr"], fraction
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Searching 3 cells, 2 at a time")
    cells = [line for line in lines if line.startswith("[grid ")]
    assert len(cells) == 3 and all(" cell    bias digits frac=" in c and c.endswith(": 3 ok") for c in cells)
    assert cells[-1].startswith("[grid 9/9]") and "seed=" not in cells[-1]
    firsts = []  # the first cell each worker took: the two costliest (0.4 and 0.2) go out before 0.1
    for log in (results / "logs").glob("grid_worker_*.log"):
        runs = [line for line in log.read_text().splitlines() if line.startswith("[grid 1/3")]
        assert runs, log
        firsts.append(runs[0].split(" frac=")[1].split()[0])
    assert sorted(firsts) == ["0.2", "0.4"]

    again = io.StringIO()
    assert run_search(spec, grid, jobs=2, out=again).counts == {"ok": 0, "skipped": 9, "failed": 0, "claimed": 0}
    assert again.getvalue().count(": 3 skipped") == 3


def test_search_refuses_a_fixed_lr(tmp_path):
    from benchmark.core.errors import ConfigError

    spec = GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(lr=0.1, results_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="SEARCH_LRS"):
        run_search(spec)
