"""The one-pass lr x wd search of the linear probe (benchmark/sweeps/heads.py) against separate runs of each point:
same heads, same val and test accuracies, same selected point; the reference is the ordinary single run."""

from __future__ import annotations

import csv
import itertools
import math
import re
from dataclasses import replace

import lightning as L
import pytest
import torch

from benchmark.core.config import RunConfig
from benchmark.core.features import cached_datamodule
from benchmark.core.pipeline import run
from benchmark.core.store import read_result, result_path
from benchmark.sweeps.heads import HeadGrid, can_share_a_pass, train_in_one_pass
from benchmark.sweeps.search import SearchGrid, point_config, run_search, select
from benchmark.sweeps.spec import GridSpec
from methods import OptimConfig
from tests.helpers.data import register_nan_digits
from tests.helpers.training import setup_probe

LRS, WDS = (0.05, 0.5, 1.0), (0.05, 0.0)  # 0.05: enough decay that a decayed bias would show in the weights
EPOCHS = 4


def trainer() -> L.Trainer:
    return L.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)


def separate_run(tmp_path, optimizer: str, lr: float, wd: float) -> dict:
    """One point as its own run: the probe with this lr and wd, trained and tested by the Trainer."""
    model, datamodule = setup_probe()
    model.optim = OptimConfig(optimizer=optimizer, lr=lr, weight_decay=wd, max_epochs=EPOCHS, warmup_epochs=1)
    cached = cached_datamodule(model, datamodule, tmp_path)
    fit = trainer()
    fit.fit(model, datamodule=cached)
    val = float(fit.callback_metrics["val/acc"])
    test = fit.test(model, datamodule=cached, verbose=False)[0]["test/acc"]
    head = model.backbone.head
    return {"val": val, "test": test, "weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}


def assert_same_head(head: torch.nn.Linear, expected: dict) -> None:
    """Equal but for float32 rounding (one wide matmul for all heads instead of one per head), which momentum
    carries along in proportion to the weights' size: measured at ~1e-6 of the largest weight."""
    for name in ("weight", "bias"):
        got, want = getattr(head, name).detach(), expected[name]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def one_pass(tmp_path, optimizer: str, poisoned: int | None = None) -> tuple[HeadGrid, L.Trainer]:
    model, datamodule = setup_probe()
    optim = OptimConfig(optimizer=optimizer, lr=1.0, max_epochs=EPOCHS, warmup_epochs=1)
    grid = HeadGrid(model.backbone.head, list(itertools.product(LRS, WDS)), optim)
    if poisoned is not None:
        with torch.no_grad():
            grid.heads[poisoned].weight[0, 0] = math.nan
    cached = cached_datamodule(model, datamodule, tmp_path)
    fit = trainer()
    fit.fit(grid, datamodule=cached)
    fit.test(grid, datamodule=cached, verbose=False)
    return grid, fit


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_pass_heads_equal_separate_runs_and_select_the_same_point(tmp_path, optimizer):
    """A 3 x 2 grid in one pass: each head's weights, bias, val and test accuracy equal its separate run's, and the
    protocol's rule picks the same point from both."""
    grid, _ = one_pass(tmp_path, optimizer)
    points = list(itertools.product(LRS, WDS))
    separate = {point: separate_run(tmp_path, optimizer, *point) for point in points}
    assert max(r["val"] for r in separate.values()) > 0.5  # the probes learned something
    assert len({round(r["val"], 6) for r in separate.values()}) > 1  # and the grid's points differ
    for n, point in enumerate(points):
        expected = separate[point]
        assert float(grid.val_acc[n]) == pytest.approx(expected["val"], abs=1e-6), point
        assert float(grid.test_acc[n]) == pytest.approx(expected["test"], abs=1e-6), point
        assert_same_head(grid.heads[n], expected)
        assert grid.failure(n) is None
    as_results = lambda acc: [(lr, wd, {"status": "ok", "val_top1": 100 * float(a)})  # noqa: E731
                              for (lr, wd), a in zip(points, acc, strict=True)]
    assert select(as_results(grid.val_acc))[:2] == select(as_results([separate[p]["val"] for p in points]))[:2]


@pytest.mark.parametrize("batch", [8, 7])
def test_a_step_gives_each_head_its_single_runs_logits_and_gradients_bit_for_bit(batch):
    """What keeps every point's training that of its own run even where rounding would compound (large lrs): the
    reference is each head alone through F.linear and mean cross-entropy, as a single run computes it."""
    torch.manual_seed(batch)
    heads = [torch.nn.Linear(32, 3) for _ in range(6)]
    for k, head in enumerate(heads):
        with torch.no_grad():
            head.weight.mul_(10.0 ** k)  # weights from small to large, as the lrs of a grid leave them
    grid = HeadGrid(heads[0], [(0.1, 0.0)] * len(heads), OptimConfig())
    for mine, head in zip(grid.heads, heads, strict=True):
        mine.load_state_dict(head.state_dict())
    features, labels = torch.randn(batch, 32), torch.randint(0, 3, (batch,))
    logits = grid(features)
    grid.head_losses(logits, labels).sum().backward()
    for n, (mine, head) in enumerate(zip(grid.heads, heads, strict=True)):
        alone = torch.nn.functional.linear(features, head.weight, head.bias)
        torch.nn.functional.cross_entropy(alone, labels).backward()
        assert torch.equal(logits[:, n].detach(), alone.detach())
        assert torch.equal(mine.weight.grad, head.weight.grad) and torch.equal(mine.bias.grad, head.bias.grad)


def test_each_head_has_its_own_groups_with_biases_undecayed(tmp_path):
    grid, fit = one_pass(tmp_path, "sgd")
    groups = fit.optimizers[0].param_groups
    for head, (lr, wd) in zip(grid.heads, itertools.product(LRS, WDS), strict=True):
        mine = [g for g in groups if any(p is head.weight or p is head.bias for p in g["params"])]
        assert {g["initial_lr"] for g in mine} == {lr}
        decay = {id(p): g["weight_decay"] for g in mine for p in g["params"]}
        assert decay == {id(head.weight): wd, id(head.bias): 0.0}


def test_a_head_with_a_non_finite_loss_fails_alone(tmp_path):
    """A NaN in one head's weights: that head is recorded as failed at its first step, as its run would stop, and
    every other head still equals its separate run."""
    grid, _ = one_pass(tmp_path, "sgd", poisoned=1)
    error = grid.failure(1)
    assert error is not None and "non-finite training loss in epoch 0, batch 0 " in str(error)
    lr, wd = list(itertools.product(LRS, WDS))[3]
    expected = separate_run(tmp_path, "sgd", lr, wd)
    assert grid.failure(3) is None
    assert float(grid.val_acc[3]) == pytest.approx(expected["val"], abs=1e-6)
    assert_same_head(grid.heads[3], expected)


def test_search_in_one_pass_writes_what_separate_runs_write(tmp_path):
    """The protocol on the embedded default: every point's record (status, val and test top-1, the fields the summary
    and report read) as `benchmark.run` writes it for that point alone, the pass's log holding each head's val
    accuracy, and the same point selected and retrained on train+val."""
    grid = SearchGrid(lrs=(0.1, 0.5, 2.5), weight_decays=(0.01, 0.0))
    cell = RunConfig(method="linear", dataset="digits", train_fraction=0.1, epochs=2)
    results = tmp_path / "one_pass"
    runner = run_search(GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(epochs=2, results_dir=str(results))),
                        grid)
    assert runner.counts == {"ok": 7, "skipped": 0, "failed": 0, "claimed": 0}
    alone, passed = {}, {}
    for lr, wd in itertools.product(grid.lrs, grid.weight_decays):
        cfg = point_config(cell, lr, wd, seed=0)
        alone[lr, wd] = run(replace(cfg, results_dir=str(tmp_path / "alone")))
        passed[lr, wd] = read_result(result_path(results, cfg.resolved().run_id()))
    for point, expected in alone.items():
        got = passed[point]
        assert got["status"] == expected["status"] == "ok"
        assert got["val_top1"] == pytest.approx(expected["val_top1"], abs=1e-4), point  # 1e-6 of an accuracy
        assert got["test_top1"] == pytest.approx(expected["test_top1"], abs=1e-4), point
        assert set(expected) - {"config"} <= set(got)
        same = ("lr", "weight_decay", "n_train", "num_classes", "tuned_params", "total_params", "train_fraction")
        assert {k: got[k] for k in same} == {k: expected[k] for k in same}
        assert got["config"]["tag"] == expected["config"]["tag"] and got["one_pass"]["heads"] == 6
    [log_dir] = {got["log_dir"] for got in passed.values()}  # the pass's attempt folder, recorded in each point
    assert "_search_one_pass/attempt-" in log_dir
    log = results / log_dir / "metrics.csv"
    last = [row for row in csv.DictReader(log.open()) if row.get("val/acc/lr0.5_wd0")][-1]
    for (lr, wd), got in passed.items():
        assert float(last[f"val/acc/lr{lr:g}_wd{wd:g}"]) * 100 == pytest.approx(got["val_top1"], abs=1e-4)

    choice = select([(lr, wd, r) for (lr, wd), r in alone.items()])
    final = read_result(result_path(results, "digits/vit_embedded_p7_28/linear/frac0.1_seed0_trainval"))
    assert (final["selected_lr"], final["selected_weight_decay"]) == choice[:2]
    assert final["train_on"] == "trainval" and final["status"] == "ok"


