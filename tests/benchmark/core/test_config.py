"""The run config's resolution rules, with expected values written out from the recipe files (benchmark/recipes/):
the paper's lr = base lr * batch / 256, an explicit LR winning, recipe defaults per dataset family, run ids, and how
a recipe file is read (defaults, then the method's entry) and refused when malformed."""

from __future__ import annotations

import pytest

import methods
from benchmark.core.config import (
    EMBEDDED_BACKBONE,
    EMBEDDED_WEIGHTS,
    PAPER_BACKBONE,
    RECIPE_FIELDS,
    RunConfig,
    list_recipes,
    load_recipe,
)
from benchmark.core.errors import ConfigError
from benchmark.sweeps.search import PAPER_FULL_LRS, PAPER_LRS, PAPER_WDS, SearchGrid, final_config, point_config

# The recipe YAML values, copied here by hand (paper.yaml: base lr, batch; quick.yaml: lr as given).
PAPER = {"linear": (0.1, 1024), "vpt_deep": (0.1, 128), "full": (0.001, 128), "lora": (0.005, 128),
         "mlp_k": (0.05, 1024)}
QUICK_LR = {"linear": 0.5, "vpt_deep": 0.5, "full": 0.001, "adapter": 0.01}


@pytest.mark.parametrize("method, expected_lr", [("linear", 0.1 * 1024 / 256), ("vpt_deep", 0.1 * 128 / 256),
                                                 ("full", 0.001 * 128 / 256), ("lora", 0.005 * 128 / 256),
                                                 ("mlp_k", 0.05 * 1024 / 256)])
def test_paper_recipe_scales_the_base_lr_by_batch_over_256(method, expected_lr):
    cfg = RunConfig(method=method, dataset="cub").resolved()
    assert cfg.recipe == "paper" and cfg.batch_size == PAPER[method][1]
    assert cfg.lr == pytest.approx(expected_lr, rel=1e-12)


def test_a_batch_size_given_rescales_the_paper_lr_and_an_explicit_lr_wins():
    assert RunConfig(method="linear", dataset="cub", batch_size=64).resolved().lr == pytest.approx(0.1 * 64 / 256)
    assert RunConfig(method="vpt_deep", dataset="cub", batch_size=512).resolved().lr == pytest.approx(0.2)
    explicit = RunConfig(method="linear", dataset="cub", batch_size=64, lr=0.3).resolved()
    assert explicit.lr == 0.3 and explicit.batch_size == 64  # LR=<x> is the final lr, never rescaled
    assert RunConfig(method="linear", dataset="cub", lr=0.3).resolved().lr == 0.3


@pytest.mark.parametrize("method", sorted(QUICK_LR))
def test_quick_recipe_uses_its_lr_as_given_at_any_batch(method):
    assert RunConfig(method=method, dataset="digits").resolved().lr == QUICK_LR[method]
    resolved = RunConfig(method=method, dataset="digits", batch_size=256 * 4).resolved()
    assert resolved.lr == QUICK_LR[method] and resolved.batch_size == 1024


def test_recipe_and_backbone_defaults_per_dataset_family():
    embedded = RunConfig(method="vpt_deep", dataset="digits").resolved()
    assert (embedded.recipe, embedded.backbone, embedded.weights) == ("quick", EMBEDDED_BACKBONE,
                                                                      str(EMBEDDED_WEIGHTS))
    assert (embedded.optimizer, embedded.weight_decay, embedded.epochs, embedded.warmup_epochs,
            embedded.batch_size) == ("sgd", 0.0, 20, 2, 64)
    assert embedded.method_options == {"prompt_length": 10}
    files = RunConfig(method="vpt_deep", dataset="cub").resolved()
    assert (files.recipe, files.backbone, files.weights) == ("paper", PAPER_BACKBONE, None)
    assert (files.optimizer, files.weight_decay, files.epochs, files.warmup_epochs) == ("sgd", 0.0001, 100, 10)
    assert files.method_options == {}
    assert RunConfig(method="full", dataset="cub").resolved().warmup_epochs == 5
    scratch = RunConfig(dataset="digits", pretrained=False, weights="x.safetensors").resolved()
    assert scratch.weights is None and scratch.backbone == EMBEDDED_BACKBONE


