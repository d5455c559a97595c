"""OPTIONS grids (ablation sweeps): the syntax, every point checked against the method's options before any run, the
options in each run's name (no TAG; two values never share a file) and record, the search over option cells, W&B
sweeps, and the report's ablation figures (kept out of the fraction curves)."""

from __future__ import annotations

import argparse
import io
import re

import pandas as pd
import pytest
import yaml

from backbones import create_backbone
from benchmark.analysis import ablations, outputs
from benchmark.core.cli import one_option_point, option_grid
from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.store import atomic_write_json, read_result, result_path
from benchmark.grid import grid_spec, main, parse_args
from benchmark.run import config_from_args
from benchmark.sweeps.runner import GridRunner, run_grid
from benchmark.sweeps.search import run_search
from benchmark.sweeps.spec import GridSpec, describe
from tests.helpers.runs import FakeTraining, make_dry_run

BACKBONE = "vit_embedded_p7_28"


def test_syntax_keys_apart_by_semicolons_values_by_commas_every_combination():
    assert option_grid("prompt_length=1,5,10") == [{"prompt_length": 1}, {"prompt_length": 5}, {"prompt_length": 10}]
    assert option_grid(" prompt_length = 1, 5 ; prompt-dropout=0,0.1;") == [
        {"prompt_length": 1, "prompt_dropout": 0}, {"prompt_length": 1, "prompt_dropout": 0.1},
        {"prompt_length": 5, "prompt_dropout": 0}, {"prompt_length": 5, "prompt_dropout": 0.1}]
    assert option_grid("prompt_layers=1,1-6,7-12,1+3") == [{"prompt_layers": v} for v in (1, "1-6", "7-12", "1+3")]
    assert option_grid("location=pad;prompt_length=null") == [{"location": "pad", "prompt_length": None}]
    for bad, message in (("prompt_length", "must look like key=v1,v2"), ("a=1;a=2", "names 'a' twice"),
                         ("a=1,1.0", "lists a value twice"), ("a=", "has no value"), (" ; ", "is empty")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            option_grid(bad)
    assert one_option_point("prompt_length=5;prompt_dropout=0") == {"prompt_length": 5, "prompt_dropout": 0}
    with pytest.raises(argparse.ArgumentTypeError, match="gives 2 runs; one run takes one value per key"):
        one_option_point("prompt_length=1,5")


def test_options_name_the_run_and_override_the_recipe():
    cfg = RunConfig(options={"prompt_length": 5, "prompt_dropout": 0.1}).resolved()
    assert cfg.run_id() == f"digits/{BACKBONE}/vpt_deep/frac0.1_seed0_prompt_dropout=0.1_prompt_length=5"
    assert cfg.method_options["prompt_length"] == 5  # the quick recipe's 10 is replaced
    assert describe(cfg) == "vpt_deep digits frac=0.1 prompt_dropout=0.1 prompt_length=5 seed=0"
    names = {RunConfig(options={"prompt_dropout": v}).run_id() for v in (0.1, 0.10000001, 0.0, 1e-5)}
    assert len(names) == 4  # floats by repr: close values never share a name
    assert RunConfig(options={"prompt_layers": "1-6"}, tag="t").run_id().endswith("frac0.1_seed0_prompt_layers=1-6_t")
    assert RunConfig().run_id().endswith("frac0.1_seed0")  # no options, the name of before
    with pytest.raises(ConfigError, match=r"\['prompt_length'\] are given by both METHOD_ARGS and OPTIONS"):
        RunConfig(method_options={"prompt_length": 3}, options={"prompt_length": 5})
    assert config_from_args(["--options", "prompt_length=5"]).options == {"prompt_length": 5}


def test_make_grid_options_and_the_grid_of_configs():
    argv = make_dry_run("grid", "OPTIONS=prompt_length=1,5;prompt_dropout=0,0.1", "METHODS=vpt_deep",
                        "DATASETS=digits")
    assert sorted(argv) == ["--datasets=digits", "--methods=vpt_deep",
                            "--options=prompt_length=1,5;prompt_dropout=0,0.1"]
    args, run_args = parse_args([*argv, "--fractions", "0.1,1.0"])
    configs = grid_spec(args, run_args, argv).configs()
    assert len(configs) == 2 * 4 and len({c.resolved().run_id() for c in configs}) == 8
    assert [(c.train_fraction, c.options) for c in configs[:2]] == [
        (0.1, {"prompt_length": 1, "prompt_dropout": 0}), (0.1, {"prompt_length": 1, "prompt_dropout": 0.1})]


@pytest.mark.parametrize(("options", "message"), [
    ("prompt_lenght=1,5", "has no option\\(s\\) \\['prompt_lenght'\\]. Did you mean 'prompt_length'"),
    ("prompt_length=5,0", "prompt_length must be a positive integer"),
    ("prompt_layers=1-3,2-x", "prompt_layers must be block numbers"),
])
def test_every_point_is_checked_before_any_run(tmp_path, monkeypatch, capsys, options, message):
    training = FakeTraining()
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    code = main(["--methods", "vpt_deep", "--fractions", "0.1", "--datasets", "digits", "--options", options,
                 "--results-dir", str(tmp_path)])
    assert code == 2 and training.trained == []
    assert re.search(message, capsys.readouterr().err)


def test_a_grid_trains_each_point_into_its_own_file_and_search_cells_per_point(tmp_path, monkeypatch):
    training = FakeTraining()
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    base = RunConfig(results_dir=str(tmp_path))
    points = option_grid("prompt_length=1,5")
    run_grid(GridSpec(["vpt_deep"], [0.1], [0, 1], ["digits"], base, options=points), out=io.StringIO())
    assert training.trained == [f"digits/{BACKBONE}/vpt_deep/frac0.1_seed{s}_prompt_length={p}"
                                for p in (1, 5) for s in (0, 1)]
    training.trained.clear()
    run_search(GridSpec(["vpt_deep"], [0.1], [0], ["digits"], base, options=points))
    finals = [t for t in training.trained if t.endswith("_trainval")]
    assert finals == [f"digits/{BACKBONE}/vpt_deep/frac0.1_seed0_prompt_length={p}_trainval" for p in (1, 5)]
    assert len(training.trained) == 2 * (3 * 2 + 1)  # per point: 3 lrs x 2 wds of the quick recipe, one final


def test_sweep_config_carries_option_points_back_to_the_run(tmp_path):
    from benchmark.sweep import main as sweep_main

    out = tmp_path / "sweep.yaml"
    assert sweep_main(["--methods", "vpt_deep", "--datasets", "digits", "--fractions", "0.1", "--options",
                       "prompt_length=1,5;prompt_layers=1-2", "--out", str(out)]) == 0
    values = yaml.safe_load(out.read_text())["parameters"]["options"]["values"]
    assert values == ["prompt_length=1;prompt_layers=1-2", "prompt_length=5;prompt_layers=1-2"]
    assert config_from_args([f"--options={values[1]}"]).options == {"prompt_length": 5, "prompt_layers": "1-2"}


def test_an_option_run_records_its_options_and_tuned_params_by_formula(tmp_path):
    base = RunConfig(epochs=1, results_dir=str(tmp_path))
    run_grid(GridSpec(["vpt_deep"], [0.1], [0], ["digits"], base, options=option_grid("prompt_length=3;"
                                                                                         "prompt_layers=2-3")),
             out=io.StringIO())
    width = create_backbone("vit_embedded_p7_28").embed_dim
    result = read_result(result_path(tmp_path, f"digits/{BACKBONE}/vpt_deep/frac0.1_seed0_prompt_layers=2-3_"
                                               "prompt_length=3"))
    assert result["status"] == "ok" and result["options"] == "prompt_layers=2-3;prompt_length=3"
    assert (result["option/prompt_length"], result["option/prompt_layers"]) == (3, "2-3")
    assert result["tuned_params"] == 2 * 3 * width + width * 10 + 10  # 2 blocks x p x D prompts + the head


def write_option_run(results, p, layers, seed, top1) -> None:
    options = f"prompt_layers={layers};prompt_length={p}"
    atomic_write_json(result_path(results, f"digits/{BACKBONE}/vpt_deep/frac0.1_seed{seed}_{options}"), {
        "method": "vpt_deep", "dataset": "digits", "backbone": BACKBONE, "status": "ok", "pretrained": True,
        "train_fraction": 0.1, "shots": None, "seed": seed, "test_top1": top1, "tuned_percent": 0.1 * p,
        "options": options, "option/prompt_length": p, "option/prompt_layers": layers, "config": {"tag": ""}})


def test_report_draws_each_swept_option_and_keeps_option_runs_out_of_fig3(tmp_path):
    top1 = {(1, "1-12", 0): 50.0, (1, "1-12", 1): 54.0, (10, "1-12", 0): 60.0, (100, "1-12", 0): 58.0,
            (10, "1", 0): 40.0, (10, "12", 0): 45.0, (10, "1-6", 0): 55.0}
    for (p, layers, seed), value in top1.items():
        write_option_run(tmp_path, p, layers, seed, value)
    atomic_write_json(result_path(tmp_path, f"digits/{BACKBONE}/vpt_deep/frac0.1_seed0"), {
        "method": "vpt_deep", "dataset": "digits", "backbone": BACKBONE, "status": "ok", "pretrained": True,
        "train_fraction": 0.1, "seed": 0, "test_top1": 70.0, "tuned_percent": 1.0, "options": "",
        "config": {"tag": ""}})
    written = outputs.write_report(tmp_path)
    assert {"ablation_prompt_length.png", "ablation_prompt_layers.png", "ablation_data.csv"} <= set(written)
    data = pd.read_csv(written["ablation_data.csv"])
    length = data[(data["option"] == "prompt_length") & (data["variant"] == "prompt_layers=1-12")]
    assert pd.to_numeric(length["value"]).tolist() == [1, 10, 100] and length["mean"].tolist() == [52.0, 60.0, 58.0]
    assert length["n_seeds"].tolist() == [2, 1, 1]
    # the band is the 95% t interval: 52 -+ t(0.975, 1) * s / sqrt(2), s = sqrt(8), t(0.975, 1) = tan(0.475 pi)
    half = 12.706204736174704 * 8 ** 0.5 / 2 ** 0.5
    assert length["ci_low"].iloc[0] == pytest.approx(52 - half)
    assert length["ci_high"].iloc[0] == pytest.approx(52 + half)
    assert length["ci_low"].iloc[1:].isna().all()  # one seed: no interval
    depth = data[(data["option"] == "prompt_layers") & (data["variant"] == "prompt_length=10")]
    assert depth["value"].tolist() == ["1", "1-6", "1-12", "12"]  # by the block numbers they hold
    assert depth["mean"].tolist() == [40.0, 55.0, 60.0, 45.0]
    fig3 = pd.read_csv(written["fig3_data.csv"])
    assert fig3["mean"].tolist() == [70.0]  # the plain run only


def test_value_order_places_layer_texts_by_their_numbers():
    values = ["7-12", "12", "1-12", "1", "1-3", "1+3"]
    assert sorted(values, key=ablations.value_order) == ["1", "1+3", "1-3", "1-12", "7-12", "12"]
    assert sorted([100, 5, 50.0, 1], key=ablations.value_order) == [1, 5, 50.0, 100]
