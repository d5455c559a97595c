"""What a run keeps (issue 28 items 1-2 and the core of 3): its trained tensors, test predictions and curves, and
the model rebuilt from its checkpoint scoring the recorded test top-1 exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

import benchmark.core.artifacts as artifacts
from benchmark.core.artifacts import load_checkpoint, load_predictions
from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.pipeline import run
from benchmark.core.rebuild import rebuild, score_test_set


def one_epoch(tmp_path, method: str, **settings) -> dict:
    cfg = RunConfig(method=method, dataset="digits", epochs=1, results_dir=str(tmp_path), **settings)
    result = run(cfg)
    assert result["status"] == "ok"
    return result


@pytest.mark.parametrize("method, settings", [
    ("linear", {"feature_cache": False}), ("vpt_deep", {}), ("adapter", {}), ("lora", {}), ("full", {})])
def test_checkpoint_rebuilds_the_recorded_test_top1(tmp_path, method, settings):
    result = one_epoch(tmp_path, method, **settings)
    path = tmp_path / result["checkpoint"]
    assert path.name.endswith(".safetensors") and path.stat().st_size == result["checkpoint_bytes"]
    tensors, meta = load_checkpoint(path, 10)
    # exactly what trained: the values counted are the result's tuned parameters (Full: the whole model)
    assert sum(t.numel() for name, t in tensors.items() if name not in meta["buffers"]) == result["tuned_params"]
    model, _ = rebuild(path)
    assert set(tensors) == {name for name, p in model.named_parameters() if p.requires_grad} | set(meta["buffers"])
    assert meta["whole_model"] == (method == "full")
    assert meta["method"] == method and meta["num_classes"] == 10 and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["weights"]["kind"] == "file" and len(meta["weights"]["sha256"]) == 64
    assert score_test_set(path) == result["test_top1"]


def test_linear_on_cached_features_rebuilds_on_images(tmp_path):
    """The default linear probe trains and tests on cached features; its rebuilt model reads images."""
    result = one_epoch(tmp_path, "linear")
    assert score_test_set(tmp_path / result["checkpoint"]) == pytest.approx(result["test_top1"], abs=0.5)


def test_predictions_and_curves_and_audit_changes_no_training(tmp_path):
    plain = one_epoch(tmp_path / "a", "vpt_deep")
    result = one_epoch(tmp_path / "b", "vpt_deep", audit=True)
    # AUDIT=1 scores the test set after each epoch without touching training's random state
    assert plain["test_top1"] == result["test_top1"] and plain["curves"]["train_loss"] == result["curves"]["train_loss"]
    assert "test_top1" not in plain["curves"]
    preds = load_predictions(tmp_path / "b" / result["predictions"])
    assert preds["logits"].dtype == np.float16 and preds["logits"].shape == (600, 10)
    assert (tmp_path / "b" / result["predictions"]).stat().st_size == result["predictions_bytes"]
    assert len(preds["ids"]) == 600 and len(set(preds["ids"].tolist())) == 600 and preds["labels"].shape == (600,)
    assert 100 * float(np.mean(preds["logits"].argmax(1) == preds["labels"])) == pytest.approx(result["test_top1"],
                                                                                                abs=0.5)
    curves = result["curves"]
    assert curves["epoch"] == [0] and len(curves["train_loss"]) == 1 and curves["train_loss"][0] > 0
    assert curves["val_top1"][-1] == pytest.approx(result["val_top1"])
    assert curves["test_top1"][-1] == pytest.approx(result["test_top1"], abs=1e-4)  # the last epoch's weights
    stored = json.loads((tmp_path / "b" / "runs" / f"{RunConfig().resolved().run_id()}.json").read_text())
    assert stored["curves"] == curves


def test_without_audit_no_test_curve_and_checkpoint_off(tmp_path):
    result = one_epoch(tmp_path, "linear", checkpoint=False)
    assert "test_top1" not in result["curves"] and result["checkpoint"] is None
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / result["predictions"]).is_file()


def test_bad_checkpoints_are_refused_and_a_crash_keeps_the_old_one(tmp_path, monkeypatch):
    result = one_epoch(tmp_path, "vpt_deep")
    path = tmp_path / result["checkpoint"]
    with safe_open(path, "pt") as f:  # a plain safetensors file: peft and other tools can read it
        assert "vpt_bench" in f.metadata()
    with pytest.raises(ConfigError, match=r"has 10 classes, the dataset here has 7"):
        load_checkpoint(path, 7)
    truncated = tmp_path / "other" / "truncated.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes(path.read_bytes()[: result["checkpoint_bytes"] // 2])
    with pytest.raises(ConfigError, match=r"truncated\.safetensors.*truncated or not a vpt-bench checkpoint") as err:
        load_checkpoint(truncated)
    assert "\n" not in str(err.value) and "FORCE=1" in str(err.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(tmp_path / "missing.safetensors")

    # a crash mid-save (here a full disk after part of the file) leaves the previous checkpoint intact
    before = path.read_bytes()
    real_write = artifacts.atomic_write

    def write_then_crash(target, write):
        def part_then_full_disk(f):
            if str(target).endswith(".safetensors"):
                f.write(before[:100])
                raise OSError(28, "No space left on device")
            write(f)
        real_write(target, part_then_full_disk)

    monkeypatch.setattr(artifacts, "atomic_write", write_then_crash)
    failed = run(RunConfig(method="vpt_deep", dataset="digits", epochs=1, results_dir=str(tmp_path), force=True))
    assert failed["status"] == "failed" and "No space left" in failed["error"]
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