def test_explicit_values_win_over_the_recipe():
    cfg = RunConfig(method="vpt_deep", dataset="digits", optimizer="adamw", weight_decay=0.05, epochs=3,
                    warmup_epochs=0.5, batch_size=8, method_options={"prompt_length": 3}).resolved()
    assert (cfg.optimizer, cfg.weight_decay, cfg.epochs, cfg.warmup_epochs, cfg.batch_size) == ("adamw", 0.05, 3,
                                                                                                 0.5, 8)
    assert cfg.method_options == {"prompt_length": 3} and cfg.lr == 0.5
    assert RunConfig(method="vpt_deep", dataset="digits", recipe="paper").resolved().lr == pytest.approx(0.05)


def test_run_id_names_every_part():
    assert RunConfig(method="linear", dataset="digits", train_fraction=0.1, seed=3).resolved().run_id() == \
        "digits/vit_embedded_p7_28/linear/frac0.1_seed3"
    cfg = RunConfig(method="full", dataset="vtab/dtd", train_fraction=1.0, seed=0, train_on="trainval",
                    pretrained=False, tag="x", backbone="a/b")
    assert cfg.run_id() == "vtab/dtd/a-b/full/frac1_seed0_trainval_scratch_x"


# --- recipe files: defaults, then the method's entry, then the command line ----------------------------------------
MINE = """
defaults:
  optimizer: adamw
  lr: 0.003
  lr_scaling: batch/256
  weight_decay: 0.01
  epochs: 30
  warmup_epochs: 3
  batch_size: 32
  head_init: vpt
  method_options: {prompt_dropout: 0.2}
methods:
  linear:
    optimizer: sgd
    lr: 0.5
    lr_scaling: null
    method_options: null
  vpt_deep:
    epochs: 40
    method_options: {prompt_length: 5}
"""
MINE_DEFAULTS = {"optimizer": "adamw", "lr": 0.003, "lr_scaling": "batch/256", "weight_decay": 0.01, "epochs": 30,
                 "warmup_epochs": 3, "batch_size": 32, "head_init": "vpt", "method_options": {"prompt_dropout": 0.2}}


def test_a_recipe_is_its_defaults_then_the_methods_entry_then_the_command_line(tmp_path, monkeypatch):
    import benchmark.core.config as config

    (tmp_path / "mine.yaml").write_text(MINE)
    monkeypatch.setattr(config, "RECIPES_DIR", tmp_path)
    assert config.list_recipes() == ["mine"]
    linear = {key: value for key, value in MINE_DEFAULTS.items() if key not in ("lr_scaling", "method_options")}
    assert load_recipe("mine", "linear") == {**linear, "optimizer": "sgd", "lr": 0.5}  # null drops a default
    options = {"prompt_dropout": 0.2, "prompt_length": 5}  # method options merge one by one
    assert load_recipe("mine", "vpt_deep") == {**MINE_DEFAULTS, "epochs": 40, "method_options": options}
    assert load_recipe("mine", "bias") == MINE_DEFAULTS  # no entry: the defaults alone
    assert load_recipe(str(tmp_path / "mine.yaml"), "bias") == MINE_DEFAULTS  # RECIPE=<path> reads the same file
    run = RunConfig(method="vpt_deep", dataset="digits", recipe="mine", warmup_epochs=1).resolved()
    assert (run.optimizer, run.epochs, run.warmup_epochs, run.batch_size, run.head_init) == ("adamw", 40, 1, 32, "vpt")
    assert run.lr == pytest.approx(0.003 * 32 / 256) and run.method_options == options


