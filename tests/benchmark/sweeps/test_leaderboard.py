"""The leaderboard's equal-budget search (benchmark/sweeps/budget.py) on a fake trainer with known val accuracies: the
same points per method, lrs centred on each recipe lr, the edge widening (its cap and the optimizer's lr limit),
the budget records, the selected recipes and their round trip, and the refusals before anything trains."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
import yaml

import benchmark.run
import methods
from benchmark.core.config import RunConfig, load_recipe
from benchmark.core.errors import ConfigError
from benchmark.core.store import read_result, result_path
from benchmark.grid import main, parse_args
from benchmark.sweeps.budget import budget_table, widen_until_inside, widened_lr
from benchmark.sweeps.runner import GridRunner, run_grid
from benchmark.sweeps.search import SearchGrid, run_search
from benchmark.sweeps.spec import GridSpec
from tests.helpers.runs import FakeTraining

BACKBONE = "vit_embedded_p7_28"
# the quick recipe's lrs (benchmark/recipes/quick.yaml): the grids below are these times 0.2, 1 and 5
LINEAR_LR, LORA_LR = 0.5, 0.01
N_TRAIN, N_TRAINVAL = 100, 120


def point_lr(cfg) -> float:
    return float(cfg.tag.split("_lr")[1].split("_wd")[0])


def fake_leaderboard(monkeypatch, val_of_lr: dict) -> FakeTraining:
    """Search points score `val_of_lr[method](lr, wd)`; each result records epochs and n_train, as a run does."""
    def outcome(cfg):
        cost = {"epochs": cfg.epochs, "n_train": N_TRAINVAL if cfg.train_on == "trainval" else N_TRAIN,
                "wall_seconds": 1.0}
        if cfg.train_on == "trainval":
            return cost | {"status": "ok", "val_top1": 0.0, "test_top1": 50.0 + cfg.seed}
        return cost | {"status": "ok", "val_top1": val_of_lr[cfg.method](point_lr(cfg), cfg.weight_decay),
                       "test_top1": 0.0}

    training = FakeTraining(outcome)
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    return training


def leaderboard(results, methods=("linear", "lora"), seeds=(0, 1), widen=2, **base) -> GridRunner:
    spec = GridSpec(list(methods), [0.1], list(seeds), ["digits"],
                    RunConfig(results_dir=str(results), feature_cache=False, **base))
    return run_search(spec, SearchGrid.equal_budget(None, None, widen=widen), out=io.StringIO())


def peak_at(best: float):
    """A val curve over lr (log scale) peaking at `best`; weight decay 0.001 scores 0.5 below 0."""
    return lambda lr, wd: 80.0 - abs(math.log10(lr / best)) * 10 - (0.5 if wd else 0.0)


def test_every_method_gets_the_same_points_centred_on_its_recipe_lr(tmp_path, monkeypatch):
    training = fake_leaderboard(monkeypatch, {"linear": peak_at(LINEAR_LR), "lora": peak_at(LORA_LR)})
    leaderboard(tmp_path)
    budget = pd.read_csv(tmp_path / "budget.csv").set_index("method")
    assert budget["points"].to_dict() == {"linear": 6, "lora": 6}  # 3 lrs x 2 weight decays each
    assert budget.loc["linear", "lrs"] == "0.1,0.5,2.5" and budget.loc["lora", "lrs"] == "0.002,0.01,0.05"
    assert set(budget["weight_decays"]) == {"0.001,0"}
    assert budget["widenings"].tolist() == [0, 0] and budget["budget_equal"].all()
    # 6 points x the recipe's 20 epochs x 100 images; 2 finals x 20 epochs x 120 images
    assert budget["search_epochs"].tolist() == [120, 120] and budget["search_images"].tolist() == [12_000] * 2
    assert budget["final_epochs"].tolist() == [40, 40] and budget["final_images"].tolist() == [4_800] * 2
    assert budget.loc["lora", "selected_lr"] == LORA_LR and budget.loc["lora", "selected_weight_decay"] == 0.0
    assert budget["selected_lr_edge"].isna().all()  # both choices inside their grids
    assert len(training.trained) == 2 * (6 + 2)


def test_a_choice_at_the_edge_widens_the_grid_and_is_recorded(tmp_path, monkeypatch):
    """linear peaks at 2.5 (the top of 0.1, 0.5, 2.5): one more lr, 12.5, scores lower, so 2.5 lies inside after one
    widening. lora's val keeps rising with lr: 0.05 -> 0.25 -> 1.25, but AdamW takes lrs up to 1 (methods.base
    LR_MAX), so it stops after one widening, still at the edge."""
    training = fake_leaderboard(monkeypatch, {"linear": peak_at(2.5), "lora": lambda lr, wd: 50 + lr})
    leaderboard(tmp_path)
    budget = pd.read_csv(tmp_path / "budget.csv").set_index("method")
    assert budget.loc["linear", "lrs"] == "0.1,0.5,2.5,12.5" and budget.loc["linear", "widened"] == "highest"
    assert budget.loc["linear", "points"] == 8 and budget.loc["linear", "base_points"] == 6
    assert budget.loc["linear", "selected_lr"] == 2.5 and pd.isna(budget.loc["linear", "selected_lr_edge"])
    assert budget.loc["lora", "lrs"] == "0.002,0.01,0.05,0.25" and budget.loc["lora", "widenings"] == 1
    assert budget.loc["lora", "selected_lr_edge"] == "highest"
    assert budget["budget_equal"].all()  # both widened once: 8 points each, an equal budget still
    tags = [run.rsplit("/", 1)[1] for run in training.trained if "/linear/" in run]
    assert tags[6:8] == ["frac0.1_seed0_search_lr12.5_wd0.001", "frac0.1_seed0_search_lr12.5_wd0"]
    final = read_result(result_path(tmp_path, f"digits/{BACKBONE}/linear/frac0.1_seed1_trainval"))
    assert final["lr"] == 2.5 and final["search_points"] == 8


def test_widening_stops_at_its_cap_and_goes_down_at_the_lowest_edge():
    """val falls with lr: the choice stays at the lowest lr; each widening divides by the grid's own step (5)."""
    seen = []

    def choose(lrs):
        seen.append(list(lrs))
        points = [(lr, 0.0, {"val_top1": -lr}) for lr in lrs]
        return points, min(points, key=lambda p: p[0])

    widening = widen_until_inside(choose, [0.1, 0.5, 2.5], cap=2)
    assert seen == [[0.1, 0.5, 2.5], [0.02, 0.1, 0.5, 2.5], [0.004, 0.02, 0.1, 0.5, 2.5]]
    assert widening.widened == ["lowest", "lowest"] and widening.choice[0] == 0.004
    assert widen_until_inside(choose, [0.1, 0.5, 2.5], cap=0).widened == []
    assert widened_lr([0.01, 0.03, 0.1], "highest") == 0.333  # 0.1 * 0.1 / 0.03, 3 significant digits


