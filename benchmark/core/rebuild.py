"""A trained model again, from its checkpoint (benchmark/core/artifacts.py): the backbone with the run's weights, the
method with its options, the saved tensors loaded; and its score on the run's own test set, which equals the
recorded test_top1 (tests/benchmark/core/test_artifacts.py). The start of `python -m benchmark.evaluate` (issue 28)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import lightning as L

from benchmark.core.artifacts import file_sha256, load_checkpoint, load_trained_tensors
from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.pipeline import build_datamodule, build_model
from benchmark.core.validate import planned_data_config


def checkpoint_config(meta: dict) -> RunConfig:
    """The run's resolved config as the checkpoint stores it, without the speed options that do not change a
    number (compile)."""
    known = {f.name for f in fields(RunConfig)}
    return replace(RunConfig(**{k: v for k, v in meta["config"].items() if k in known}), compile=False)


def check_weights(path: str | Path, meta: dict, cfg: RunConfig) -> None:
    """The backbone weights file must be the one the run trained on (same sha256)."""
    source = meta.get("weights", {})
    if source.get("kind") == "file" and cfg.weights:
        try:
            now = file_sha256(cfg.weights)
        except OSError as err:
            raise ConfigError(f"Checkpoint {str(path)!r} was trained on the backbone weights {cfg.weights!r}, which "
                              f"cannot be read here ({err.strerror or err}): point WEIGHTS= at that file.") from None
        if now != source.get("sha256"):
            raise ConfigError(f"Checkpoint {str(path)!r} was trained on backbone weights with sha256 "
                              f"{str(source.get('sha256'))[:12]}..., but {cfg.weights!r} has {now[:12]}...: point "
                              "WEIGHTS= at the file the run used.")


def rebuild(path: str | Path, num_classes: int | None = None):
    """(model, config) from a checkpoint: the run's seed first (as `run` seeds before building), then the
    backbone and method, then the saved tensors. Raises ConfigError naming the file on any mismatch."""
    tensors, meta = load_checkpoint(path, num_classes)
    cfg = checkpoint_config(meta)
    check_weights(path, meta, cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg, meta["num_classes"])
    load_trained_tensors(model, path, tensors)
    return model, cfg


def score_test_set(path: str | Path) -> float:
    """Test top-1 (%) of the checkpoint's model on its run's own test set, as the run scored it (trainer.test)."""
    _, meta = load_checkpoint(path)
    cfg = checkpoint_config(meta)
    datamodule = build_datamodule(cfg, planned_data_config(cfg))
    datamodule.setup()
    model, cfg = rebuild(path, datamodule.num_classes)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, precision=cfg.precision, logger=False,
                        enable_checkpointing=False, deterministic=True, enable_progress_bar=False,
                        enable_model_summary=False)
    return float(trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]) * 100
