"""SEARCH=halving (benchmark/sweeps/halving.py) on a fake trainer with known val curves: the rungs' sizes and epochs
(hand-computed from the rule: a third kept per rung, 3 finals' epochs shared equally by the rungs), which points
survive each rung, each rung run's schedule, and what it costs against the full search."""

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
# linear on the quick recipe: lr 0.5 (x 0.2, 1, 5), 20 epochs, warmup 2; 6 points, budget 3 x 20 = 60 epochs in
# 2 rungs (ceil(log3 6) = 2) of 30: 6 points x 60 // (2 x 6) = 5 epochs, the best ceil(6 / 3) = 2 x 60 // (2 x 2) = 15.
# val top-1 of each (lr, wd) after 5 and 15 epochs (rungs 0 and 1) and 20 (the full search). (0.1, 0) starts slowest
# and ends best: the full search picks it; halving drops it at the first rung.
VAL = {(0.1, 0.001): {5: 50, 15: 0, 20: 0}, (0.1, 0.0): {5: 52, 15: 0, 20: 85},
       (0.5, 0.001): {5: 60, 15: 40, 20: 80}, (0.5, 0.0): {5: 58, 15: 0, 20: 79},
       (2.5, 0.001): {5: 40, 15: 0, 20: 0}, (2.5, 0.0): {5: 61, 15: 45, 20: 0}}
SURVIVE_RUNG_0 = [(0.5, 0.001), (2.5, 0.0)]  # 61, 60 at 5 epochs: the best third of 6, rounded up
# at 15 epochs 45 > 40: (2.5, 0) is the choice, though (0.5, 0) scored 58 at 5 epochs (a dropped point's earlier
# rung does not compete with the last one)
CHOICE = (2.5, 0.0)


@pytest.mark.parametrize("n, epochs, expected", [
    # (epochs, points, keep) per rung; budget B = 3E, R = ceil(log3 n) rungs, floor(B / (R n_r)) epochs, <= E
    (6, 20, [(5, 6, 2), (15, 2, 1)]),  # 30 + 30 = 60 = 3E
    (2, 20, [(20, 2, 1)]),  # one rung: 60 // 2 = 30 capped at E: the full search
    (3, 20, [(20, 3, 1)]),  # 60 // 3 = 20: the full search
    (4, 20, [(7, 4, 2), (15, 2, 1)]),  # 60 // 8 = 7, 60 // 4 = 15: 28 + 30 = 58
    (9, 40, [(6, 9, 3), (20, 3, 1)]),  # 120 // 18 = 6, 120 // 6 = 20: 54 + 60 = 114
    (10, 20, [(2, 10, 4), (5, 4, 2), (10, 2, 1)]),  # 10 -> 4 -> 2 -> 1: 60 // 30, 60 // 12, 60 // 6: 20 x 3 = 60
    (40, 100, [(1, 40, 14), (5, 14, 5), (15, 5, 2), (37, 2, 1)]),  # the paper grid: 300 // 160, 300 // 56, 300 // 20,
    # 300 // 8: 40 + 70 + 75 + 74 = 259 <= 300
    (6, 2, [(1, 6, 2), (1, 2, 1)]),  # B = 6 < 2 x 6: at least one epoch, 8 epochs (the one case over B)
])
def test_rungs_keep_a_third_within_three_finals_epochs(n, epochs, expected):
    assert [(r.epochs, r.points, r.keep) for r in halving_rungs(n, epochs)] == expected


@pytest.mark.parametrize("n, base, epochs, expected", [
    # the base grid's rungs (count, epochs), its own points: a third kept per rung (rounded up), the last keeps one
    (8, 6, 20, [(5, 8, 3), (15, 3, 1)]),  # 6 -> 2 -> 1 gave 5 and 15 epochs; 8 -> 3 -> 1
    (10, 6, 20, [(5, 10, 4), (15, 4, 1)]),  # two widenings: still the base's two rungs, not 10's three
    (4, 3, 20, [(20, 4, 1)]),  # a base of one rung (3 points: the full search) stays one rung of E epochs
    (6, 6, 20, [(5, 6, 2), (15, 2, 1)]),  # not widened: the plain rule
])
def test_a_widened_cell_keeps_its_base_grids_rungs(n, base, epochs, expected):
    assert [(r.epochs, r.points, r.keep) for r in halving_rungs(n, epochs, base)] == expected


@pytest.mark.parametrize("n, epochs", [(6, 20), (6, 4), (9, 40), (40, 100), (13, 70), (100, 500), (5, 1000)])
def test_a_search_costs_no_more_than_three_finals(n, epochs):
    """Whenever 3E affords every first-rung point an epoch (3E >= R x n), the rungs' epochs sum to at most 3E."""
    assert sum(r.points * r.epochs for r in halving_rungs(n, epochs)) <= 3 * epochs


@pytest.mark.parametrize("n, epochs", [(1, 20), (0, 20), (6, 0)])
def test_too_few_points_or_epochs_are_refused_in_one_line(n, epochs):
    with pytest.raises(ValueError, match=r"^successive halving needs >= 2 points and >= 1 epoch.*SEARCH_LRS=[^\n]*$"):
        halving_rungs(n, epochs)


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


