"""Suites (`DATASETS=vtab-1k`, `DATASETS=fgvc`: datamodules/suites.py), the dry run that trains nothing, and
shards of a search dealt out by cells."""

from __future__ import annotations

import io
import re
import warnings

import pytest

from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.grid import main
from benchmark.sweeps.runner import GridRunner
from benchmark.sweeps.search import SearchGrid, run_search
from benchmark.sweeps.spec import GridSpec, Shard
from datamodules import SUITES, dataset_group
from tests.helpers.runs import FakeTraining

# VTAB-1k's 19 tasks by group, as the paper's Table 1 lists them (Zhai et al., arXiv:1910.04867)
NATURAL = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"]
SPECIALIZED = ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
STRUCTURED = ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
              "smallnorb_ele"]
FGVC = ["cub", "nabirds", "flowers", "dogs", "cars"]


def vtab(tasks: list[str]) -> list[str]:
    return [f"vtab/{task}" for task in tasks]


def test_suites_expand_to_their_tasks_in_group_order():
    spec = GridSpec(["linear"], [1.0], [0], ["vtab-1k", "fgvc"])
    assert spec.datasets == vtab(NATURAL + SPECIALIZED + STRUCTURED) + FGVC
    assert {group: list(names) for group, names in SUITES["vtab-1k"].items()} == {
        "natural": vtab(NATURAL), "specialized": vtab(SPECIALIZED), "structured": vtab(STRUCTURED)}
    assert dataset_group("vtab/kitti") == ("vtab-1k", "structured") and dataset_group("dogs") == ("fgvc", "fgvc")
    assert dataset_group("digits") is None
    # a task named beside its suite is kept once, at its first place
    assert GridSpec(["linear"], [1.0], [0], ["cub", "fgvc"]).datasets == FGVC


@pytest.mark.parametrize("name, hint", [("vtab-1", "Did you mean 'vtab-1k'?"), ("vtab/cifar10", "vtab/cifar")])
def test_an_unknown_suite_or_task_is_refused_with_the_closest_name(tmp_path, capsys, name, hint):
    with pytest.raises(ConfigError, match=re.escape(hint)):
        GridSpec(["linear"], [1.0], [0], [name])
    assert main(["--datasets", name, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Suites: vtab-1k, fgvc" in err and err.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.fixture
def no_training(monkeypatch):
    training = FakeTraining()
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    return training


@pytest.mark.parametrize("search, count", [
    ([], 2 * 2 * 3),  # plain grid: 2 methods x 2 fractions x 3 seeds
    (["--search"], 2 * 2 * (6 + 3)),  # 6 points + 3 finals per cell
    (["--search", "halving"], 2 * 2 * (6 + 2 + 3)),  # rungs of 6 and 2 points + 3 finals
])
def test_dry_run_counts_the_runs_and_trains_nothing(tmp_path, capsys, no_training, search, count):
    args = ["--methods", "linear,bias", "--fractions", "0.1,1", "--seeds", "0,1,2", "--datasets", "digits",
            "--results-dir", str(tmp_path), "--dry-run=1", *search]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"Dry run: {count} runs would start" in out and f"... and {count - 5} more" in out
    # the first five: a plain grid's seeds of one cell; a search's first points (all of seed 0)
    assert len(re.findall(r"^  linear digits frac=0\.1 seed=0", out, re.MULTILINE)) == (5 if search else 1)
    assert no_training.trained == [] and not (tmp_path / "runs").exists()


def test_dry_run_of_the_peft_tuners_prints_no_warning(tmp_path, capsys, no_training):
    """peft's LN-tuning layer asks each norm for Linear-style in/out features it never uses, and warns for every
    nn.LayerNorm ("Unsupported layer type"): filtered at that injection alone, so a leaderboard's dry run is quiet."""
    args = ["--leaderboard", "--methods", "ln_tuning,peft_lora,ia3", "--fractions", "0.1", "--datasets", "digits",
            "--results-dir", str(tmp_path), "--dry-run"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert [str(w.message) for w in seen if "Unsupported layer type" in str(w.message)] == []
    assert "Unsupported layer type" not in capsys.readouterr().err and no_training.trained == []


def test_dry_run_leaves_out_finished_runs(tmp_path, capsys, no_training):
    args = ["--methods", "linear", "--fractions", "0.1", "--seeds", "0,1", "--datasets", "digits",
            "--results-dir", str(tmp_path)]
    assert main([*args, "--seeds", "0"]) == 0
    assert main([*args, "--dry-run"]) == 0
    assert "Dry run: 1 runs would start" in capsys.readouterr().out
    assert len(no_training.trained) == 1


def test_search_shards_deal_out_whole_cells(tmp_path, no_training):
    """Two shards of a search over 2 cells: each cell's points and finals all in one shard, together every cell."""
    spec = GridSpec(["linear", "bias"], [0.1], [0], ["digits"],
                    RunConfig(results_dir=str(tmp_path), feature_cache=False))
    grid = SearchGrid.override(None, None, None)
    cells = spec.cells()
    mine = [Shard(k, 2).select(cells) for k in (0, 1)]
    assert sorted(c.method + str(c.train_fraction) for part in mine for c in part) == sorted(
        c.method + str(c.train_fraction) for c in cells)
    for k in (0, 1):
        no_training.trained.clear()
        run_search(spec, grid, out=io.StringIO(), shard=Shard(k, 2))
        trained_cells = {run.rsplit("_seed", 1)[0] for run in no_training.trained}
        assert trained_cells == {f"digits/vit_embedded_p7_28/{c.method}/frac{c.train_fraction:g}" for c in mine[k]}
        assert len(no_training.trained) == len(mine[k]) * (6 + 1)
