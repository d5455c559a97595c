"""Faults lose nothing: a killed run leaves a complete result or none, a NaN loss is a recorded failure (issue 5)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmark.core.config import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, REPO_ROOT, RunConfig
from benchmark.core.pipeline import run
from benchmark.core.store import atomic_write_text, load_runs, read_result
from benchmark.run import main
from tests.helpers.data import register_nan_digits

NAN_DIGITS = register_nan_digits()  # the digits with a NaN training image (tests/helpers/data.py)


def store_files(results) -> list:
    runs = results / "runs"
    return sorted(p for p in runs.rglob("*") if p.is_file()) if runs.exists() else []


@pytest.mark.slow  # a fresh Python process (torch import) per case
def test_killed_run_leaves_no_partial_result_and_a_rerun_completes(tmp_path):
    """SIGKILL mid-training (no handler can run): the store holds no result and no temp file; the dead run's claim
    stays behind and the rerun takes it over at once (its pid is gone); rerun -> valid."""
    results = tmp_path / "results"
    args = ["--method", "vpt_deep", "--fraction", "0.1", "--epochs", "500", "--results-dir", str(results)]
    stderr = open(tmp_path / "stderr.txt", "w")  # Lightning's progress bar: a file, so no pipe fills up
    child = subprocess.Popen([sys.executable, "-m", "benchmark.run", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        for line in child.stdout:  # on_fit_start prints the parameter line: training starts now
            if "trainable params" in line or time.monotonic() > deadline:
                break
        run_logs = results / "logs" / "digits" / "vit_embedded_p7_28" / "vpt_deep" / "frac0.1_seed0"
        metrics = lambda: list(run_logs.glob(f"attempt-*-{child.pid}/metrics.csv"))  # this attempt's own folder
        while not metrics() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the first epoch's metrics are on disk: the run is mid-training
        assert child.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert metrics()  # it was killed after training had started
    claim = results / "claims" / "digits" / "vit_embedded_p7_28" / "vpt_deep" / "frac0.1_seed0.lock"
    assert claim.is_file()  # no handler ran: the claim names a dead process
    assert store_files(results) == []  # no result, no partial file, no leftover temp file
    assert load_runs(results).empty

    result = run(RunConfig(method="vpt_deep", train_fraction=0.1, epochs=1, results_dir=str(results)))
    [path] = store_files(results)
    assert path.name == "frac0.1_seed0.json" and read_result(path) == json.loads(json.dumps(result, default=str))
    assert read_result(path)["status"] == "ok"
    assert not claim.exists()  # taken over, then let go


def test_nan_loss_stops_the_run_and_records_failed(tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--method", "linear", "--dataset", NAN_DIGITS, "--fraction", "1", "--epochs", "5", "--recipe", "quick",
            "--backbone", EMBEDDED_BACKBONE, "--weights", str(EMBEDDED_WEIGHTS), "--results-dir", str(results)]
    assert main(argv) == 1
    assert "FAILED linear on test_digits_nan" in capsys.readouterr().err
    [path] = store_files(results)
    result = read_result(path)
    assert result["status"] == "failed"
    assert re.match(r"NonFiniteLossError: non-finite training loss in epoch 0, batch(es \d+-\d+| \d+) ",
                    result["error"])
    assert "lower LR" in result["error"]
    assert result["config"]["epochs"] == 5 and "git_commit" in result and "torch" in result["versions"]
    logged = "".join(path.read_text() for path in (results / "logs").rglob("metrics.csv"))
    assert "val/acc" not in logged  # stopped inside the first of 5 epochs: no epoch ever finished
    summary = load_runs(results)
    assert list(summary["status"]) == ["failed"]  # the summary shows it; a grid would move on

    # The failed result does not block a rerun (unlike an `ok` one): it is retried and says why.
    assert main(argv) == 1
    assert "the previous attempt failed (NonFiniteLossError" in capsys.readouterr().out


class ScriptedLoss(L.LightningModule):
    """Returns the loss values it is given, one per step (the parameter only gives the optimizer something)."""

    def __init__(self, losses: list[float]):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.losses = losses

    def training_step(self, batch, batch_idx):
        return self.weight * 0.0 + self.losses[batch_idx]  # d loss / d weight = 0: the weight stays finite

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_nan_check_every_n_steps_catches_inf_in_the_window():
    """A window of 4 steps is read back at once; an inf at its second step stops training at its end."""
    from benchmark.core.callbacks import NonFiniteLossError, StopOnNonFiniteLoss

    losses = [1.0, float("inf"), 2.0, 3.0] + [1.0] * 6
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StopOnNonFiniteLoss(check_every_n_steps=4)])
    data = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=1)
    with pytest.raises(NonFiniteLossError, match="in epoch 0, batches 0-3"):
        trainer.fit(ScriptedLoss(losses), data)
    assert trainer.global_step == 4  # stopped at the end of the window, not at the end of the epoch

    clean = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[StopOnNonFiniteLoss(check_every_n_steps=4)])
    clean.fit(ScriptedLoss([1.0] * 10), data)
    assert clean.global_step == 10


def test_failed_write_keeps_the_previous_result(tmp_path):
    """The atomic writer: a write that fails half-way leaves the old file intact and no temp file behind."""
    path = tmp_path / "runs" / "r.json"
    atomic_write_text(path, '{"status": "ok"}\n')
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, '{"status": "half' + "\ud800")  # a lone surrogate cannot be encoded mid-write
    assert path.read_text() == '{"status": "ok"}\n'
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_damaged_result_reads_as_absent_and_is_redone(tmp_path):
    """A result file damaged outside the suite (e.g. a full disk on another tool) is not trusted: it is rerun."""
    results = tmp_path / "results"
    path = results / "runs" / "digits" / "vit_embedded_p7_28" / "linear" / "frac0.1_seed0.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"status": "ok", "test_top1": ')
    assert read_result(path) is None
    assert main(["--method", "linear", "--epochs", "1", "--results-dir", str(results)]) == 0
    assert read_result(path)["status"] == "ok"


def test_existing_result_with_other_settings_is_kept_and_the_difference_named(tmp_path, capsys):
    """`make bench LR=0.1` over a result made with the recipe's lr: nothing runs, and it says the settings differ."""
    from dataclasses import asdict

    from benchmark.core.store import atomic_write_json, result_path
    from benchmark.core.validate import validate_config

    earlier = validate_config(RunConfig(method="linear", train_fraction=0.1, results_dir=str(tmp_path)))
    path = result_path(tmp_path, earlier.run_id())
    atomic_write_json(path, {"status": "ok", "test_top1": 50.0, "config": asdict(earlier)})
    before = path.read_bytes()
    assert main(["--method", "linear", "--fraction", "0.1", "--lr", "0.01", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Result exists, nothing to do" in out and "FORCE=1" in out
    assert f"other settings (lr {earlier.lr!r} -> 0.01)" in out and "TAG=" in out
    assert path.read_bytes() == before


def test_an_error_that_hides_a_stop_lets_the_stop_through_and_records_nothing(tmp_path):
    """A grid's SIGINT landing while Lightning's progress bar starts its thread: the teardown's join raises
    RuntimeError over the stop. That is no failure of the run: the stop goes on, no failed record is written."""
    from benchmark.core.pipeline import record_failure
    from benchmark.core.store import result_path

    cfg = RunConfig(method="linear", epochs=1, results_dir=str(tmp_path)).resolved()
    path = result_path(tmp_path, cfg.run_id())
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot join thread before it is started")  # noqa: B904 — as threading raises it
    except RuntimeError as err:
        hiding = err
    with pytest.raises(KeyboardInterrupt):
        record_failure(cfg, path, 0.0, hiding)
    assert not path.exists()
    plain = RuntimeError("a real failure")  # no stop behind it: recorded as before
    assert record_failure(cfg, path, 0.0, plain)["status"] == "failed" and path.exists()