# The shipped recipes' values, written out by hand (they were benchmark/recipes/<recipe>/<method>.yaml before the
# defaults were stated once): the merge must give each method exactly these.
SHIPPED = {
    ("quick", "vpt_deep"): {"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "epochs": 20, "warmup_epochs": 2,
                            "batch_size": 64, "method_options": {"prompt_length": 10}},
    ("quick", "lora"): {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0, "epochs": 20, "warmup_epochs": 2,
                        "batch_size": 64},
    ("quick", "sidetune"): {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0, "epochs": 20, "warmup_epochs": 2,
                            "batch_size": 64, "method_options": {"side_input_size": 64}},
    ("paper", "vpt_deep"): {"optimizer": "sgd", "lr": 0.1, "lr_scaling": "batch/256", "weight_decay": 0.0001,
                            "epochs": 100, "warmup_epochs": 10, "batch_size": 128, "head_init": "vpt"},
    ("paper", "full"): {"optimizer": "adamw", "lr": 0.001, "lr_scaling": "batch/256", "weight_decay": 0.0001,
                        "epochs": 100, "warmup_epochs": 5, "batch_size": 128, "head_init": "vpt",
                        "method_options": {"dropout": 0.1}},
    ("paper", "dora"): {"optimizer": "adamw", "lr": 0.005, "lr_scaling": "batch/256", "weight_decay": 0.0001,
                        "epochs": 100, "warmup_epochs": 10, "batch_size": 128, "head_init": "vpt"},
    ("paper", "ssf"): {"optimizer": "adamw", "lr": 0.005, "weight_decay": 0.00005, "epochs": 100, "warmup_epochs": 10,
                       "batch_size": 64, "head_init": "vpt"},
    ("paper", "adaptformer"): {"optimizer": "sgd", "lr": 0.1, "lr_scaling": "batch/256", "weight_decay": 0.0,
                               "epochs": 100, "warmup_epochs": 20, "batch_size": 128, "head_init": "vpt"},
}


@pytest.mark.parametrize("recipe, method", sorted(SHIPPED))
def test_the_shipped_recipes_give_each_method_its_values(recipe, method):
    values = load_recipe(recipe, method)
    assert values == SHIPPED[recipe, method]
    assert [type(values[k]) for k in sorted(values)] == [type(SHIPPED[recipe, method][k]) for k in sorted(values)]


def test_every_method_has_a_complete_entry_in_the_shipped_recipes():
    for recipe in list_recipes():
        for method in methods.list_methods():
            assert set(load_recipe(recipe, method)) >= set(RECIPE_FIELDS), (recipe, method)


@pytest.mark.parametrize("text, expected", [
    ("defaults: {optimizer: sgd}\nmethods:\n  linear: {lrr: 0.1}\n",
     ["method 'linear'", "unknown key 'lrr'", "Did you mean 'lr'?"]),
    ("defaults: {optimiser: sgd}\n", ["defaults", "unknown key 'optimiser'", "Did you mean 'optimizer'?"]),
    ("default: {optimizer: sgd}\n", ["unknown top-level key 'default'", "`defaults:`", "`methods:`"]),
    ("methods:\n  lnear: {lr: 0.1}\n", ["names 'lnear', which is no method", "Did you mean 'linear'?"]),
    ("methods:\n  linear: 0.1\n", ["method 'linear': must be a mapping of optimizer, lr"]),
    ("methods:\n  linear: {method_options: 5}\n", ["method 'linear': method_options must be a mapping"]),
    ("methods: [linear]\n", ["`methods:` must map method names to entries"]),
    ("- optimizer: sgd\n", ["is a list; a recipe file holds `defaults:`"]),
    ("defaults: {optimizer: sgd\n", ["is not valid YAML: expected ',' or '}'", "line 2, column 1"]),
    ("defaults: {optimizer: sgd, lr: 0.1}\n", ["method 'linear' lacks ['weight_decay', 'epochs'"]),
    ("defaults: {optimizer: sgd, lr: 0.1, lr_scaling: batch/128, weight_decay: 0, epochs: 1, warmup_epochs: 0, "
     "batch_size: 8}\n", ["method 'linear': lr_scaling must be 'batch/256'"]),
])
def test_a_malformed_recipe_file_is_refused_naming_the_file_the_method_and_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_recipe(str(path), "linear")
    assert f"Recipe file {path}" in str(err.value)
    for part in expected:
        assert part in str(err.value)


def test_an_unknown_recipe_name_or_a_missing_file_is_refused():
    with pytest.raises(ValueError, match=r"Unknown recipe 'quik'\. Did you mean 'quick'\? Known recipes: paper, quick"):
        load_recipe("quik", "linear")
    with pytest.raises(ValueError, match="Recipe file nowhere/mine.yaml does not exist"):
        load_recipe("nowhere/mine.yaml", "linear")


