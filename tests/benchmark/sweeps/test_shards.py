"""Grid shards (`make grid SHARD=i/n`, benchmark/sweeps/spec.py::Shard): disjoint parts whose union is the grid, the
same on every machine, run concurrently over one results folder, each re-runnable to fill its own gaps."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from benchmark.core.config import REPO_ROOT, RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.store import read_result, result_path
from benchmark.grid import main
from benchmark.sweeps.spec import FIG3_FRACTIONS, PAPER_METHODS, GridSpec, Shard, describe

PAPER_GRID = GridSpec(list(PAPER_METHODS), list(FIG3_FRACTIONS), [0, 1], ["digits", "fashion_heldout"])
SMALL_GRID = dict(methods=["linear", "bias"], fractions=[0.1, 0.2, 0.3], seeds=[0], datasets=["digits"])


@pytest.mark.parametrize(("grid", "count"), [(PAPER_GRID, 1), (PAPER_GRID, 3), (PAPER_GRID, 7),
                                             (GridSpec(**SMALL_GRID), 8)])  # 120 runs; 6 runs over 8 shards
def test_shards_partition_the_grid(grid, count):
    grid = grid.configs()
    parts = [Shard(index, count).select(grid) for index in range(count)]
    ids = [[cfg.resolved().run_id() for cfg in part] for part in parts]
    every = [run_id for part in ids for run_id in part]
    assert len(every) == len(set(every)) == len(grid)  # disjoint, and together the whole grid
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    for part in parts:  # each part in the grid's (dataset-major) order
        assert [grid.index(cfg) for cfg in part] == sorted(grid.index(cfg) for cfg in part)


def test_assignment_is_pinned_and_mixes_cheap_and_costly_runs():
    """sha256 of the run id: the same parts on every machine, Python and PYTHONHASHSEED (pinned here, so a
    change of the rule cannot pass unnoticed while shards of an old and a new checkout share a results folder)."""
    grid = GridSpec(**SMALL_GRID).configs()
    assert [[describe(cfg) for cfg in Shard(index, 3).select(grid)] for index in range(3)] == [
        ["linear digits frac=0.1 seed=0", "linear digits frac=0.3 seed=0"],
        ["bias digits frac=0.1 seed=0", "bias digits frac=0.3 seed=0"],
        ["linear digits frac=0.2 seed=0", "bias digits frac=0.2 seed=0"],
    ]
    # Dealing the grid's own order to 5 shards would give each shard one of the 5 fractions (all of 1.0 to one).
    for index in range(5):
        assert len({cfg.train_fraction for cfg in Shard(index, 5).select(PAPER_GRID.configs())}) >= 3


@pytest.mark.parametrize("text", ["3/3", "1/0", "a/3", "1", "-1/3", "1/3/4", ""])
def test_bad_shard_is_refused_with_the_fix(text, capsys):
    with pytest.raises(ConfigError, match=re.escape("SHARD must be i/n with 0 <= i < n")):
        Shard.parse(text)
    with pytest.raises(SystemExit) as stop:
        main(["--methods", "linear", "--fractions", "0.1", "--datasets", "digits", f"--shard={text}"])  # as make
    assert stop.value.code == 2
    assert "SHARD=0/3, SHARD=1/3 and SHARD=2/3 together run the whole grid" in capsys.readouterr().err


# --- three shards at once over one results folder -------------------------------------------------------------
TRAINED = re.compile(r"^\[grid \d+/\d+[^\]]*\] (ok|skipped|failed)\s+(.+?): ", re.MULTILINE)


def start_shard(results, shard: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmark.grid", "--methods", ",".join(SMALL_GRID["methods"]),
               "--fractions", ",".join(map(str, SMALL_GRID["fractions"])), "--seeds", "0", "--datasets", "digits",
               "--epochs", "1", "--results-dir", str(results), "--shard", shard]
    # One thread each: three processes share the machine's cores.
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen) -> dict[str, list[str]]:
    """{status: [run descriptions]} from a shard's progress lines."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    by_status: dict[str, list[str]] = {"ok": [], "skipped": [], "failed": []}
    for status, run in TRAINED.findall(out):
        by_status[status].append(run)
    return by_status


@pytest.mark.slow
def test_three_concurrent_shards_run_the_grid_once_and_refill_only_their_gaps(tmp_path):
    results = tmp_path / "results"
    grid = GridSpec(**SMALL_GRID, base=RunConfig(epochs=1, results_dir=str(results))).configs()
    processes = [start_shard(results, f"{index}/3") for index in range(3)]
    trained = [finish(process)["ok"] for process in processes]  # which shard wrote which result

    every = [run for runs in trained for run in runs]
    assert sorted(every) == sorted(describe(cfg) for cfg in grid)  # each run trained once, by exactly one shard
    assert [len(runs) for runs in trained] == [2, 2, 2]
    paths = {describe(cfg): result_path(results, cfg.resolved().run_id()) for cfg in grid}
    assert all(read_result(path)["status"] == "ok" for path in paths.values())

    # Shard 1 lost a result, and so did shard 2: re-running shard 1 redoes its own gap and nothing else.
    lost_own, lost_other = trained[1][0], trained[2][0]
    paths[lost_own].unlink()
    paths[lost_other].unlink()
    stamps = {run: path.stat().st_mtime_ns for run, path in paths.items() if path.exists()}
    again = finish(start_shard(results, "1/3"))
    assert again["ok"] == [lost_own] and again["skipped"] == [trained[1][1]]
    assert read_result(paths[lost_own])["status"] == "ok" and not paths[lost_other].exists()
    assert {run: paths[run].stat().st_mtime_ns for run in stamps} == stamps  # no finished result rewritten
