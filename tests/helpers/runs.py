"""Running the benchmark from a test: the flags `make -n` passes, a stand-in for training in the grid, the model
and data a run tests, and the command line in one process and in two (DDP on CPU)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import lightning as L
import torch

from benchmark.core.config import REPO_ROOT, RunConfig
from benchmark.core.store import atomic_write_json, result_path


def make_dry_run(*words: str, step: int = 0) -> list[str]:
    """The flags `make -n <target> VAR=value ...` passes to the recipe's `step`-th Python entry point."""
    out = subprocess.run(["make", "-n", "-s", *words], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if "-m benchmark." in ln][step]
    return shlex.split(line.split("||")[0])[3:]  # drop ".venv/bin/python -m benchmark.<entry>"


class FakeTraining:
    """Stands in for `GridRunner.train`: writes the result a run would, from `outcome(resolved config)`, and
    records which runs trained. Keeps these tests to the grid's own decisions (and under a second each)."""

    def __init__(self, outcome=None):
        self.trained: list[str] = []
        self.outcome = outcome or (lambda cfg: {"status": "ok", "val_top1": 50.0, "test_top1": 40.0})

    def __call__(self, cfg: RunConfig, started: float) -> dict:
        resolved = cfg.resolved()
        result = {"method": resolved.method, "dataset": resolved.dataset, "train_fraction": resolved.train_fraction,
                  "seed": resolved.seed, "lr": resolved.lr, "weight_decay": resolved.weight_decay,
                  "train_on": resolved.train_on, "config": {"tag": resolved.tag}} | self.outcome(resolved)
        atomic_write_json(result_path(resolved.results_dir, resolved.run_id()), result)
        self.trained.append(resolved.run_id())
        return result


def record_tested_model(monkeypatch) -> dict:
    """Wraps Trainer.test to keep the model and data a run tests, so a test can count its accuracy by hand."""
    seen, real_test = {}, L.Trainer.test

    def test(self, model=None, *args, **kwargs):
        seen.update(model=model, datamodule=kwargs.get("datamodule"))
        return real_test(self, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", test)
    return seen


def top1_by_hand(model, loader) -> tuple[float, int]:
    """(100 * correct / examples, examples) of the model's argmax over every batch of `loader`."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total, total


def run_cli(results, *args) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-m", "benchmark.run", "--results-dir", str(results), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((results / "runs").rglob("*.json"))
    assert len(runs) == 1, runs
    return json.loads(runs[0].read_text()), done.stdout


def run_both(tmp_path, *args) -> tuple[dict, dict, str]:
    """The same `python -m benchmark.run` in one process and in two (DDP, gloo on CPU): (single, ddp, ddp's stdout)."""
    single, _ = run_cli(tmp_path / "single", *args)
    ddp, out = run_cli(tmp_path / "ddp", *args, "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    return single, ddp, out