def test_budget_equal_marks_the_cells_whose_budget_differs_from_their_group():
    rows = [{"dataset": "d", "backbone": "b", "train_fraction": 0.1, "shots": None, "options": "", "method": m,
             "search": "full", "points": p, "epochs": 20} for m, p in (("a", 6), ("b", 6), ("c", 8))]
    rows.append(rows[2] | {"dataset": "other"})  # alone in its group: equal to itself
    assert budget_table(rows)["budget_equal"].tolist() == [True, True, False, True]


def test_selected_recipe_reruns_the_finals_without_the_search(tmp_path, monkeypatch):
    training = fake_leaderboard(monkeypatch, {"linear": peak_at(LINEAR_LR), "lora": peak_at(LORA_LR)})
    leaderboard(tmp_path, epochs=7)
    path = tmp_path / "recipes" / "digits" / BACKBONE / "frac0.1.yaml"
    entries = yaml.safe_load(path.read_text())["methods"]
    assert entries["lora"] == {"optimizer": "adamw", "lr": LORA_LR, "weight_decay": 0.0, "epochs": 7,
                                    "warmup_epochs": 2, "batch_size": 64, "head_init": "pytorch",
                                    "method_options": {}}
    assert load_recipe(str(path), "linear")["lr"] == LINEAR_LR  # a recipe file like benchmark/recipes/*.yaml

    training.trained.clear()
    rerun = GridSpec(["linear", "lora"], [0.1], [0, 5], ["digits"],
                     RunConfig(results_dir=str(tmp_path), recipe=f"selected:{tmp_path}", train_on="trainval",
                               feature_cache=False))
    run_grid(rerun, out=io.StringIO())
    assert training.trained == [f"digits/{BACKBONE}/{m}/frac0.1_seed5_trainval" for m in ("linear", "lora")]
    new = read_result(result_path(tmp_path, f"digits/{BACKBONE}/lora/frac0.1_seed5_trainval"))
    assert (new["lr"], new["weight_decay"], new["train_on"]) == (LORA_LR, 0.0, "trainval")


