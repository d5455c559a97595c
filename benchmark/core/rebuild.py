"""A trained model again, from its checkpoint (benchmark/core/artifacts.py), and what `python -m benchmark.evaluate`
does with it (issue 28): the backbone with the run's weights, the method with its options, the saved tensors loaded
and checked (the frozen tensors' digest, the run's record); then scored on the run's own test set, where it gives
the recorded test_top1 exactly, or on another dataset with the same classes and on extra test sets, with the run's
transforms; or exported as a plain timm state dict (benchmark/core/export.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import lightning as L

from benchmark.core.artifacts import (
    backbone_digest,
    check_predictions,
    file_sha256,
    load_checkpoint,
    load_trained_tensors,
)
from benchmark.core.cli import extra_test_sets
from benchmark.core.config import RunConfig, setting
from benchmark.core.errors import ConfigError
from benchmark.core.export import plain_state_dict, save_export
from benchmark.core.extra_test_eval import evaluate_extra_tests
from benchmark.core.pipeline import build_datamodule, build_model, with_image_cache
from benchmark.core.store import results_path
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
    check_backbone_digest(path, meta, model, set(tensors))
    return model, cfg


def check_backbone_digest(path: str | Path, meta: dict, model, trained: set[str]) -> None:
    """Every tensor the checkpoint does not hold (the frozen backbone) must be the run's: same sha256 over them."""
    recorded = meta.get("backbone_digest")
    now = backbone_digest(model, trained)
    if recorded != now:
        raise ConfigError(f"Checkpoint {str(path)!r} was trained on another backbone than the {meta.get('backbone')} "
                          f"built here (sha256 of its frozen tensors {str(recorded)[:12]}..., here {now[:12]}...): "
                          "build it with the weights and timm version the run used (WEIGHTS=, the result's versions).")


def test_trainer(cfg: RunConfig) -> L.Trainer:
    """One process, the run's precision: the evaluation the run's `trainer.test` made."""
    return L.Trainer(accelerator=cfg.accelerator, devices=1, precision=cfg.precision, logger=False,
                     enable_checkpointing=False, deterministic=True, enable_progress_bar=False,
                     enable_model_summary=False)


def score_test_set(path: str | Path) -> float:
    """Test top-1 (%) of the checkpoint's model on its run's own test set, as the run scored it (trainer.test)."""
    _, meta = load_checkpoint(path)
    cfg = checkpoint_config(meta)
    datamodule = build_datamodule(cfg, planned_data_config(cfg))
    datamodule.setup()
    model, cfg = rebuild(path, datamodule.num_classes)
    return float(test_trainer(cfg).test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]) * 100


@dataclass
class EvaluateConfig:
    """`python -m benchmark.evaluate` (`make evaluate RUN=...`): each field a flag, declared once (benchmark.core.cli
    add_settings)."""

    run: str | None = setting(None, "the run's result (<results>/runs/<run>.json) or its checkpoint (.safetensors)")
    dataset: str | None = setting(None, "score on this registered dataset's test set (default: the run's); its "
                                  "classes must be the run's")
    data_root: str | None = setting(None, "the dataset's folder (default: the run's when the dataset is the run's)")
    extra_test: dict = setting(help="also score these folders of class folders named like the run's classes, e.g. "
                               "sketch=/data/imagenet-sketch", factory=dict, parse=extra_test_sets,
                               metavar="NAME=DIR,...")
    export: str | None = setting(None, "merged: also write the model as a plain timm state dict (methods whose update "
                                 "folds into the backbone's weights)", choices=("merged",))
    output: str | None = setting(None, "where --export writes (default: <results>/exports/<run>.safetensors)")
    accelerator: str | None = setting(None, "Lightning accelerator (default: the run's)")
    num_workers: int = setting(0, "data loader workers", bounds=(0, 256))


