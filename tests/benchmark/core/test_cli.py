"""The command line: make variables become flags of the same name, switches take 1/0, lists take commas or
spaces, and method options reach the run (benchmark/core/cli.py and the Makefile)."""

from __future__ import annotations

import argparse

import pytest

from benchmark import grid, params, report
from benchmark.core.cli import add_switch, comma_list, method_options
from benchmark.run import config_from_args
from tests.helpers.runs import make_dry_run


def test_make_bench_variables_reach_the_run_config():
    argv = make_dry_run("bench", "METHOD=linear", "FRACTION=0.2", "DATASET=fashion_heldout", "SEED=3", "WD=0.01",
                        "LR=0.5", "EPOCHS=7", "RESULTS=/tmp/x", "WANDB=1", "FORCE=0", "TAG=t",
                        "METHOD_ARGS=prompt_length=10 prompt_dropout=0")
    cfg = config_from_args(argv)
    assert (cfg.method, cfg.train_fraction, cfg.dataset, cfg.seed, cfg.weight_decay, cfg.lr, cfg.epochs) == \
        ("linear", 0.2, "fashion_heldout", 3, 0.01, 0.5, 7)
    assert (cfg.results_dir, cfg.wandb, cfg.force, cfg.tag) == ("/tmp/x", True, False, "t")
    assert cfg.method_options == {"prompt_length": 10, "prompt_dropout": 0}


def test_make_passes_only_what_was_given_so_python_holds_the_defaults():
    assert make_dry_run("bench") == []
    cfg = config_from_args([])
    assert (cfg.method, cfg.train_fraction, cfg.dataset, cfg.seed, cfg.pretrained) == \
        ("vpt_deep", 0.1, "digits", 0, True)


def test_make_fig3_runs_two_jobs_unless_told_and_reports_the_embedded_figure():
    argv = make_dry_run("fig3", "SEEDS=0,1")
    assert argv == ["--fig3", "--seeds=0,1"]
    assert make_dry_run("fig3", "RESULTS=/tmp/r", "JOBS=1", step=1) == ["--fig3", "--results=/tmp/r"]
    # the grid's results folder is the report's, by either name
    assert make_dry_run("fig3", "RESULTS_DIR=/tmp/r", "SEARCH=1", step=1) == ["--fig3", "--results-dir=/tmp/r"]
    assert make_dry_run("zoo", "RESULTS_DIR=/tmp/r", step=1) == ["--zoo", "--results-dir=/tmp/r"]
    assert make_dry_run("fig3", "JOBS=1") == ["--fig3", "--jobs=1"]
    jobs = lambda *a: grid.default_jobs(argparse.Namespace(zoo=False, leaderboard=False,
                                                           **dict(zip(("jobs", "fig3", "search"), a, strict=True))))
    # a searched Fig. 3 too: two cells at a time
    assert (jobs(None, True, False), jobs(None, True, True), jobs(None, False, False), jobs(3, True, True)) == \
        (2, 2, 1, 3)
    assert make_dry_run("zoo", "SEEDS=0,1") == ["--zoo", "--seeds=0,1"]


def test_switches_take_nothing_one_or_zero():
    p = argparse.ArgumentParser()
    add_switch(p, "--wandb", help="")
    add_switch(p, "--cache", default=True, help="")
    assert [vars(p.parse_args(a)) for a in ([], ["--wandb"], ["--wandb=1", "--cache=0"], ["--wandb=false"])] == [
        {"wandb": False, "cache": True}, {"wandb": True, "cache": True}, {"wandb": True, "cache": False},
        {"wandb": False, "cache": True}]
    with pytest.raises(SystemExit):
        p.parse_args(["--wandb=maybe"])


def test_lists_take_commas_or_spaces_and_name_a_bad_item():
    assert comma_list(float)("0.1, 0.2 0.4,1") == [0.1, 0.2, 0.4, 1.0]
    with pytest.raises(argparse.ArgumentTypeError, match="'0.1,x'"):
        comma_list(float)("0.1,x")
    assert method_options("k=2, rank=4 alpha=null") == [("k", 2), ("rank", 4), ("alpha", None)]


def test_method_arg_after_method_args_wins():
    cfg = config_from_args(["--method-args", "prompt_length=10 prompt_dropout=0.2", "--method-arg", "prompt_length=5"])
    assert cfg.method_options == {"prompt_length": 5, "prompt_dropout": 0.2}


def test_grid_and_report_fig3_defaults_come_from_the_method_registry():
    assert grid.parser().parse_args([]).methods == ["full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"]
    args = report.parser().parse_args(["--fig3", "--datasets", "a,b"])
    assert args.fig3 and args.datasets == ["a", "b"]  # main() replaces them with the embedded Fig. 3's


def test_params_method_options_reach_every_method_with_the_option_or_the_one_named():
    given = method_options("k=2 mlp_k.k=4 rank=16 prompt_length=7")
    assert params.options_for("partial_k", given) == {"k": 2}
    assert params.options_for("mlp_k", given) == {"k": 4}  # the later, named one wins for mlp_k
    assert params.options_for("lora", given) == {"rank": 16}
    assert params.options_for("vpt_deep", given) == {"prompt_length": 7}
    assert params.options_for("linear", given) == {}


def test_every_run_setting_is_one_flag_with_its_declared_name_default_and_check(capsys):
    """RunConfig declares each setting once (benchmark/core/config.py): the run's CLI is generated from it."""
    from dataclasses import fields

    from benchmark.core.config import RunConfig
    from benchmark.run import parser

    dests = {action.dest for action in parser()._actions} - {"help", "method_options_list"}
    assert dests == {f.name for f in fields(RunConfig)}
    assert config_from_args([]) == RunConfig()  # every default is the field's own
    cfg = config_from_args(["--fraction", "0.2", "--results", "/x", "--wd", "0.1", "--scratch", "--no-feature-cache",
                            "--options", "prompt_length=5", "--extra-test", "a=/d", "--backbone-args", "img_size=224",
                            "--optimizer", "sgd", "--batch-size", "8"])
    assert (cfg.train_fraction, cfg.results_dir, cfg.weight_decay, cfg.pretrained, cfg.feature_cache) == \
        (0.2, "/x", 0.1, False, False)
    assert (cfg.options, cfg.extra_test, cfg.backbone_kwargs, cfg.optimizer, cfg.batch_size) == \
        ({"prompt_length": 5}, {"a": "/d"}, {"img_size": 224}, "sgd", 8)
    for bad, says in ((["--fraction", "2"], "FRACTION must be in (0, 1]"), (["--optimizer", "adam"], "invalid choice"),
                      (["--epochs", "x"], "invalid int value: 'x'")):
        with pytest.raises(SystemExit):
            config_from_args(bad)
        assert says in capsys.readouterr().err