def test_one_run_takes_its_cells_selected_recipe_as_the_grid_does(tmp_path, monkeypatch):
    fake_leaderboard(monkeypatch, {"linear": peak_at(LINEAR_LR), "lora": peak_at(LORA_LR)})
    leaderboard(tmp_path, epochs=7)
    started = []
    monkeypatch.setattr(benchmark.run, "run", lambda cfg: started.append(cfg) or {"status": "ok"})
    assert benchmark.run.main(["--method", "lora", "--fraction", "0.1", "--seed", "5", "--train-on", "trainval",
                               "--recipe", f"selected:{tmp_path}", "--results-dir", str(tmp_path)]) == 0
    (cfg,) = started
    assert cfg.recipe == str(tmp_path / "recipes" / "digits" / BACKBONE / "frac0.1.yaml")
    resolved = cfg.resolved()
    assert (resolved.lr, resolved.weight_decay, resolved.epochs, resolved.seed) == (LORA_LR, 0.0, 7, 5)
    grid_cell = GridSpec(["lora"], [0.1], [5], ["digits"], RunConfig(recipe=f"selected:{tmp_path}")).configs()[0]
    assert grid_cell.recipe == cfg.recipe  # the grid's own resolution: one owner


@pytest.mark.parametrize("args, missing", [
    (["--fraction", "0.3"], "has no choices for DATASET=digits (frac0.3)"),  # a fraction never searched
    (["--fraction", "0.1", "--method", "bias"], "has no choice for METHOD=bias"),
    (["--fraction", "0.1", "--dataset", "fashion_heldout"], "has no choices for DATASET=fashion_heldout"),
])
def test_one_run_without_a_selected_choice_is_refused_before_weights_load(tmp_path, monkeypatch, capsys, args,
                                                                          missing):
    fake_leaderboard(monkeypatch, {"linear": peak_at(LINEAR_LR), "lora": peak_at(LORA_LR)})
    leaderboard(tmp_path, epochs=7)
    capsys.readouterr()
    monkeypatch.setattr(benchmark.run, "run", lambda cfg: pytest.fail("a run started"))
    argv = ["--method", "lora", *args, "--recipe", f"selected:{tmp_path}", "--results-dir", str(tmp_path)]
    assert benchmark.run.main(argv) == 2
    err = capsys.readouterr().err
    assert missing in err and "run the search first (make leaderboard" in err and err.count("\n") == 1


def test_selected_recipe_of_a_cell_never_searched_is_refused_with_the_fix(tmp_path):
    spec = GridSpec(["linear"], [0.3], [0], ["digits"], RunConfig(results_dir=str(tmp_path),
                                                                  recipe=f"selected:{tmp_path}"))
    with pytest.raises(ConfigError, match="run the search first"):
        spec.cells()


@pytest.mark.parametrize("args, message", [
    (["--search-lr-factors", "1", "--search-wds", "0"], "give at least 2"),
    (["--search-lr-factors", "1,5"], "not centred on the recipe lr"),
    (["--search-lrs", "0.1,1"], "drop SEARCH_LRS="),
    (["--search-widen", "-1"], "SEARCH_WIDEN= is how often"),
])
def test_bad_leaderboard_budget_is_refused_before_training(tmp_path, monkeypatch, capsys, args, message):
    training = fake_leaderboard(monkeypatch, {})
    code = main(["--leaderboard", "--methods", "linear", "--datasets", "digits", "--results-dir", str(tmp_path),
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert training.trained == [] and not (tmp_path / "runs").exists()


def test_a_method_whose_recipe_lacks_an_lr_is_refused_before_training(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "no_lr.yaml"
    recipe.write_text("defaults: {optimizer: sgd, weight_decay: 0, epochs: 2, warmup_epochs: 0, batch_size: 8}\n")
    training = fake_leaderboard(monkeypatch, {})
    code = main(["--leaderboard", "--methods", "linear", "--datasets", "digits", "--recipe", str(recipe),
                 "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "lacks ['lr']" in err and "Fix the recipe file" in err
    assert training.trained == []


def test_leaderboard_defaults_every_method_three_seeds_two_fractions():
    args, _ = parse_args(["--leaderboard=1"])  # as make passes LEADERBOARD=1
    assert (args.methods, args.seeds, args.fractions) == (methods.list_methods(), [0, 1, 2], [0.1, 1.0])
    assert parse_args(["--leaderboard", "--seeds", "4"])[0].seeds == [4]
    assert parse_args(["--leaderboard=0"])[0].seeds == [0]