def test_a_non_finite_loss_in_the_pass_fails_each_point_as_its_run_would(tmp_path):
    """A NaN training image (tests/test_faults.py): every head's loss is NaN from the batch holding it. The pass goes
    on (its returned loss stays finite for the run's NaN callback), each point is recorded failed with the batch where
    its loss turned, the search finds nothing to select and records the cell's final run as failed."""
    from benchmark.core.config import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS

    NAN_DIGITS = register_nan_digits()  # the digits with a NaN training image (tests/helpers/data.py)
    base = RunConfig(backbone=EMBEDDED_BACKBONE, weights=str(EMBEDDED_WEIGHTS), recipe="quick", epochs=1,
                     results_dir=str(tmp_path))
    runner = run_search(GridSpec(["linear"], [1.0], [0], [NAN_DIGITS], base), SearchGrid((0.1, 0.5), (0.0,)))
    assert runner.counts == {"ok": 0, "skipped": 0, "failed": 3, "claimed": 0}
    points = [read_result(p) for p in sorted((tmp_path / "runs").rglob("*_search_lr*.json"))]
    assert len(points) == 2 and all(p["status"] == "failed" and p["one_pass"]["heads"] == 2 for p in points)
    assert all(re.match(r"NonFiniteLossError: non-finite training loss in epoch 0, batch \d+ ", p["error"])
               for p in points)
    [final] = (tmp_path / "runs").rglob("*_trainval.json")
    assert read_result(final)["status"] == "failed"


