"""One run as a straight line: resolve and check the config, check the data, build the model, train and test,
record the result. Bad input raises ConfigError before anything costly; a failure during training is recorded as a
`status: failed` result."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

import methods
from backbones import create_backbone
from benchmark.core.artifacts import (
    EpochCurves,
    TestLogits,
    checkpoint_metadata,
    checkpoint_path,
    peft_adapter_path,
    predictions_path,
    save_checkpoint,
    save_peft_adapter,
    save_predictions,
)
from benchmark.core.callbacks import NonFiniteLossError
from benchmark.core.claims import Holder, RunClaim
from benchmark.core.config import RunConfig, option_text, options_label
from benchmark.core.distributed import for_this_process, gather_in_test_order, per_process_batch_size
from benchmark.core.errors import ConfigError, ConfigWarning
from benchmark.core.extra_test_eval import evaluate_extra_tests, result_key
from benchmark.core.features import cached_datamodule, can_cache
from benchmark.core.images import cached_image_datamodule, image_cache_dir
from benchmark.core.provenance import git_commit, git_dirty, peak_memory_mb, versions
from benchmark.core.store import (
    atomic_write_json,
    finished_ok,
    is_storage_error,
    read_result,
    result_path,
    results_path,
    split_path,
    storage_problem,
)
from benchmark.core.tracking import log_result
from benchmark.core.trainer import attempt_log_dir, make_trainer
from benchmark.core.validate import planned_data_config, validate_config, validate_data
from datamodules import create_datamodule
from datamodules.checks import DataError
from methods import create_method


def build_datamodule(cfg: RunConfig, data_cfg: dict):
    return create_datamodule(cfg.dataset, data_config=data_cfg, train_fraction=cfg.train_fraction, seed=cfg.seed,
                             batch_size=cfg.batch_size, num_workers=cfg.num_workers, train_on=cfg.train_on,
                             data_root=cfg.data_root, shots=cfg.shots, extra_test=cfg.extra_test)

def build_model(cfg: RunConfig, num_classes: int) -> methods.TuningModule:
    """The backbone with its weights (read from a file or fetched from the hub) wrapped by the method."""
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, **cfg.backbone_kwargs)
    model = create_method(cfg.method, backbone, num_classes, cfg.optim_config(), head_init=cfg.head_init,
                          **cfg.method_options)
    apply_speed_options(model, compile=cfg.compile, checkpointing=cfg.checkpointing)
    return model

def apply_speed_options(model: L.LightningModule, *, compile: bool, checkpointing: bool,
                        compile_backend: str | None = None) -> None:
    """Gradient checkpointing of the backbone blocks (timm's flag, honoured by methods.vpt too) and
    torch.compile of the forward in place, so Lightning's steps run the compiled graph (`compile_backend`: another
    torch.compile backend than inductor, e.g. "eager" to check the graph capture without code generation)."""
    if checkpointing:
        model.backbone.set_grad_checkpointing(True)
    if compile:
        model.compile(**({"backend": compile_backend} if compile_backend else {}))

def with_feature_cache(cfg: RunConfig, model: L.LightningModule, datamodule, trainer: L.Trainer):
    """The linear probe on a deterministic transform trains on cached features (benchmark/core/features.py),
    computed on this process's device (the trainer's root device; in a DDP run each rank has its own GPU)."""
    if not (cfg.feature_cache and can_cache(model, datamodule)):
        return datamodule
    return cached_datamodule(model, datamodule, results_path(cfg.results_dir, "cache", "features"),
                             trainer.strategy.root_device, cfg.precision)

def with_image_cache(cfg: RunConfig, datamodule):
    """IMAGE_CACHE=1: the image files decoded and resized once into <results>/cache/images, cropped, flipped and
    normalised on the training device (benchmark/core/images.py). The feature cache, where it applies, comes first:
    it reads neither."""
    if not cfg.image_cache:
        return datamodule
    try:
        return cached_image_datamodule(datamodule, image_cache_dir(cfg.results_dir))
    except DataError as err:  # an image smaller than the crop: named, before anything trains
        raise ConfigError(str(err)) from err
    except OSError as err:  # the cache only saves time: a full disk costs speed, not the run
        problem = storage_problem(err, image_cache_dir(cfg.results_dir))
        warnings.warn(f"IMAGE_CACHE: {problem}; this run decodes the image files instead.", ConfigWarning,
                      stacklevel=2)
        return datamodule

def gathered_test_predictions(trainer: L.Trainer, logits, labels, n: int):
    """The test logits and labels of every process in test-set order (a collective: every rank calls it, before
    the extra test sets' own trainer.test), on the CPU."""
    device = trainer.strategy.root_device
    logits, labels = gather_in_test_order(trainer.strategy.all_gather, logits.to(device), labels.to(device),
                                          trainer.world_size, trainer.global_rank, n)
    return logits.cpu(), labels.cpu()

def fit_and_test(cfg: RunConfig, trainer: L.Trainer, model: L.LightningModule, loaders) -> tuple[float, float]:
    """(val top-1, test top-1) in %: the final epoch's val accuracy, then the test accuracy."""
    trainer.fit(model, datamodule=loaders)
    # torchmetrics objects: Lightning's compute() sums their counts over all processes, so both are global.
    val_top1 = float(trainer.callback_metrics["val/acc"]) * 100
    return val_top1, float(trainer.test(model, datamodule=loaders, verbose=False)[0]["test/acc"]) * 100

def prepare(cfg: RunConfig):
    """Data first, then weights: DATA_ROOT, split files, labels and the fraction (or shots) against the class sizes,
    the extra test sets' class names, then the image files, are all checked before a backbone's weights are read or
    fetched. A bad dataset or weights file raises ConfigError."""
    try:
        datamodule = build_datamodule(cfg, planned_data_config(cfg))
        datamodule.setup()
        validate_data(datamodule, cfg)
        model = build_model(cfg, datamodule.num_classes)
    except ConfigError:
        raise
    except (ValueError, OSError) as err:  # backbones.weights and datamodules name the file and the fix
        raise ConfigError(str(err)) from err
    return model, datamodule

def data_amount(cfg: RunConfig) -> str:
    """'0.1' or '4 shots': how much of the training pool a run trains on, for its messages."""
    return f"{cfg.shots} shots" if cfg.shots is not None else f"{cfg.train_fraction:g}"

def run_record(cfg: RunConfig, started: float) -> dict:
    """What every result holds, whatever its status: the run's identity, provenance and cost."""
    return {"method": cfg.method, "dataset": cfg.dataset, "backbone": cfg.backbone,
            # a few-shot run has no fraction: its training set is `shots` per class
            "train_fraction": None if cfg.shots is not None else cfg.train_fraction, "shots": cfg.shots,
            "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
            "recipe": cfg.recipe, "train_on": cfg.train_on, "pretrained": cfg.pretrained,
            # an option grid's point, as one text and one flat field per option (summary.csv keeps flat fields)
            "options": options_label(cfg.options),
            **{f"option/{key}": value if isinstance(value, (int, float, str, bool)) else option_text(value)
               for key, value in cfg.options.items()},
            "wall_seconds": time.time() - started, "peak_memory_mb": peak_memory_mb(), "git_commit": git_commit(),
            "git_dirty": git_dirty(), "versions": versions()}

def interruption_behind(err: BaseException) -> BaseException | None:
    """A stop (Ctrl+C, a grid's SIGINT/SIGTERM) that an error in the cleanup it set off has hidden: the first
    BaseException that is not an Exception in `err`'s context chain. Seen when the signal lands while Lightning's rich
    progress bar starts its thread: the teardown's join then raises RuntimeError over the grid's stop."""
    seen = err.__context__
    while seen is not None:
        if not isinstance(seen, Exception):
            return seen
        seen = seen.__context__
    return None


def diverged(result: dict | None) -> bool:
    """Whether `result` is a run whose training loss went non-finite (the error `record_failure` writes for a
    NonFiniteLossError, e.g. an lr too large): an outcome of its settings, not of the machine."""
    return bool(result) and result.get("status") == "failed" and \
        str(result.get("error", "")).startswith(f"{NonFiniteLossError.__name__}:")


def record_failure(cfg: RunConfig, path, started: float, err: Exception) -> dict:
    """A training failure becomes a `status: failed` result (written atomically) so a grid records it and moves on.
    Where even that cannot be written (a full disk), the failure is said on stderr and the previous file stays. An
    error that hides a stop is no failure of the run: the stop goes on and nothing is recorded (the next call redoes
    the run)."""
    if (stop := interruption_behind(err)) is not None:
        raise stop
    if not isinstance(err, NonFiniteLossError) and not is_storage_error(err):  # expected failures need no traceback
        traceback.print_exc()
    error = storage_problem(err, cfg.results_dir) if is_storage_error(err) else str(err)
    result = run_record(cfg, started) | {"status": "failed", "error": f"{type(err).__name__}: {error}",
                                         "config": asdict(cfg)}
    if rank_zero_only.rank == 0:
        try:
            atomic_write_json(path, result)
        except OSError as write_err:
            print(f"FAILED, and the failure could not be recorded: {storage_problem(write_err, path)}",
                  file=sys.stderr)
    print(f"FAILED {cfg.method} on {cfg.dataset} @ {data_amount(cfg)}: {result['error']} -> {path}",
          file=sys.stderr)
    return result


def save_artifacts(cfg: RunConfig, run_id: str, model: methods.TuningModule, source, result: dict, logits,
                   labels) -> dict:
    """The run's checkpoint (unless CHECKPOINT=0) and test predictions, each written atomically
    (benchmark/core/artifacts.py); returns the result's fields naming them, paths relative to the results folder."""
    test = source.splits["test"]
    if labels.tolist() != test.labels.tolist():  # gathered in test order from every process of a DDP run
        raise RuntimeError("the test loader's labels are not the test split's, in order: the predictions could "
                           "not be matched to image ids")
    where = predictions_path(cfg.results_dir, run_id)
    fields = {"checkpoint": None, "predictions": os.path.relpath(where, cfg.results_dir),
              "predictions_bytes": save_predictions(where, logits, labels, test.ids)}
    if cfg.checkpoint:
        where = checkpoint_path(cfg.results_dir, run_id)
        metadata = checkpoint_metadata(cfg, model, source, result["test_top1"], result["git_commit"])
        fields |= {"checkpoint": os.path.relpath(where, cfg.results_dir),
                   **save_checkpoint(where, model, metadata)}
        # a peft tuner also in peft's own format, beside it (PeftModel.from_pretrained reads it)
        save_peft_adapter(peft_adapter_path(cfg.results_dir, run_id), model, cfg.backbone)
    return fields


def save_result(cfg: RunConfig, path, result: dict, started: float) -> dict:
    """Write a finished run's result; where the disk refuses it, print the whole record on stderr (a log keeps what
    was learned) and record the run as failed with the reason, so the next call retrains it."""
    try:
        atomic_write_json(path, result)
    except OSError as err:
        print(f"The result of this run could not be saved; here it is:\n{json.dumps(result, default=str)}",
              file=sys.stderr)
        return record_failure(cfg, path, started, err)
    return result

# Settings that change a result but not its file name (run_id holds method, dataset, fraction or shots, seed,
# options, train_on, tag).
RESULT_SETTINGS = ("backbone", "weights", "pretrained", "recipe", "optimizer", "lr", "weight_decay", "epochs",
                   "warmup_epochs", "batch_size", "head_init", "method_options", "backbone_kwargs", "precision",
                   "extra_test")

def changed_settings(stored: dict, cfg: RunConfig) -> list[str]:
    """'lr 0.5 -> 0.1' for each result-defining setting where a stored result's config differs from `cfg`."""
    now = json.loads(json.dumps(asdict(cfg), default=str))  # as stored: tuples become lists
    return [f"{name} {stored[name]!r} -> {now[name]!r}" for name in RESULT_SETTINGS
            if name in stored and name in now and stored[name] != now[name]]

class FoundResult(dict):
    """A finished result that `run` found in the store instead of training it (already there, or finished by another
    process while this one claimed the run): returned as read. A grid counts it as done, not as trained here."""


def finished_meanwhile(path, seen: dict | None, force: bool) -> FoundResult | None:
    """Read with the run's claim held (no other process writes it now): the result when another process finished it
    ok since `seen` was read (with FORCE: when it is another result than `seen`), else None."""
    fresh = read_result(path)
    if fresh and fresh.get("status") == "ok" and "test_top1" in fresh and not (force and fresh == seen):
        return FoundResult(fresh)
    return None


def claimed_result(cfg: RunConfig, run_id: str, path, holder: Holder | None, started: float) -> dict:
    """A run that another live process holds: nothing is trained or written here. Says who trains it and where."""
    who = holder.describe() if holder else "another process"
    log = f" (its log: {cfg.results_dir}/{holder.log_dir})" if holder and holder.log_dir else ""
    print(f"Claimed by another process, nothing to do here: {who} trains {run_id}; its result will appear at "
          f"{path}{log}.")
    return run_record(cfg, started) | {"status": "claimed", "claimed_by": holder.record() if holder else None,
                                       "config": asdict(cfg)}


def run(cfg: RunConfig) -> dict:
    """Train and test one configuration; returns (and writes) its result.

    Bad input raises ConfigError before anything trains (and writes nothing); a failure during training
    (NaN loss, out of memory, ...) is returned and written as `status: failed` with the error.
    """
    cfg = validate_config(cfg)
    run_id = cfg.run_id()  # the run's name, once: every file of the run is named by it
    path = result_path(cfg.results_dir, run_id)
    existing = read_result(path)
    if finished_ok(existing) and not cfg.force:
        print(f"Result exists, nothing to do: {path} (test top-1 {existing['test_top1']:.2f}). Use FORCE=1 to rerun.")
        changed = changed_settings(existing["config"] if isinstance(existing.get("config"), dict) else {}, cfg)
        if changed:  # the file name does not hold every hyperparameter: say that this result is not for them
            print(f"Note: that result was made with other settings ({', '.join(changed)}); FORCE=1 replaces it, "
                  "TAG=<name> (--tag) keeps both.")
        return FoundResult(existing)
    if existing and existing.get("status") == "ok":
        print(f"Rerunning {path}: its record has no test top-1 (damaged or made by another tool).")
    elif existing:
        print(f"Rerunning {path}: the previous attempt failed ({existing.get('error', 'no reason recorded')}).")
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # The trainer first: it knows this process's rank and device (a DDP run executes this function once per
    # process, benchmark/core/distributed.py), which decide who writes files and where cached features are computed.
    trainer = make_trainer(cfg)
    # Claimed before anything costly, by rank 0 only (other ranks are its re-launched copies): another process that
    # holds the run trains it (benchmark/core/claims.py). Released however the run ends.
    claim = RunClaim(cfg.results_dir, run_id) if trainer.is_global_zero else None
    if claim is not None and not claim.acquire(log_dir=attempt_log_dir(cfg, trainer)):
        return claimed_result(cfg, run_id, path, claim.refused_by, started)
    try:
        found = finished_meanwhile(path, existing, cfg.force) if claim is not None else None
        if found is not None:
            print(f"Result finished meanwhile by another process, nothing to do: {path}.")
            return found
        return train_and_record(cfg, run_id, trainer, path, started)
    finally:
        if claim is not None:
            claim.release()


def train_and_record(cfg: RunConfig, run_id: str, trainer: L.Trainer, path, started: float) -> dict:
    """The rest of `run`, once this process may train the run: data and model, fit and test, the result."""
    per_process_batch_size(cfg.batch_size, trainer.world_size)  # a global batch the processes cannot share
    model, datamodule = prepare(cfg)
    try:
        if trainer.is_global_zero:
            atomic_write_json(split_path(cfg.results_dir, run_id), datamodule.split_record())
        source = datamodule  # the image splits (and extra test sets), whatever the caches make of them
        cached = with_feature_cache(cfg, model, datamodule, trainer)
        datamodule = with_image_cache(cfg, datamodule) if cached is datamodule else cached
        loaders = for_this_process(datamodule, trainer, cfg.seed)
        curves, test_logits = EpochCurves(cfg.audit, loaders), TestLogits()
        trainer.callbacks.extend([curves, test_logits])
        val_top1, test_top1 = fit_and_test(cfg, trainer, model, loaders)
        logits, labels = gathered_test_predictions(trainer, *test_logits.collected(), len(source.splits['test'].labels))
        extra = evaluate_extra_tests(trainer, model, source)
    except Exception as err:  # noqa: BLE001 — recorded as a failed result; KeyboardInterrupt/SystemExit pass
        return record_failure(cfg, path, started, err)
    result = run_record(cfg, started) | {
        "n_train": datamodule.n_train, "num_classes": datamodule.num_classes,
        "tuned_params": model.tuned_params, "total_params": model.total_params,
        "tuned_percent": 100 * model.tuned_params / model.total_params,
        "log_dir": attempt_log_dir(cfg, trainer),  # this attempt's metrics.csv, relative to the results folder
        "val_top1": val_top1, "test_top1": test_top1, **extra, "world_size": trainer.world_size,
        "curves": curves.curves, "status": "ok", "config": asdict(cfg),
    }
    if trainer.is_global_zero:
        try:
            result |= save_artifacts(cfg, run_id, model, source, result, logits, labels)
        except OSError as err:  # a full disk: the run is recorded as failed, so the next call retrains it
            return record_failure(cfg, path, started, err)
        result = save_result(cfg, path, result, started)
        if result["status"] != "ok":
            return result
        shifted = "".join(f", {name} {extra[result_key(name)]:.2f}" for name in cfg.extra_test)
        print(f"{cfg.method} on {cfg.dataset} @ {data_amount(cfg)}: test top-1 {test_top1:.2f} "
              f"(val {val_top1:.2f}{shifted}) in {result['wall_seconds']:.0f}s -> {path}")
    if cfg.wandb and trainer.is_global_zero:  # other ranks hold no W&B run (Lightning's WandbLogger is rank 0's)
        log_result(trainer.loggers, result)  # tuned/total params + test top-1, then closes the W&B run
    return result