def test_halving_keeps_the_best_third_of_each_rung(tmp_path, monkeypatch):
    training, schedules = fake(monkeypatch)
    search(tmp_path, halving=True)
    rungs = [[(p, e) for p, e, _ in schedules if e == epochs] for epochs in (5, 15)]
    assert [p for p, _ in rungs[0]] == list(VAL)  # every point, lr-major
    assert sorted(p for p, _ in rungs[1]) == sorted(SURVIVE_RUNG_0)
    # each rung from scratch with the schedule of its length: warmup 2 of 20 epochs scaled to 0.5 and 1.5; no point
    # trains the full 20 epochs on train
    assert {(e, w) for _, e, w in schedules} == {(5, 0.5), (15, 1.5)}
    final = read_result(result_path(tmp_path, f"digits/{BACKBONE}/linear/frac0.1_seed0_trainval"))
    assert (final["selected_lr"], final["selected_weight_decay"]) == CHOICE
    assert "successive halving" in final["selection"]["protocol"]
    budget = pd.read_csv(tmp_path / "budget.csv").iloc[0]
    # 6 x 5 + 2 x 15 epochs = 60 = 3 finals' epochs, against the full search's 6 x 20 = 120
    assert (budget["search"], budget["search_runs"], budget["search_epochs"]) == ("halving", 8, 60)
    assert budget["search_images"] == 60 * 100 and budget["points"] == 6 and budget["rungs"] == "6x5,2x15"
    assert len(training.trained) == 8 + 1


def test_halving_and_the_full_search_share_no_runs_and_may_choose_differently(tmp_path, monkeypatch):
    """Full search first, then halving on the same folder: every rung run is new (none is 20 epochs), and the two
    choose differently here because the full search's best point starts slow."""
    training, _ = fake(monkeypatch)
    search(tmp_path, halving=False)
    full = read_result(result_path(tmp_path, f"digits/{BACKBONE}/linear/frac0.1_seed0_trainval"))
    assert (full["selected_lr"], full["selected_weight_decay"]) == (0.1, 0.0)
    training.trained.clear()
    search(tmp_path, halving=True)
    search_runs = [run for run in training.trained if not run.endswith("_trainval")]
    assert len(search_runs) == 6 + 2 and all(run.endswith(("_e5", "_e15")) for run in search_runs)
    final = read_result(result_path(tmp_path, f"digits/{BACKBONE}/linear/frac0.1_seed0_trainval"))
    assert (final["selected_lr"], final["selected_weight_decay"]) == CHOICE  # the stale final retrained


# A widened halving cell, lrs 0.1, 0.5, 2.5 (x wd 0.001, 0) then 0.02 below the lowest edge. val top-1 at 5 and 15
# epochs. First halving: (0.1, 0.001) 65 and (0.5, 0.001) 60 survive rung 0; at 15 epochs (0.1, 0.001) wins (80): the
# lowest lr, an edge, so 0.02 is added. Again over 8 points with the base's rungs (5 epochs keep 3, 15 keep 1):
# (0.02, 0) 70, (0.1, 0.001) 65, (0.5, 0.001) 60 survive; at 15 epochs (0.02, 0) wins (85).
WIDENED_VAL = {(0.02, 0.001): {5: 30}, (0.02, 0.0): {5: 70, 15: 85}, (0.1, 0.001): {5: 65, 15: 80},
               (0.1, 0.0): {5: 50}, (0.5, 0.001): {5: 60, 15: 70}, (0.5, 0.0): {5: 40}, (2.5, 0.001): {5: 20},
               (2.5, 0.0): {5: 10}}


def test_a_widened_halving_reuses_its_first_halvings_runs(tmp_path, monkeypatch):
    trained = []

    def outcome(cfg):
        cost = {"epochs": cfg.epochs, "n_train": 100, "wall_seconds": 1.0}
        if cfg.train_on == "trainval":
            return cost | {"status": "ok", "val_top1": 0.0, "test_top1": 60.0}
        trained.append((point(cfg), cfg.epochs))
        return cost | {"status": "ok", "val_top1": WIDENED_VAL[point(cfg)][cfg.epochs], "test_top1": 0.0}

    monkeypatch.setattr(GridRunner, "train", staticmethod(FakeTraining(outcome)))
    spec = GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(results_dir=str(tmp_path), feature_cache=False))
    run_search(spec, SearchGrid((0.1, 0.5, 2.5), (0.001, 0.0), halving=True, widen=1), out=io.StringIO())
    first = [(p, 5) for p in WIDENED_VAL if p[0] != 0.02] + [((0.1, 0.001), 15), ((0.5, 0.001), 15)]
    # after widening only the new lr's two points at 5 epochs and the one new survivor at 15 train
    assert trained == first + [((0.02, 0.001), 5), ((0.02, 0.0), 5), ((0.02, 0.0), 15)]
    final = read_result(result_path(tmp_path, f"digits/{BACKBONE}/linear/frac0.1_seed0_trainval"))
    assert (final["selected_lr"], final["selected_weight_decay"]) == (0.02, 0.0)
    budget = pd.read_csv(tmp_path / "budget.csv").iloc[0]
    # 6 x 5 + 2 x 15 + 2 x 5 + 1 x 15 = 85 epochs in 11 runs (rungs computed afresh for 8 points: 114 in 19)
    assert (budget["search_runs"], budget["search_epochs"], budget["rungs"]) == (11, 85, "8x5,3x15")
    assert (budget["points"], budget["widenings"]) == (8, 1)
