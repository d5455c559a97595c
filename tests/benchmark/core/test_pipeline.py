"""One end-to-end run of benchmark.run on the embedded default with a tiny budget."""

from __future__ import annotations

import json

import pytest

from benchmark.core.config import RunConfig
from benchmark.core.pipeline import run
from benchmark.run import main
from tests.helpers.runs import record_tested_model, top1_by_hand

REQUIRED = ["method", "dataset", "backbone", "train_fraction", "seed", "n_train", "num_classes", "tuned_params",
            "total_params", "val_top1", "test_top1", "epochs", "lr", "weight_decay", "batch_size", "wall_seconds",
            "peak_memory_mb", "git_commit", "status", "config"]


def test_run_writes_valid_result_and_split(tmp_path, capsys, monkeypatch):
    seen = record_tested_model(monkeypatch)
    cfg = RunConfig(method="vpt_deep", dataset="digits", train_fraction=0.1, epochs=1, results_dir=str(tmp_path))
    result = run(cfg)
    path = tmp_path / "runs" / "digits" / "vit_embedded_p7_28" / "vpt_deep" / "frac0.1_seed0.json"
    stored = json.loads(path.read_text())
    assert all(key in stored for key in REQUIRED)
    assert stored == json.loads(json.dumps(result, default=str))
    assert stored["status"] == "ok"
    # The reported accuracies are the trained model's, counted by hand over the whole test and val splits (one
    # epoch: the last validation saw the final weights).
    test_top1, n_test = top1_by_hand(seen["model"], seen["datamodule"].test_dataloader())
    val_top1, n_val = top1_by_hand(seen["model"], seen["datamodule"].val_dataloader())
    assert (n_test, n_val) == (600, 200)
    assert stored["test_top1"] == pytest.approx(test_top1, abs=1e-4)
    assert stored["val_top1"] == pytest.approx(val_top1, abs=1e-4)
    assert stored["n_train"] == 99 and stored["num_classes"] == 10 and stored["epochs"] == 1
    assert stored["config"]["method_options"] == {"prompt_length": 10}  # the quick recipe's p
    assert stored["tuned_params"] == 6 * 10 * 128 + 128 * 10 + 10
    split = json.loads((tmp_path / "splits" / "digits" / "vit_embedded_p7_28" / "vpt_deep" /
                        "frac0.1_seed0.json").read_text())
    assert split["n_train"] == 99 and len(split["ids"]) == 99
    assert "trainable params: 8,970 || all params:" in capsys.readouterr().out
    # the CSV logger always runs, into this attempt's own folder, which the result names
    assert stored["log_dir"].startswith("logs/digits/vit_embedded_p7_28/vpt_deep/frac0.1_seed0/attempt-")
    assert "val/acc" in (tmp_path / stored["log_dir"] / "metrics.csv").read_text()


def test_existing_result_is_not_rerun(tmp_path, capsys):
    argv = ["--method", "linear", "--fraction", "0.1", "--epochs", "1", "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    path = next((tmp_path / "runs").rglob("*.json"))
    first = path.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert "Result exists, nothing to do" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == first
    assert main(argv + ["--force"]) == 0
    assert path.stat().st_mtime_ns != first
