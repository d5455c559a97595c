"""The grid's and the selection protocol's rules, on hand-built results: which runs train again (failed ones, stale
finals), which search point wins (ties), what a final run stores, the ETA and the exit status; and one real
grid interrupted and resumed against the same grid run straight through."""

from __future__ import annotations

import io
import signal
from types import SimpleNamespace

import pandas as pd
import pytest

from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.store import atomic_write_json, read_result, result_path
from benchmark.grid import main
from benchmark.sweeps import runner as grid_runner
from benchmark.sweeps.runner import FAILED_POINT, GridRunner, format_seconds, run_grid
from benchmark.sweeps.search import SearchGrid, lr_edge, run_search, search_tag
from benchmark.sweeps.spec import GridSpec
from tests.helpers.runs import FakeTraining

BACKBONE = "vit_embedded_p7_28"


@pytest.fixture
def fake(monkeypatch):
    training = FakeTraining()
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    return training


def run_id(name: str, method: str = "linear") -> str:
    return f"digits/{BACKBONE}/{method}/{name}"


def write(results, name: str, **result) -> None:
    atomic_write_json(result_path(results, run_id(name)), result)


# --- which runs train ----------------------------------------------------------------------------------------
def test_grid_retrains_failed_results_and_skips_ok_ones(tmp_path, fake):
    results = tmp_path / "results"
    write(results, "frac0.1_seed0", status="ok", val_top1=1.0, test_top1=2.0)
    write(results, "frac0.1_seed1", status="failed", error="RuntimeError: out of memory")
    runner = run_grid(GridSpec(["linear"], [0.1], [0, 1, 2], ["digits"], RunConfig(results_dir=str(results))),
                      out=io.StringIO())
    assert fake.trained == [run_id("frac0.1_seed1"), run_id("frac0.1_seed2")]
    assert runner.counts == {"ok": 2, "skipped": 1, "failed": 0, "claimed": 0}
    assert read_result(result_path(results, run_id("frac0.1_seed0")))["test_top1"] == 2.0  # not rewritten
    assert read_result(result_path(results, run_id("frac0.1_seed1")))["status"] == "ok"

    forced = run_grid(GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(results_dir=str(results), force=True)),
                      out=io.StringIO())
    assert forced.counts["ok"] == 1 and fake.trained[-1] == run_id("frac0.1_seed0")


def test_grid_exit_status_is_one_when_a_run_failed(tmp_path, monkeypatch, capsys):
    training = FakeTraining(lambda cfg: {"status": "failed", "error": "E"} if cfg.seed == 1 else
                            {"status": "ok", "val_top1": 1.0, "test_top1": 1.0})
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    args = ["--methods", "linear", "--fractions", "0.1", "--datasets", "digits", "--results-dir", str(tmp_path)]
    assert main([*args, "--seeds", "0"]) == 0
    assert main([*args, "--seeds", "0,1"]) == 1
    assert "2/2 runs: 0 trained ok, 1 already done, 1 failed" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 2


