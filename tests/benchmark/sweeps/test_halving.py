"""SEARCH=halving (benchmark/sweeps/halving.py) on a fake trainer with known val curves: the rungs' sizes and epochs,
which points survive each rung, each rung run's schedule, and what it costs against the full search."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from benchmark.core.config import RunConfig
from benchmark.core.store import read_result, result_path
from benchmark.sweeps.halving import halving_rungs
from benchmark.sweeps.runner import GridRunner
from benchmark.sweeps.search import SearchGrid, run_search
from benchmark.sweeps.spec import GridSpec
from tests.helpers.runs import FakeTraining

BACKBONE = "vit_embedded_p7_28"
# linear on the quick recipe: lr 0.5 (x 0.2, 1, 5), 20 epochs, warmup 2
# val top-1 of each (lr, wd) after 5, 10 and 20 epochs (rung 0, 1, 2 of 6 points). (0.1, 0) starts slowest and
# ends best: the full search picks it; halving drops it at the first rung.
VAL = {(0.1, 0.001): {5: 50, 10: 0, 20: 0}, (0.1, 0.0): {5: 52, 10: 0, 20: 85},
       (0.5, 0.001): {5: 60, 10: 70, 20: 80}, (0.5, 0.0): {5: 58, 10: 71, 20: 79},
       (2.5, 0.001): {5: 40, 10: 0, 20: 0}, (2.5, 0.0): {5: 61, 10: 62, 20: 0}}
SURVIVE_RUNG_0 = [(0.5, 0.001), (0.5, 0.0), (2.5, 0.0)]  # 61, 60, 58 at 5 epochs: the best half of 6
SURVIVE_RUNG_1 = [(0.5, 0.001), (0.5, 0.0)]  # 71, 70 at 10 epochs: the best half of 3, rounded up


@pytest.mark.parametrize("n, epochs, expected", [
    (6, 20, [(5, 6, 3), (10, 3, 2), (20, 2, 1)]),  # ceil(log2 6) = 3 rungs, E/4, E/2, E
    (2, 20, [(20, 2, 1)]),  # nothing to halve: the full search
    (9, 40, [(5, 9, 5), (10, 5, 3), (20, 3, 2), (40, 2, 1)]),
    (6, 2, [(1, 6, 3), (1, 3, 2), (2, 2, 1)]),  # at least one epoch
])
def test_rungs_halve_the_points_and_double_the_epochs(n, epochs, expected):
    assert [(r.epochs, r.points, r.keep) for r in halving_rungs(n, epochs)] == expected


def point(cfg) -> tuple[float, float]:
    return float(cfg.tag.split("_lr")[1].split("_wd")[0]), cfg.weight_decay


def fake(monkeypatch) -> tuple[FakeTraining, list]:
    schedules = []

    def outcome(cfg):
        cost = {"epochs": cfg.epochs, "n_train": 100, "wall_seconds": 1.0}
        if cfg.train_on == "trainval":
            return cost | {"status": "ok", "val_top1": 0.0, "test_top1": 60.0}
        schedules.append((point(cfg), cfg.epochs, cfg.warmup_epochs))
        return cost | {"status": "ok", "val_top1": VAL[point(cfg)][cfg.epochs], "test_top1": 0.0}

    training = FakeTraining(outcome)
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    return training, schedules


def search(results, halving: bool) -> None:
    spec = GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(results_dir=str(results), feature_cache=False))
    run_search(spec, SearchGrid.override(None, None, None, halving=halving), out=io.StringIO())


def test_halving_keeps_the_best_half_of_each_rung(tmp_path, monkeypatch):
    training, schedules = fake(monkeypatch)
    search(tmp_path, halving=True)
    rungs = [[(p, e) for p, e, _ in schedules if e == epochs] for epochs in (5, 10, 20)]
    assert [p for p, _ in rungs[0]] == list(VAL)  # every point, lr-major
    assert sorted(p for p, _ in rungs[1]) == sorted(SURVIVE_RUNG_0)
    assert sorted(p for p, _ in rungs[2]) == sorted(SURVIVE_RUNG_1)
    # each rung from scratch with the schedule of its length: warmup 2 of 20 epochs scaled to 0.5 and 1
    assert {(e, w) for _, e, w in schedules} == {(5, 0.5), (10, 1.0), (20, 2)}
    final = read_result(result_path(tmp_path, f"digits/{BACKBONE}/linear/frac0.1_seed0_trainval"))
    assert (final["selected_lr"], final["selected_weight_decay"]) == (0.5, 0.001)  # 80 > 79 at 20 epochs
    assert "successive halving" in final["selection"]["protocol"]
    budget = pd.read_csv(tmp_path / "budget.csv").iloc[0]
    # 6 x 5 + 3 x 10 + 2 x 20 epochs = 100, against the full search's 6 x 20 = 120
    assert (budget["search"], budget["search_runs"], budget["search_epochs"]) == ("halving", 11, 100)
    assert budget["search_images"] == 100 * 100 and budget["points"] == 6
    assert len(training.trained) == 11 + 1


def test_the_last_rung_is_the_full_search_s_own_runs(tmp_path, monkeypatch):
    """Full search first, then halving on the same folder: the halving's last rung trains nothing new, and the two
    choose differently here because the full search's best point starts slow."""
    training, _ = fake(monkeypatch)
    search(tmp_path, halving=False)
    full = read_result(result_path(tmp_path, f"digits/{BACKBONE}/linear/frac0.1_seed0_trainval"))
    assert (full["selected_lr"], full["selected_weight_decay"]) == (0.1, 0.0)
    training.trained.clear()
    search(tmp_path, halving=True)
    assert all("_e5" in run or "_e10" in run or run.endswith("_trainval") for run in training.trained)
    assert len([run for run in training.trained if not run.endswith("_trainval")]) == 6 + 3