def test_a_pass_only_where_the_runs_would_train_a_linear_head_on_cached_features(tmp_path):
    cell = RunConfig(method="mlp_k", dataset="digits", train_fraction=0.1, epochs=1, results_dir=str(tmp_path))
    configs = [point_config(cell, lr, 0.0, seed=0) for lr in (0.1, 0.5)]
    assert can_share_a_pass(configs[0].resolved())  # mlp_k trains on cached features...
    assert train_in_one_pass(configs, "search_one_pass") is None  # ...but its head is no single linear layer
    assert not can_share_a_pass(RunConfig(method="linear", feature_cache=False))
    assert not can_share_a_pass(RunConfig(method="vpt_deep"))
    assert not list((tmp_path / "runs").rglob("*.json"))  # nothing recorded: their own runs will be


def test_search_benchmark_times_one_run_and_the_pass(tmp_path):
    """`make perf-search` in small: every mode timed, the ratio to one run computed (no threshold: a benchmark)."""
    from benchmark.costs.search_cost import linear_search_benchmark

    out = tmp_path / "perf_linear_search.csv"
    frame = linear_search_benchmark([0.1], out, repeats=1, epochs=1, separate_repeats=0)
    assert list(frame["mode"]) == ["one run", "one pass, 40 heads"] and list(frame["heads"]) == [1, 40]
    assert frame["vs_one_run"].iloc[0] == 1.0 and (frame["seconds"] > 0).all() and (frame["failed"] == 0).all()
    assert out.is_file()