def read_run(path: Path) -> dict:
    """A finished run's result that kept a checkpoint; ConfigError naming the file and the fix otherwise."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"Run result {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:80]}): give "
                          "RUN=<results>/runs/<dataset>/<backbone>/<method>/<run>.json.") from None
    if not isinstance(record, dict) or "config" not in record:
        raise ConfigError(f"Run result {str(path)!r} is not a run's result: give RUN=<results>/runs/.../<run>.json.")
    if record.get("status") != "ok":
        raise ConfigError(f"Run {str(path)!r} did not finish (status {record.get('status')!r}: "
                          f"{record.get('error', 'no error recorded')}): rerun it; it has no checkpoint.")
    if not record.get("checkpoint"):
        raise ConfigError(f"Run {str(path)!r} kept no checkpoint (it ran with CHECKPOINT=0): rerun it with FORCE=1 "
                          "CHECKPOINT=1.")
    return record


def results_root(path: Path, run_id: str, folder: str) -> Path | None:
    """The results folder that holds `path` as <folder>/<run_id><suffix>, or None when it does not sit there."""
    depth = run_id.count("/") + 1
    if len(path.parents) <= depth or path.parents[depth - 1].name != folder:
        return None
    return path.parents[depth]


def locate(run: str) -> tuple[dict | None, Path, Path]:
    """(the run's record or None, its checkpoint, its results folder) from RUN= (a result JSON or a checkpoint)."""
    path = Path(run)
    if path.suffix == ".safetensors":
        _, meta = load_checkpoint(path)
        root = results_root(path, meta["run_id"], "checkpoints") or Path(meta["config"]["results_dir"])
        return None, path, root
    record = read_run(path)
    run_id = checkpoint_config(record).run_id()  # the record holds the config as the checkpoint does
    root = results_root(path, run_id, "runs") or Path(record["config"]["results_dir"])
    return record, root / record["checkpoint"], root


# What a checkpoint's metadata and its run's recorded config must agree on (same names in both).
RUN_FIELDS = ("method", "method_options", "backbone", "backbone_kwargs", "head_init")


def check_belongs_to_run(checkpoint: Path, meta: dict, record: dict, record_path: Path) -> None:
    """The checkpoint is the one the run wrote: same method, options, backbone, classes, and bytes (sha256)."""
    fix = "rerun the run with FORCE=1 to write both again, or give RUN= the result of that checkpoint"
    config = record["config"]
    for name in RUN_FIELDS:
        if json.dumps(meta.get(name), sort_keys=True) != json.dumps(config.get(name), sort_keys=True):
            raise ConfigError(f"Checkpoint {str(checkpoint)!r} has {name} {meta.get(name)!r}, its run "
                              f"{str(record_path)!r} {config.get(name)!r}: {fix}.")
    if meta.get("num_classes") != record.get("num_classes"):
        raise ConfigError(f"Checkpoint {str(checkpoint)!r} has {meta.get('num_classes')} classes, its run "
                          f"{str(record_path)!r} {record.get('num_classes')}: {fix}.")
    if record.get("checkpoint_sha256") and file_sha256(checkpoint) != record["checkpoint_sha256"]:
        raise ConfigError(f"Checkpoint {str(checkpoint)!r} is not the file its run {str(record_path)!r} wrote "
                          f"(sha256 differs from the recorded {record['checkpoint_sha256'][:12]}...): {fix}.")


def data_to_score(cfg: RunConfig, meta: dict):
    """The datamodule to score (set up, the run's transforms), refused when its classes are not the checkpoint's."""
    try:
        datamodule = build_datamodule(cfg, planned_data_config(cfg))
        datamodule.setup()
    except (ValueError, OSError) as err:  # datamodules name the folder and the fix
        raise ConfigError(str(err)) from err
    names = [str(n) for n in datamodule.class_names]
    if names != [str(n) for n in meta["class_names"]]:
        shown = names[:3] + (["..."] if len(names) > 3 else [])
        raise ConfigError(f"DATASET={cfg.dataset} has the classes {shown} ({len(names)}), the checkpoint "
                          f"{meta['run_id']} was trained on {meta['class_names'][:3]}... ({meta['num_classes']}): "
                          "score it on a dataset with the same classes, or give a shifted set as EXTRA_TEST=name=dir.")
    return datamodule


def same_test_set(ecfg: EvaluateConfig, run_cfg: RunConfig) -> bool:
    """Whether DATASET / DATA_ROOT name the run's own test set (where the recorded test_top1 must come back)."""
    if ecfg.dataset not in (None, run_cfg.dataset):
        return False
    return ecfg.data_root is None or run_cfg.data_root is not None and \
        Path(ecfg.data_root).resolve() == Path(run_cfg.data_root).resolve()


def evaluate(ecfg: EvaluateConfig) -> dict:
    """Rebuild RUN='s model, check it against its run, optionally export it, and score DATASET's (default: the
    run's) test set and the EXTRA_TEST sets. Returns what it found; ConfigError (nothing written) on bad input."""
    if not ecfg.run:
        raise ConfigError("RUN= is required: make evaluate RUN=<results>/runs/<dataset>/<backbone>/<method>/<run>.json")
    record, checkpoint, root = locate(ecfg.run)
    _, meta = load_checkpoint(checkpoint)
    if record is not None:
        check_belongs_to_run(checkpoint, meta, record, Path(ecfg.run))
    run_cfg = checkpoint_config(meta)
    own = same_test_set(ecfg, run_cfg)
    cfg = replace(run_cfg, dataset=ecfg.dataset or run_cfg.dataset, results_dir=str(root),
                  data_root=ecfg.data_root or (run_cfg.data_root if ecfg.dataset in (None, run_cfg.dataset) else None),
                  extra_test=ecfg.extra_test,
                  num_workers=ecfg.num_workers, accelerator=ecfg.accelerator or run_cfg.accelerator)
    datamodule = data_to_score(cfg, meta)
    test = datamodule.splits["test"]
    predictions = record.get("predictions") if own and record else None
    if predictions and (root / predictions).is_file():
        check_predictions(root / predictions, test.ids, test.labels)
    model, _ = rebuild(checkpoint, datamodule.num_classes)
    found = {"run": meta["run_id"], "checkpoint": str(checkpoint), "dataset": cfg.dataset}
    if ecfg.export:
        state = plain_state_dict(model, cfg.method, cfg.backbone, cfg.backbone_kwargs)
        where = Path(ecfg.output) if ecfg.output else results_path(root, "exports", f"{meta['run_id']}.safetensors")
        export_meta = {"timm_model": cfg.backbone, "backbone_kwargs": cfg.backbone_kwargs,
                       "num_classes": meta["num_classes"], "class_names": meta["class_names"], "run_id": meta["run_id"]}
        found |= {"export": str(where), "export_bytes": save_export(where, state, export_meta)}
    scored = with_image_cache(cfg, datamodule) if own else datamodule  # as the run tested: its image cache
    trainer = test_trainer(cfg)
    found["test_top1"] = float(trainer.test(model, datamodule=scored, verbose=False)[0]["test/acc"]) * 100
    if own:
        found |= {"recorded_test_top1": meta["test_top1"], "reproduced": found["test_top1"] == meta["test_top1"]}
    return found | evaluate_extra_tests(trainer, model, datamodule)
