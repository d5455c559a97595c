"""The halving-vs-full comparison (benchmark/analysis/search_agreement.py) on a hand-made pair of results folders:
every expected number below is worked out by hand from the runs written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark import report
from benchmark.analysis.aggregate import load_summary
from benchmark.analysis.search_agreement import agreement, totals
from benchmark.core.store import read_budgets

CELL = {"backbone": "bb", "train_fraction": 0.1, "shots": None, "options": "", "recipe": "quick"}


def budget(folder: Path, method: str, search: str, lr: float, wd: float, search_epochs: int, **extra) -> None:
    record = {"dataset": "digits", "method": method, **CELL, "search": search, "selected_lr": lr,
              "selected_weight_decay": wd, "search_epochs": search_epochs, "final_epochs": 60} | extra
    path = folder / "budget" / "digits" / "bb" / method / "frac0.1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def run(folder: Path, method: str, seed: int, top1: float, tag: str = "", train_on: str = "trainval",
        val: float = 0.0) -> None:
    record = {"status": "ok", "dataset": "digits", "method": method, "backbone": "bb", "train_fraction": 0.1,
              "seed": seed, "recipe": "quick", "train_on": train_on, "pretrained": True, "test_top1": top1,
              "val_top1": val, "config": {"tag": tag}}
    path = folder / "runs" / "digits" / "bb" / method / f"seed{seed}_{train_on}_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    full, halving = tmp_path / "full", tmp_path / "halving"
    # cell a: both choose lr 0.01 / wd 0; the halving folder holds the same finals (copied runs)
    budget(full, "a", "full", 0.01, 0.0, 120)
    budget(halving, "a", "halving", 0.01, 0.0, 60)
    for folder in (full, halving):
        run(folder, "a", 0, 80.0)
        run(folder, "a", 1, 82.0)
    run(full, "a", 0, 70.0, tag="search_lr0.01_wd0", train_on="train")
    # cell b: full 0.1 / 0, halving 0.5 / 0; the halving folder has seeds 0 and 1 only
    budget(full, "b", "full", 0.1, 0.0, 120)
    budget(halving, "b", "halving", 0.5, 0.0, 60)
    for seed, top1 in enumerate([60.0, 62.0, 64.0]):
        run(full, "b", seed, top1)
    run(halving, "b", 0, 58.0)
    run(halving, "b", 1, 59.0)
    run(full, "b", 0, 55.0, tag="search_lr0.1_wd0", train_on="train", val=61.0)
    run(full, "b", 0, 50.0, tag="search_lr0.5_wd0", train_on="train", val=60.5)
    run(full, "b", 0, 99.0, tag="search_lr0.5_wd0_e5", train_on="train")  # a halving rung: not the point's run
    # cell c: searched by the full search only; cell d: a few-shot cell, which the leaderboard does not have
    budget(full, "c", "full", 0.1, 0.0, 120)
    budget(full, "d", "full", 0.1, 0.0, 120, shots=4)
    budget(halving, "d", "halving", 0.5, 0.0, 60, shots=4)
    return full, halving


def test_each_cell_compares_the_two_choices(folders):
    full, halving = folders
    cells = agreement(read_budgets(full), read_budgets(halving), load_summary(full),
                      load_summary(halving)).set_index("method")
    assert sorted(cells.index) == ["a", "b"]  # c is in one folder only, d is few-shot
    assert bool(cells.loc["a", "same"]) and not bool(cells.loc["b", "same"])
    # b: finals over the common seeds 0, 1: full (60 + 62) / 2 = 61, halving (58 + 59) / 2 = 58.5
    assert cells.loc["b", "final_full"] == pytest.approx(61.0)
    assert cells.loc["b", "final_halving"] == pytest.approx(58.5)
    assert cells.loc["b", "final_lost"] == pytest.approx(2.5)
    # the points: the full search's own runs at lr 0.1 (55) and 0.5 (50), not the rung run at 0.5 (99)
    assert (cells.loc["b", "point_full"], cells.loc["b", "point_halving"]) == (55.0, 50.0)
    assert cells.loc["b", "val_gap"] == pytest.approx(61.0 - 60.5)  # the full search's own val at the two choices
    assert cells.loc["a", "final_lost"] == 0.0 and cells.loc["a", "point_lost"] == 0.0


def test_totals_by_hand(folders):
    full, halving = folders
    t = totals(agreement(read_budgets(full), read_budgets(halving), load_summary(full), load_summary(halving)))
    assert (t["cells"], t["same"], t["same_share"]) == (2, 1, 0.5)
    assert t["val_gap_median"] == pytest.approx(0.5)  # over the differing cell b alone
    assert t["final_lost_mean"] == pytest.approx((0 + 2.5) / 2) and t["final_lost_max"] == pytest.approx(2.5)
    assert t["point_lost_mean"] == pytest.approx((0 + 5) / 2)
    assert t["halving_over_full_search"] == pytest.approx((60 + 60) / (120 + 120))
    assert t["halving_over_finals"] == pytest.approx((60 + 60) / (60 + 60))


def test_weight_decay_alone_makes_a_different_point(tmp_path):
    full, halving = tmp_path / "full", tmp_path / "halving"
    budget(full, "a", "full", 0.01, 0.0, 120)
    budget(halving, "a", "halving", 0.01, 0.001, 60)
    for folder in (full, halving):
        run(folder, "a", 0, 80.0)
    cells = agreement(read_budgets(full), read_budgets(halving), load_summary(full), load_summary(halving))
    assert not cells["same"].any()


def test_the_command_writes_the_table(folders, tmp_path, capsys):
    full, halving = folders
    out = tmp_path / "o"
    assert report.main(["--results-dir", str(full), "--compare-search", str(halving), "--out", str(out)]) == 0
    text = (tmp_path / "o" / "search_agreement.md").read_text()
    assert "1 of 2 cells (50%)" in text and "0.50x the full search's epochs and 1.00x its finals'" in text
    assert (tmp_path / "o" / "search_agreement.csv").is_file()


def test_no_common_cell_is_one_line_and_exit_2(tmp_path, capsys):
    full, halving = tmp_path / "full", tmp_path / "halving"
    budget(full, "a", "full", 0.01, 0.0, 120)
    run(full, "a", 0, 80.0)
    budget(halving, "b", "halving", 0.01, 0.0, 60)
    run(halving, "b", 0, 80.0)
    assert report.main(["--results-dir", str(full), "--compare-search", str(halving)]) == 2
    assert "No search cell has a budget record in both" in capsys.readouterr().err
