"""The plain loop for the whole-epoch linear probe on cached features reproduces Lightning's fit + test: same
updates, same metrics, the same rows in the same loggers."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from benchmark import probe_loop
from benchmark.callbacks import NonFiniteLossError
from benchmark.core.config import RunConfig
from benchmark.feature_cache import cached_datamodule
from benchmark.run import run
from tests.test_feature_cache import setup_probe

EPOCHS = 4
METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc")


def cached_probe(tmp_path, criterion=None):
    model, datamodule = setup_probe()
    if criterion is not None:
        model.criterion = criterion
    return model, cached_datamodule(model, datamodule, tmp_path / "cache", whole_epochs=True)


def read_rows(logger: CSVLogger) -> list[dict]:
    with open(logger.experiment.metrics_file_path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("closed_form", [True, False])
def test_loop_equals_trainer_fit_and_test(tmp_path, closed_form):
    """Same head, same metrics and the same CSV rows (steps, epochs, columns) as Trainer.fit + Trainer.test on the
    same cached features; with label smoothing (no closed-form gradient) the slices go through autograd."""
    criterion = None if closed_form else torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model, cached = cached_probe(tmp_path, criterion)
    trainer_logger = CSVLogger(tmp_path / "logs", name="trainer", version="")
    trainer = L.Trainer(max_epochs=EPOCHS, logger=trainer_logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=cached)
    expected = {k: float(v) for k, v in trainer.callback_metrics.items()}
    expected |= trainer.test(model, datamodule=cached, verbose=False)[0]
    expected_head = model.backbone.head.weight.detach().clone()

    model, cached = cached_probe(tmp_path, criterion)
    assert probe_loop.can_train_outside_trainer(model, cached, precision=None)
    loop_logger = CSVLogger(tmp_path / "logs", name="loop", version="")
    got = probe_loop.fit_and_test(model, cached, EPOCHS, [loop_logger], progress_bar=False)

    assert expected["val/acc"] > 0.5  # the probe learned something
    for name in METRICS:
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    torch.testing.assert_close(model.backbone.head.weight, expected_head, rtol=1e-5, atol=1e-6)
    trainer_rows, loop_rows = read_rows(trainer_logger), read_rows(loop_logger)
    assert [(r["epoch"], r["step"]) for r in loop_rows] == [(r["epoch"], r["step"]) for r in trainer_rows]
    assert list(loop_rows[0]) == list(trainer_rows[0])  # same columns
    for loop_row, trainer_row in zip(loop_rows, trainer_rows, strict=True):
        for name in METRICS:
            assert (loop_row[name] == "") == (trainer_row[name] == ""), (name, loop_row)
            if loop_row[name]:
                assert float(loop_row[name]) == pytest.approx(float(trainer_row[name]), rel=1e-5, abs=1e-6)


def test_loop_stops_on_a_non_finite_loss(tmp_path):
    model, cached = cached_probe(tmp_path)
    cached.features["train"].tensors[0][0, 0] = math.nan
    threads = torch.get_num_threads()
    with pytest.raises(NonFiniteLossError, match="non-finite training loss in epoch 0, batch 0 "):
        probe_loop.fit_and_test(model, cached, EPOCHS, progress_bar=False)
    assert torch.get_num_threads() == threads  # the head's one-thread setting is undone on the way out


def test_loop_only_where_it_reproduces_the_trainer(tmp_path):
    model, cached = cached_probe(tmp_path)
    assert probe_loop.can_train_outside_trainer(model, cached, "32-true")
    assert not probe_loop.can_train_outside_trainer(model, cached, "bf16-mixed")  # autocast: the Trainer's plugin
    model, datamodule = setup_probe()
    per_minibatch = cached_datamodule(model, datamodule, tmp_path / "cache")  # several processes use these
    assert not probe_loop.can_train_outside_trainer(model, per_minibatch, None)
    assert not probe_loop.can_train_outside_trainer(model, datamodule, None)  # images: no cache


def test_run_writes_the_trainers_log_layout_from_the_loop(tmp_path):
    """A cached run (the loop) and an uncached run (the Trainer, on images) log the same metrics for the same epochs
    and reach the same accuracy. (Their `step` columns differ, as they did under the Trainer: it counts loader
    batches, one per epoch when the epoch is one batch.)"""
    logs = {}
    for cache in (True, False):
        cfg = RunConfig(method="linear", dataset="digits", train_fraction=0.1, epochs=2, feature_cache=cache,
                        results_dir=str(tmp_path / str(cache)))
        result = run(cfg)
        logs[cache] = (result, list(csv.DictReader(next((tmp_path / str(cache) / "logs").rglob("metrics.csv")).open())))
    (cached, cached_rows), (plain, plain_rows) = logs[True], logs[False]
    assert cached["status"] == plain["status"] == "ok"
    assert abs(cached["test_top1"] - plain["test_top1"]) <= 0.2  # one of 600 test images may round differently
    assert [r["epoch"] for r in cached_rows] == [r["epoch"] for r in plain_rows]
    assert list(cached_rows[0]) == list(plain_rows[0])
    assert [[name for name in METRICS if r[name]] for r in cached_rows] == \
        [[name for name in METRICS if r[name]] for r in plain_rows]
