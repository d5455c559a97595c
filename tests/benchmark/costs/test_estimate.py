"""The dry run's device-time estimate (benchmark/costs/estimate.py) on a tiny plan with hand-computed numbers: the
images a search point and a final train and evaluate (VTAB-1k's published split sizes), each method's img/s from a
perf csv scaled to Full's on another device, the devices, and the refusals before anything is planned."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmark.core.config import RunConfig
from benchmark.costs.estimate import estimate, method_speeds, run_images
from benchmark.grid import main
from benchmark.sweeps.search import SearchGrid, later_rung_runs, planned_runs
from datamodules.vtab import VTAB_TASKS

ARCH = "vit_base_patch16_224"  # VTAB's default backbone is vit_base_patch16_224.orig_in21k: the csv names the arch
DTD_TEST = 1880  # VTAB-1k dtd's test images


def write_perf(path, rows: dict[str, tuple[float, float, dict]]) -> str:
    """A `make perf` csv: method -> (train img/s, eval img/s, method options), one configuration."""
    pd.DataFrame([{"method": m, "backbone": ARCH, "batch_size": 8, "img_size": 224, "device": "cpu x2",
                   "precision": "32", "compile": False, "checkpointing": False, "method_options": json.dumps(options),
                   "train_img_s": train, "peak_mem_mb": 1.0, "eval_img_s": evaluation}
                  for m, (train, evaluation, options) in rows.items()]).to_csv(path, index=False)
    return str(path)


@pytest.fixture
def perf(tmp_path) -> str:
    # Full at 10 train / 20 eval img/s (the paper recipe's dropout 0.1), linear 4x as fast to train, half to evaluate
    return write_perf(tmp_path / "perf.csv", {"full": (10.0, 20.0, {"dropout": 0.1}), "linear": (40.0, 10.0, {})})


def test_vtab_1k_publishes_its_split_sizes():
    assert sum(task.test_size for task in VTAB_TASKS.values()) == 387904  # the 19 test sets (VPT's Table 7)
    kitti = RunConfig(dataset="vtab/kitti", method="linear", epochs=3, train_fraction=1.0)
    assert run_images(kitti) == {"train_images": 3 * 800, "eval_images": 3 * 200 + 711}


def test_images_of_a_search_point_a_final_a_fraction_and_shots():
    search = RunConfig(dataset="vtab/dtd", method="linear", epochs=2, train_fraction=1.0, tag="search_lr0.1_wd0")
    assert run_images(search) == {"train_images": 800 * 2, "eval_images": 200 * 2 + DTD_TEST}
    final = RunConfig(dataset="vtab/dtd", method="linear", epochs=2, train_fraction=1.0, train_on="trainval")
    assert run_images(final) == {"train_images": 1000 * 2, "eval_images": 200 * 2 + DTD_TEST}
    tenth = RunConfig(dataset="vtab/dtd", method="linear", epochs=2, train_fraction=0.1)
    assert run_images(tenth)["train_images"] == 80 * 2
    assert run_images(RunConfig(dataset="vtab/dtd", method="linear", epochs=1, shots=2))["train_images"] == 2 * 47
    assert run_images(RunConfig(dataset="cub", method="linear")) is None  # no published sizes (its files decide)


def test_speeds_scale_full_given_by_the_csv_ratios_and_count_an_unmeasured_method_at_full(perf):
    speeds, missing, _ = method_speeds(perf, f"{ARCH}.orig_in21k", ["linear", "bias"], 100.0, 400.0)
    assert speeds.loc["linear"].tolist() == [400.0, 200.0]  # train 100 / step_vs_full 0.25; eval 400 x 0.5
    assert speeds.loc["full"].tolist() == speeds.loc["bias"].tolist() == [100.0, 400.0] and missing == ["bias"]
    plain, _, _ = method_speeds(perf, ARCH, ["linear"])
    assert plain.loc["linear"].tolist() == [40.0, 10.0]  # no device given: the csv's own img/s


def test_estimate_of_a_tiny_plan_by_hand(perf):
    plan = [RunConfig(dataset="vtab/dtd", method="linear", epochs=2, train_fraction=1.0, tag="search_lr0.1_wd0"),
            RunConfig(dataset="vtab/dtd", method="full", epochs=2, train_fraction=1.0, train_on="trainval", seed=1),
            RunConfig(dataset="cub", method="linear")]
    speeds, _, _ = method_speeds(perf, ARCH, ["linear"], 100.0, 400.0)
    table, unknown = estimate(plan, speeds, devices=2)
    eval_images = 200 * 2 + DTD_TEST
    search = (1600 / 400 / 3600 / 2, eval_images / 200 / 3600 / 2)  # linear: 400 train, 200 eval img/s
    finals = (2000 / 100 / 3600 / 2, eval_images / 400 / 3600 / 2)  # full: 100 train, 400 eval img/s
    assert table.loc["search", ["runs", "train_images", "eval_images"]].tolist() == [1, 1600, eval_images]
    assert table.loc["search", ["train_hours", "eval_hours"]].tolist() == pytest.approx(search)
    assert table.loc["finals", ["train_hours", "eval_hours"]].tolist() == pytest.approx(finals)
    assert table.loc["total", "hours"] == pytest.approx(sum(search) + sum(finals))
    assert table.loc["total", "train_images"] == 3600 and unknown == ["cub"]


def test_dry_run_prints_the_estimate_and_trains_nothing(tmp_path, capsys, perf):
    args = ["--methods", "linear", "--fractions", "1", "--seeds", "0,1", "--datasets", "vtab/dtd,vtab/kitti",
            "--epochs", "2", "--warmup-epochs", "0", "--results-dir", str(tmp_path / "r"), "--dry-run", "--perf", perf,
            "--full-train-img-s", "100", "--estimate-devices", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Estimated device time on 4 devices (Full train 100 img/s scaled" in out
    # 4 finals-less runs (a plain grid: no search tag): 2 tasks x 2 seeds, 1600 training images each
    total = next(line for line in out.splitlines() if line.strip().startswith("finals"))
    assert "4 runs" in total and "0.01M images" in total and not (tmp_path / "r" / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--full-train-img-s", "100"], "give PERF=<perf.csv> too"),
    (["--estimate-devices", "8"], "add DRY_RUN=1"),
    (["--dry-run", "--perf", "absent.csv"], "PERF=absent.csv is no file"),
    (["--dry-run", "--perf", "PERF", "--full-eval-img-s", "-1"], "FULL_EVAL_IMG_S must be a positive img/s"),
])
def test_bad_estimate_inputs_are_refused_in_one_line(tmp_path, capsys, perf, args, message):
    args = [perf if a == "PERF" else a for a in args]
    assert main(["--methods", "linear", "--datasets", "vtab/dtd", "--results-dir", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "r" / "runs").exists()


def test_a_csv_without_full_on_the_backbone_names_the_measurement(tmp_path, capsys):
    perf = write_perf(tmp_path / "perf.csv", {"linear": (40.0, 10.0, {})})
    assert main(["--methods", "linear", "--datasets", "vtab/dtd", "--results-dir", str(tmp_path / "r"),
                 "--dry-run", "--perf", perf]) == 2
    assert "make perf BACKBONE=vit_base_patch16_224 METHODS=full" in capsys.readouterr().err


def test_a_halving_search_counts_its_later_rungs(perf):
    """6 points of an 8-epoch recipe: a rung of 6 points x 2 epochs, named before it trains, then 2 points x 6
    epochs, chosen by it: stand-ins at the rung's epochs (benchmark/sweeps/halving.py)."""
    cell = RunConfig(dataset="vtab/dtd", method="linear", epochs=8, warmup_epochs=0, train_fraction=1.0)
    grid = SearchGrid.equal_budget(None, None, halving=True, widen=0)
    later = later_rung_runs(cell, [0], grid)
    assert [(cfg.epochs, cfg.tag.startswith("search_")) for cfg in later] == [(6, True), (6, True)]
    assert later_rung_runs(cell, [0], SearchGrid.equal_budget(None, None, widen=0)) == []  # a full search names all
    first, _ = planned_runs(cell, [0], grid)
    speeds, _, _ = method_speeds(perf, ARCH, ["linear"])
    table, _ = estimate(first + later, speeds)
    assert table.loc["search", ["runs", "train_images"]].tolist() == [8, 800 * (6 * 2 + 2 * 6)]
    assert table.loc["finals", ["runs", "train_images"]].tolist() == [1, 1000 * 8]
