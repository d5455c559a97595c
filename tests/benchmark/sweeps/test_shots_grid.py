"""SHOTS end to end: the config field and its checks, the run's name and record, `make grid SHOTS=... SEEDS=...`, and
the report's few-shot figure, kept apart from the fraction curves."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from benchmark.analysis import aggregate, outputs
from benchmark.analysis.aggregate import load_summary
from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.store import atomic_write_json, read_result, result_path
from benchmark.grid import grid_spec, main, parse_args
from benchmark.run import config_from_args
from benchmark.run import main as run_main
from benchmark.sweeps.runner import GridRunner, run_grid
from benchmark.sweeps.spec import GridSpec, describe
from tests.helpers.runs import FakeTraining, make_dry_run

BACKBONE = "vit_embedded_p7_28"


def test_shots_name_the_run_and_exclude_a_fraction():
    cfg = RunConfig(shots="4")
    assert cfg.shots == 4 and cfg.run_id() == "digits/default/vpt_deep/shots4_seed0"
    assert RunConfig(shots=4).resolved().run_id() == f"digits/{BACKBONE}/vpt_deep/shots4_seed0"
    assert describe(RunConfig(shots=4, seed=2)) == "vpt_deep digits shots=4 seed=2"
    with pytest.raises(ConfigError, match=r"SHOTS=4 and FRACTION=0.5 both say how much trains; give one of them"):
        RunConfig(shots=4, train_fraction=0.5)
    for bad in (0, -2, 1.5, "x", True):
        with pytest.raises(ConfigError, match="SHOTS must be a whole number >= 1"):
            RunConfig(shots=bad)


def test_run_command_line_takes_shots_and_refuses_both_in_one_line(capsys):
    assert config_from_args(["--shots", "8"]).shots == 8
    assert run_main(["--shots", "8", "--fraction", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SHOTS=8 and FRACTION=0.5" in err


def test_make_grid_shots_seeds_becomes_a_shots_axis(capsys, monkeypatch):
    training = FakeTraining()
    monkeypatch.setattr(GridRunner, "train", staticmethod(training))
    argv = make_dry_run("grid", "SHOTS=1,2,4,8,16", "SEEDS=0,1,2", "METHODS=linear")
    assert argv == ["--methods=linear", "--seeds=0,1,2", "--shots=1,2,4,8,16"]
    args, run_args = parse_args(argv)
    spec = grid_spec(args, run_args, argv)
    configs = spec.configs()
    assert len(configs) == 2 * 5 * 3  # the two embedded tasks x 5 shot counts x 3 seeds, fractions not swept
    assert [(c.shots, c.seed) for c in configs[:4]] == [(1, 0), (1, 1), (1, 2), (2, 0)]
    assert {c.train_fraction for c in configs} == {0.1}  # the default, which shots leave alone
    assert main(["--shots", "1,2", "--fractions", "0.1", "--methods", "linear"]) == 2
    assert "SHOTS= and FRACTIONS= are two ways" in capsys.readouterr().err and training.trained == []
    with pytest.raises(SystemExit):
        parse_args(["--shots", "1,0"])


def test_sweep_config_sweeps_shots_instead_of_fractions(tmp_path):
    from benchmark.sweep import main as sweep_main

    out = tmp_path / "sweep.yaml"
    assert sweep_main(["--methods", "linear", "--shots", "1,4", "--datasets", "digits", "--out", str(out)]) == 0
    parameters = yaml.safe_load(out.read_text())["parameters"]
    assert parameters["shots"] == {"values": [1, 4]} and "fraction" not in parameters
    assert config_from_args(["--shots=4"]).shots == 4  # what the agent's ${args} becomes


def test_shots_grid_trains_k_per_class_and_records_shots(tmp_path):
    results = tmp_path / "results"
    base = RunConfig(epochs=1, results_dir=str(results))
    runner = run_grid(GridSpec(["linear"], [0.1], [0, 1], ["digits"], base, shots=[1, 2]), out=io.StringIO())
    assert runner.counts["ok"] == 4
    for seed in (0, 1):
        ids = []
        for k in (1, 2):
            name = f"digits/{BACKBONE}/linear/shots{k}_seed{seed}"
            result = read_result(result_path(results, name))
            assert (result["shots"], result["train_fraction"], result["n_train"]) == (k, None, 10 * k)
            split = json.loads((results / "splits" / f"{name}.json").read_text())
            assert np.bincount(split["labels"]).tolist() == [k] * 10 and split["shots"] == k
            ids.append(set(split["ids"]))
        assert ids[0] < ids[1]  # nested across k for each seed


def write_result(results, name: str, **fields) -> dict:
    result = {"method": "linear", "dataset": "digits", "backbone": BACKBONE, "status": "ok", "pretrained": True,
              "train_on": "train", "tuned_percent": 0.1, "val_top1": 0.0, "config": {"tag": ""}} | fields
    atomic_write_json(result_path(results, f"digits/{BACKBONE}/linear/{name}"), result)
    return result


def test_report_draws_shots_apart_from_the_fraction_curves(tmp_path):
    results = tmp_path / "results"
    top1 = {(1, 0): 30.0, (1, 1): 34.0, (2, 0): 41.0, (2, 1): 45.0, (4, 0): 60.0}
    for (k, seed), value in top1.items():
        write_result(results, f"shots{k}_seed{seed}", shots=k, train_fraction=None, seed=seed, test_top1=value)
    write_result(results, "frac0.1_seed0", shots=None, train_fraction=0.1, seed=0, test_top1=70.0)
    write_result(results, "shots4_seed0_trainval", shots=4, train_fraction=None, seed=0, test_top1=62.0,
                 train_on="trainval", selected_lr=0.1)  # SEARCH=1's final run replaces the fixed-recipe one (60)
    write_result(results, "shots1_seed0_prompt_length=5", shots=1, train_fraction=None, seed=0, test_top1=0.0,
                 options="prompt_length=5", **{"option/prompt_length": 5})  # an option grid's: not in the curve
    assert len(aggregate.final_runs(load_summary(results))) == 1  # the fraction run alone
    written = outputs.write_report(results)
    assert written["shots.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shots = pd.read_csv(written["shots_data.csv"]).set_index("shots")
    assert shots["mean"].to_dict() == {1: 32.0, 2: 43.0, 4: 62.0}
    assert shots["std"].to_dict() == pytest.approx({1: 8 ** 0.5, 2: 8 ** 0.5, 4: 0.0})  # sample std of 2 seeds
    assert shots["n_seeds"].to_dict() == {1: 2, 2: 2, 4: 1}
    fig3 = pd.read_csv(written["fig3_data.csv"])  # the fraction curve holds the one fraction run only
    assert fig3["train_fraction"].tolist() == [0.1] and fig3["mean"].tolist() == [70.0]
    only_shots = tmp_path / "only-shots"
    write_result(only_shots, "shots1_seed0", shots=1, train_fraction=None, seed=0, test_top1=1.0)
    assert set(outputs.write_report(only_shots)) == {"skipped.csv", "shots.png", "shots.pdf", "shots_data.csv"}