# --- the search's grids: base lrs, scaled like the recipe's ---------------------------------------------------
def test_search_points_scale_the_paper_base_lr_by_batch_over_256():
    cell = RunConfig(method="vpt_deep", dataset="cub", train_fraction=0.1)
    point = point_config(cell, 10.0, 0.001, seed=2)
    assert point.lr == pytest.approx(10.0 * 128 / 256) and point.weight_decay == 0.001
    assert (point.seed, point.train_on, point.tag) == (2, "train", "search_lr10_wd0.001")
    final = final_config(cell, 10.0, 0.001, seed=4)
    assert final.lr == pytest.approx(5.0) and (final.seed, final.train_on, final.tag) == (4, "trainval", "")
    assert point_config(RunConfig(method="linear", dataset="cub", batch_size=512), 0.5, 0.0, 0).lr == \
        pytest.approx(1.0)
    quick = point_config(RunConfig(method="linear", dataset="digits"), 2.5, 0.0, 0)
    assert quick.lr == 2.5  # the quick recipe's lrs are final lrs


def test_search_grids_per_recipe():
    lrs, wds = SearchGrid().values(RunConfig(method="vpt_deep", dataset="cub").resolved())
    assert lrs == [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05] == list(PAPER_LRS)
    assert wds == [0.01, 0.001, 0.0001, 0.0] == list(PAPER_WDS)
    assert SearchGrid().values(RunConfig(method="full", dataset="cub").resolved())[0] == list(PAPER_FULL_LRS) == [
        0.001, 0.0005, 0.0001, 0.005]
    # The paper recipe's AdamW methods search the AdamW grid (the SGD grid's 50 x batch/256 is no AdamW lr).
    for method in ("bias", "adapter", "partial_k", "lora"):
        assert SearchGrid().values(RunConfig(method=method, dataset="cub").resolved())[0] == [0.001, 0.0005, 0.0001,
                                                                                             0.005]
    assert SearchGrid().values(RunConfig(method="mlp_k", dataset="cub").resolved())[0] == list(PAPER_LRS)
    # Any other recipe: 0.2x, 1x and 5x its own lr (quick linear: 0.5), weight decays 0.001 and 0.
    assert SearchGrid().values(RunConfig(method="linear", dataset="digits").resolved()) == ([0.1, 0.5, 2.5],
                                                                                         [0.001, 0.0])
    assert SearchGrid().values(RunConfig(method="full", dataset="digits").resolved())[0] == [0.0002, 0.001, 0.005]
    override = SearchGrid.override([0.3], [0.0])
    assert override.values(RunConfig(method="linear", dataset="digits").resolved()) == ([0.3], [0.0])


def test_search_lr_factors_scale_each_recipes_own_lr():
    """SEARCH_LR_FACTORS=0.04,1,25: quick linear (lr 0.5) -> 0.02, 0.5, 12.5 and quick full (0.001) -> 4e-05, 0.001,
    0.025, one list for both; on the paper recipe the base lr (VPT-deep 0.1) x factors, with the paper's wds."""
    factors = SearchGrid.override(None, None, [0.04, 1.0, 25.0])
    assert factors.values(RunConfig(method="linear", dataset="digits").resolved()) == ([0.02, 0.5, 12.5],
                                                                                       [0.001, 0.0])
    assert factors.values(RunConfig(method="full", dataset="digits").resolved())[0] == [4e-05, 0.001, 0.025]
    assert factors.values(RunConfig(method="vpt_deep", dataset="cub").resolved()) == ([0.004, 0.1, 2.5],
                                                                                     list(PAPER_WDS))
    assert SearchGrid.override(None, [0.0], [2.0]).values(
        RunConfig(method="linear", dataset="digits").resolved()) == ([1.0], [0.0])
    with pytest.raises(ConfigError, match="give one of them"):
        SearchGrid.override([0.1], None, [1.0])
    with pytest.raises(ConfigError, match="must be > 0"):
        SearchGrid.override(None, None, [1.0, 0.0])