def test_eta_is_the_mean_time_of_ok_runs_times_the_runs_left(tmp_path, monkeypatch):
    """Runs of 100 s (ok), 1 s (failed), 200 s (ok), then one left: ETAs 3 x 100 s, 2 x 100 s, 1 x 150 s."""
    clock = SimpleNamespace(now=0.0)
    durations = {0: 100.0, 1: 1.0, 2: 200.0, 3: 50.0}

    def outcome(cfg):
        clock.now += durations[cfg.seed]
        return {"status": "failed", "error": "E"} if cfg.seed == 1 else {"status": "ok", "val_top1": 1.0,
                                                                            "test_top1": 1.0}

    monkeypatch.setattr(GridRunner, "train", staticmethod(FakeTraining(outcome)))
    monkeypatch.setattr(grid_runner, "time", SimpleNamespace(time=lambda: clock.now))
    out = io.StringIO()
    run_grid(GridSpec(["linear"], [0.1], [0, 1, 2, 3], ["digits"], RunConfig(results_dir=str(tmp_path))), out=out)
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[grid 1/4, ETA 5m00s", "[grid 2/4, ETA 3m20s",
                                                      "[grid 3/4, ETA 2m30s", "[grid 4/4"]
    assert lines[0].endswith("in 1m40s") and lines[2].endswith("in 3m20s")


def test_eta_of_a_resumed_grid_leaves_out_the_runs_already_done(tmp_path, monkeypatch):
    """Seeds 2 and 3 finished before the grid starts; 0 and 1 train in 100 s each. ETAs: 1 x 100 s after seed 0
    (not 3 x 100 s), none after seed 1, none while the finished two are skipped."""
    clock = SimpleNamespace(now=0.0)

    def outcome(cfg):
        clock.now += 100.0
        return {"status": "ok", "val_top1": 1.0, "test_top1": 1.0}

    monkeypatch.setattr(GridRunner, "train", staticmethod(FakeTraining(outcome)))
    monkeypatch.setattr(grid_runner, "time", SimpleNamespace(time=lambda: clock.now))
    for seed in (2, 3):
        write(tmp_path, f"frac0.1_seed{seed}", status="ok", val_top1=1.0, test_top1=1.0)
    write(tmp_path, "frac0.1_seed1", status="failed", error="E")  # to train again: not counted as done
    out = io.StringIO()
    run_grid(GridSpec(["linear"], [0.1], [0, 1, 2, 3], ["digits"], RunConfig(results_dir=str(tmp_path))), out=out)
    assert [line.split("]")[0] for line in out.getvalue().splitlines()] == [
        "[grid 1/4, ETA 1m40s", "[grid 2/4", "[grid 3/4", "[grid 4/4"]


def test_eta_of_a_resumed_search_leaves_out_the_points_already_done(tmp_path, monkeypatch):
    """Two cells (10%, 20%) of 2 points + 2 finals, each run 100 s. The 20% cell's points are done and its two finals
    exist but are stale (another lr), so 4 runs count as finished yet the finals train again. ETAs: (8 - 1 - 4) x
    100 s after the first run, then 2 and 1 runs; none from then on, though the stale finals train (never < 0)."""
    clock = SimpleNamespace(now=0.0)
    outcome = search_outcome({(0.1, 0.0): 70.0, (0.5, 0.0): 80.0})

    def timed(cfg):
        clock.now += 100.0
        return outcome(cfg)

    training = FakeTraining(timed)
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    monkeypatch.setattr(grid_runner, "time", SimpleNamespace(time=lambda: clock.now))
    for lr in (0.1, 0.5):
        write(tmp_path, f"frac0.2_seed0_{search_tag(lr, 0.0)}", status="ok", val_top1=lr, test_top1=0.0, seed=0)
    for seed in (0, 1):
        write(tmp_path, f"frac0.2_seed{seed}_trainval", status="ok", val_top1=0.0, test_top1=1.0, seed=seed,
              selected_lr=9.0, selected_weight_decay=0.0)
    out = io.StringIO()
    spec = GridSpec(["linear"], [0.1, 0.2], [0, 1], ["digits"],
                    RunConfig(results_dir=str(tmp_path), feature_cache=False))
    run_search(spec, SearchGrid((0.1, 0.5), (0.0,)), out=out)
    assert [line.split("]")[0] for line in out.getvalue().splitlines()] == [
        "[grid 1/8, ETA 5m00s", "[grid 2/8, ETA 3m20s", "[grid 3/8, ETA 1m40s", "[grid 4/8", "[grid 5/8", "[grid 6/8",
        "[grid 7/8", "[grid 8/8"]
    assert training.trained[-2:] == [run_id("frac0.2_seed0_trainval"), run_id("frac0.2_seed1_trainval")]


@pytest.mark.parametrize("lr, lrs, edge", [(2.5, [0.1, 0.5, 2.5], "highest"), (0.1, [0.5, 0.1, 2.5], "lowest"),
                                           (0.5, [0.1, 0.5, 2.5], ""), (0.3, [0.3], ""), (0.3, [0.3, 0.3], "")])
def test_lr_edge_names_an_end_of_the_searched_grid(lr, lrs, edge):
    assert lr_edge(lr, lrs) == edge


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (59.4, "0m59s"), (61, "1m01s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (3725, "1h02m"), (90061, "25h01m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


# --- the selection protocol on hand-built val accuracies -------------------------------------------------------
# lr x wd -> final-epoch val top-1. Best is 80 (to 1e-6): (0.1, 0.001), (0.5, 0.001), (0.5, 0.0) and (2.5, 0.0),
# whose 80.0000004 is float noise. Ties go to the smaller lr, then the smaller wd: (0.1, 0.001). Choosing by wd
# first would give (0.5, 0.0); without rounding, (2.5, 0.0).
VAL = {(0.1, 0.001): 80.0, (0.1, 0.0): 75.0, (0.5, 0.001): 80.0, (0.5, 0.0): 80.0, (2.5, 0.001): None,
       (2.5, 0.0): 80.0000004}
LRS, WDS = (0.1, 0.5, 2.5), (0.001, 0.0)


def search_outcome(val: dict):
    def outcome(cfg):
        if cfg.train_on == "trainval":
            return {"status": "ok", "val_top1": 0.0, "test_top1": 60.0 + cfg.seed}
        point = val[(float(cfg.tag.split("_lr")[1].split("_wd")[0]), float(cfg.tag.split("_wd")[1]))]
        if point is None:
            return {"status": "failed", "error": "NonFiniteLossError: nan"}
        return {"status": "ok", "val_top1": point, "test_top1": 0.0}
    return outcome


def test_search_picks_the_best_val_with_ties_to_smaller_lr_then_wd(tmp_path, monkeypatch):
    training = FakeTraining(search_outcome(VAL))
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    results = tmp_path / "results"
    # feature_cache=False: every point a run of its own (through the fake), not a one-pass head search
    spec = GridSpec(["linear"], [0.1], [3, 4], ["digits"], RunConfig(results_dir=str(results), feature_cache=False))
    runner = run_search(spec, SearchGrid(LRS, WDS))
    # the diverged point (2.5, 0.001) is a result of a search that chose among the rest, not a grid failure
    assert runner.counts == {"ok": 7, "skipped": 0, "failed": 0, "claimed": 0, FAILED_POINT: 1}
    points = [run_id(f"frac0.1_seed3_{search_tag(lr, wd)}") for lr in LRS for wd in WDS]
    assert training.trained == points + [run_id("frac0.1_seed3_trainval"), run_id("frac0.1_seed4_trainval")]
    for seed in (3, 4):
        final = read_result(result_path(results, run_id(f"frac0.1_seed{seed}_trainval")))
        assert (final["selected_lr"], final["selected_weight_decay"], final["selected_val_top1"]) == (0.1, 0.001, 80.0)
        assert (final["lr"], final["weight_decay"], final["train_on"], final["seed"]) == (0.1, 0.001, "trainval", seed)
        assert final["search_points"] == 6 and final["selection"]["search_seed"] == 3
        assert final["selected_lr_edge"] == "lowest"  # 0.1: the smallest of 0.1, 0.5, 2.5
        assert [(p["lr"], p["weight_decay"], p["status"]) for p in final["selection"]["points"]] == [
            (lr, wd, "failed" if VAL[(lr, wd)] is None else "ok") for lr in LRS for wd in WDS]

    # A search point's result changes (say, it was rerun): the selection moves and the finals train again.
    write(results, f"frac0.1_seed3_{search_tag(0.5, 0.0)}", status="ok", val_top1=90.0, test_top1=0.0, seed=3)
    training.trained.clear()
    again = run_search(spec, SearchGrid(LRS, WDS))
    # the diverged point is read back, not retried: only the finals train
    assert training.trained == [run_id("frac0.1_seed3_trainval"), run_id("frac0.1_seed4_trainval")]
    assert again.counts == {"ok": 2, "skipped": 5, "failed": 0, "claimed": 0, FAILED_POINT: 1}
    final = read_result(result_path(results, run_id("frac0.1_seed4_trainval")))
    assert (final["selected_lr"], final["selected_weight_decay"], final["lr"]) == (0.5, 0.0, 0.5)
    assert final["selected_lr_edge"] == ""  # 0.5 lies inside the grid

    # A final recorded before `selected_lr_edge` existed gains it without training again.
    old = {k: v for k, v in final.items() if k != "selected_lr_edge"}
    write(results, "frac0.1_seed4_trainval", **old)
    training.trained.clear()  # unchanged points, unchanged choice: nothing trains
    assert run_search(spec, SearchGrid(LRS, WDS)).counts == {"ok": 0, "skipped": 7, "failed": 0, "claimed": 0,
                                                             FAILED_POINT: 1}
    assert training.trained == []
    assert read_result(result_path(results, run_id("frac0.1_seed4_trainval"))) == final


def test_a_resumed_search_keeps_a_diverged_point_and_retrains_other_failures(tmp_path, monkeypatch, capsys):
    """lr 0.1 diverged and lr 0.5 ran out of memory in an earlier run: a divergence is the point's outcome (read back,
    counted as failed as when it trained), out of memory says nothing about it (trained again). The dry run counts
    the diverged point as done; FORCE=1 trains it again."""
    def point(lr: float) -> str:
        return f"frac0.1_seed0_{search_tag(lr, 0.0)}"

    write(tmp_path, point(0.1), status="failed", error="NonFiniteLossError: non-finite training loss in epoch 4")
    write(tmp_path, point(0.5), status="failed", error="OutOfMemoryError: CUDA out of memory")
    write(tmp_path, point(2.5), status="ok", val_top1=70.0, test_top1=0.0)
    training = FakeTraining(search_outcome({(0.1, 0.0): 90.0, (0.5, 0.0): 80.0, (2.5, 0.0): 70.0}))
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    args = ["--methods", "linear", "--fractions", "0.1", "--datasets", "digits", "--search", "--no-feature-cache",
            "--results-dir", str(tmp_path), "--seeds", "0"]
    monkeypatch.setattr("benchmark.grid.search_grid", lambda args: SearchGrid((0.1, 0.5, 2.5), (0.0,)))
    assert main([*args, "--dry-run"]) == 0
    assert "Dry run: 2 runs would start" in capsys.readouterr().out  # lr 0.5 and the final; not lr 0.1
    assert main(args) == 0
    assert training.trained == [run_id(point(0.5)), run_id("frac0.1_seed0_trainval")]
    out = capsys.readouterr().out
    assert "4/4 runs: 2 trained ok, 1 already done, 0 failed, 0 claimed by other processes, 1 search point(s)" in out
    final = read_result(result_path(tmp_path, run_id("frac0.1_seed0_trainval")))
    assert final["selected_lr"] == 0.5  # chosen among the points that finished, the kept divergence excluded

    training.trained.clear()
    assert main([*args, "--force"]) == 0
    assert run_id(point(0.1)) in training.trained
    assert read_result(result_path(tmp_path, run_id(point(0.1))))["status"] == "ok"


def test_a_diverged_search_point_leaves_the_exit_status_0_a_failed_final_1(tmp_path, monkeypatch, capsys):
    """`make leaderboard && make report`: a cell that chose among its other points is done; a final that fails is
    not (nor a cell whose every point failed: test_no_finished_search_point_records_the_finals_as_failed)."""
    outcome = search_outcome({(0.1, 0.0): 70.0, (0.5, 0.0): None})
    monkeypatch.setattr(GridRunner, "train", staticmethod(FakeTraining(outcome)))
    args = ["--methods", "linear", "--fractions", "0.1", "--datasets", "digits", "--search", "--no-feature-cache",
            "--results-dir", str(tmp_path), "--seeds"]
    monkeypatch.setattr("benchmark.grid.search_grid", lambda args: SearchGrid((0.1, 0.5), (0.0,)))
    assert main([*args, "0,1"]) == 0
    out = capsys.readouterr().out
    assert "4/4 runs: 3 trained ok, 0 already done, 0 failed, 0 claimed by other processes, 1 search point(s) " \
           "failed in cells that chose among the rest" in out

    def final_fails(cfg):
        return {"status": "failed", "error": "E"} if cfg.train_on == "trainval" and cfg.seed == 2 else outcome(cfg)
    monkeypatch.setattr(GridRunner, "train", staticmethod(FakeTraining(final_fails)))
    # two cells, each with a failed point and a failed final: only each cell's own points are excused
    args[args.index("0.1")] = "0.1,0.2"
    assert main([*args, "0,1,2"]) == 1
    assert "10/10 runs: 3 trained ok, 3 already done, 2 failed, 0 claimed by other processes, 2 search point(s)" in \
        capsys.readouterr().out


def test_final_runs_of_the_paper_recipe_train_at_the_scaled_selected_lr(tmp_path, monkeypatch):
    """Paper recipe, linear (batch 1024): the search's lrs are base lrs; the final run trains at base * 1024 / 256."""
    training = FakeTraining(search_outcome({(0.1, 0.0): 70.0, (1.0, 0.0): 71.0}))
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    spec = GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(recipe="paper", results_dir=str(tmp_path),
                                                                        feature_cache=False))
    run_search(spec, SearchGrid((0.1, 1.0), (0.0,)))
    point = read_result(result_path(tmp_path, run_id(f"frac0.1_seed0_{search_tag(1.0, 0.0)}")))
    final = read_result(result_path(tmp_path, run_id("frac0.1_seed0_trainval")))
    assert point["lr"] == pytest.approx(4.0) and final["lr"] == pytest.approx(4.0)
    assert final["selected_lr"] == 1.0  # the base lr, as the grid names it


def test_no_finished_search_point_records_the_finals_as_failed(tmp_path, monkeypatch):
    training = FakeTraining(lambda cfg: {"status": "failed", "error": "NonFiniteLossError: nan"})
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    spec = GridSpec(["linear"], [0.1], [0, 1], ["digits"], RunConfig(results_dir=str(tmp_path), feature_cache=False))
    runner = run_search(spec, SearchGrid((0.1, 0.5), (0.0,)))
    assert runner.counts == {"ok": 0, "skipped": 0, "failed": 4, "claimed": 0}
    assert training.trained == [run_id(f"frac0.1_seed0_{search_tag(lr, 0.0)}") for lr in (0.1, 0.5)]
    for seed in (0, 1):
        final = read_result(result_path(tmp_path, run_id(f"frac0.1_seed{seed}_trainval")))
        assert final["status"] == "failed" and "every search point" in final["error"]


# --- an interrupted and resumed grid equals one run straight through (real runs) -------------------------------
def summary_rows(results) -> list[tuple]:
    summary = pd.read_csv(results / "summary.csv")
    summary["run"] = [p.split("/runs/")[1] for p in summary["path"]]
    return sorted(summary[["run", "status", "test_top1", "val_top1", "n_train"]].itertuples(index=False, name=None))


def test_interrupted_then_resumed_grid_equals_the_uninterrupted_grid(tmp_path, monkeypatch, capsys):
    """SIGINT raised at the start of the second run (in this process, through the grid's own handler): one run
    recorded, the second dropped; the same command then trains the other two. Same runs, statuses and accuracies
    as the grid run in one go."""
    args = ["--methods", "linear", "--fractions", "0.1", "--seeds", "0,1,2", "--datasets", "digits", "--epochs", "2"]
    assert main([*args, "--results-dir", str(tmp_path / "straight")]) == 0

    real_train, started = GridRunner.train, []

    def interrupt_second(cfg, start):
        started.append(cfg.resolved().run_id())
        if len(started) == 2:
            signal.raise_signal(signal.SIGINT)  # the handler runs before raise_signal returns
        return real_train(cfg, start)

    monkeypatch.setattr(GridRunner, "train", staticmethod(interrupt_second))
    resumed = tmp_path / "resumed"
    assert main([*args, "--results-dir", str(resumed)]) == 128 + signal.SIGINT
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len(pd.read_csv(resumed / "summary.csv")) == 1 and len(list((resumed / "runs").rglob("*.json"))) == 1
    monkeypatch.setattr(GridRunner, "train", staticmethod(real_train))
    assert main([*args, "--results-dir", str(resumed)]) == 0
    assert "3/3 runs: 2 trained ok, 1 already done, 0 failed" in capsys.readouterr().out

    assert summary_rows(resumed) == summary_rows(tmp_path / "straight")
    assert [status for _, status, *_ in summary_rows(resumed)] == ["ok"] * 3


def test_grid_order_is_dataset_major_then_method_fraction_seed():
    configs = GridSpec(["linear", "bias"], [0.1, 1.0], [0, 1], ["digits", "fashion_heldout"]).configs()
    assert [(c.dataset, c.method, c.train_fraction, c.seed) for c in configs[:5]] == [
        ("digits", "linear", 0.1, 0), ("digits", "linear", 0.1, 1), ("digits", "linear", 1.0, 0),
        ("digits", "linear", 1.0, 1), ("digits", "bias", 0.1, 0)]
    assert [c.dataset for c in configs] == ["digits"] * 8 + ["fashion_heldout"] * 8


def test_zoo_grid_is_every_method_at_all_the_data_two_at_a_time():
    from benchmark.grid import parse_args
    from methods import list_methods

    args, _ = parse_args(["--zoo"])
    assert args.methods == list_methods() and args.fractions == [1.0] and args.jobs == 2
    assert args.datasets == ["digits", "fashion_heldout"] and args.seeds == [0]
    args, _ = parse_args(["--zoo", "--methods", "linear,ssf", "--fractions", "0.1"])  # the grid's own still win
    assert (args.methods, args.fractions) == (["linear", "ssf"], [0.1])
    args, _ = parse_args([])
    assert args.methods == ["full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"] and args.jobs == 1
    assert parse_args(["--zoo", "--search"])[0].jobs == 2  # a search: two cells at a time
    assert parse_args(["--search"])[0].jobs == 1 and parse_args(["--search", "--jobs", "3"])[0].jobs == 3


def test_a_grids_checks_build_each_model_once_and_still_refuse_every_cell(tmp_path, monkeypatch):
    """validate_all builds a model on the meta device once per (method, backbone, options, optimizer), not per
    cell: cells that differ only in seed and data share the build; another option value builds again; a model that
    cannot be built is refused for every cell that asks for it."""
    import benchmark.core.validate as validate
    from benchmark.sweeps.spec import validate_all

    built = []
    real = validate.create_method
    monkeypatch.setattr(validate, "create_method", lambda name, *a, **kw: built.append((name, kw)) or real(name, *a,
                                                                                                            **kw))
    base = dict(results_dir=str(tmp_path), epochs=1)
    same = [RunConfig(method="adapter", dataset=d, seed=s, **base) for d in ("digits", "fashion_heldout")
            for s in (0, 1, 2)]
    validate_all(same)
    assert len(built) == 1
    validate_all(same + [RunConfig(method="adapter", options={"reduction": 4}, **base)])
    assert len(built) == 1 + 2  # a fresh grid: the shared build once more, the other reduction once
    unbuildable = [RunConfig(method="adapter", options={"reduction": 7}, seed=s, **base) for s in (0, 1)]
    with pytest.raises(ConfigError) as err:
        validate_all(unbuildable)
    assert [p.split(":")[0] for p in err.value.problems] == [f"adapter digits frac=0.1 reduction=7 seed={s}"
                                                             for s in (0, 1)]
    assert all("reduction 7 does not divide" in p for p in err.value.problems)


def catch_sigterm_and_sleep(seconds: float, ready: str) -> None:
    """A worker's job that, as Lightning's trainer does, handles SIGTERM itself and carries on."""
    import time
    from pathlib import Path

    signal.signal(signal.SIGTERM, lambda *_: None)
    Path(ready).touch()
    time.sleep(seconds)


def test_a_stopped_grid_stops_its_workers_even_when_they_catch_sigterm(tmp_path):
    """Leaving the worker pool by an exception (the grid's GridInterrupted on Ctrl+C) ends the workers at once,
    also a worker inside a Lightning fit, which handles SIGTERM itself and would go on to its next queued run."""
    import multiprocessing
    import time

    ready = tmp_path / "ready"
    with pytest.raises(KeyboardInterrupt):
        with grid_runner.worker_pool(1, tmp_path) as (pool, _):
            pool.submit(catch_sigterm_and_sleep, 300, str(ready))
            deadline = time.time() + 120
            while not ready.exists() and time.time() < deadline:
                time.sleep(0.05)
            workers = multiprocessing.active_children()
            raise KeyboardInterrupt
    for worker in workers:
        worker.join(timeout=30)
    assert ready.exists() and workers and not any(worker.is_alive() for worker in workers)
