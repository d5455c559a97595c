"""Weights & Biases tracking (`WANDB=1`): one W&B run per benchmark run, and one report run for the figures.

Runs go to one project (WANDB_PROJECT, default "vpt-bench"), grouped by dataset and tagged by method, so the
workspace compares methods per dataset without any setup. Lightning's WandbLogger logs the per-epoch
train/val metrics; `log_result` adds the tuned/total parameter counts and the final test top-1, and the run's
checkpoint as a W&B Artifact (type "model"; offline it waits under the run's folder for `wandb sync`). The report
run holds the report's figures and tables, the audits among them (benchmark/analysis/audits.py).

Without an API key (no WANDB_API_KEY, no `wandb login`) W&B runs offline: files under ./wandb (or WANDB_DIR),
uploaded later with `wandb sync wandb/offline-run-*`. Nothing here ever waits for a login prompt.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from benchmark.core.config import RunConfig, is_search_tag
from benchmark.core.validate import wandb_key_problem

DEFAULT_PROJECT = "vpt-bench"
RESULT_FIELDS = ("test_top1", "val_top1", "tuned_params", "total_params", "tuned_percent", "n_train",
                 "wall_seconds", "peak_memory_mb", "status", "selected_lr", "selected_weight_decay")


def project() -> str:
    return os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT)


def save_dir() -> str:
    """W&B's own variable wins so a user can move the files; the default is ./wandb (wandb's convention)."""
    return os.environ.get("WANDB_DIR", ".")


def wandb_mode() -> str:
    """WANDB_MODE when set; otherwise online with a usable API key, offline without one (no login prompt)."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return explicit
    return "offline" if wandb_key_problem() else "online"


def run_tags(cfg: RunConfig) -> list[str]:
    data = f"shots={cfg.shots}" if cfg.shots is not None else f"fraction={cfg.train_fraction:g}"
    tags = [cfg.method, data, f"recipe={cfg.recipe}"]
    if is_search_tag(cfg.tag):
        tags.append("search")
    if cfg.train_on == "trainval":
        tags.append("final")
    return tags


def wandb_logger(cfg: RunConfig):
    """Lightning's WandbLogger for one run: grouped by dataset, tagged by method, the whole config logged."""
    Path(save_dir()).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project(), name=cfg.run_id(), group=cfg.dataset, tags=run_tags(cfg),
                       job_type="search" if is_search_tag(cfg.tag) else "train", config=asdict(cfg),
                       save_dir=save_dir(), mode=wandb_mode())


def log_result(loggers: list, result: dict) -> None:
    """Final numbers into the W&B run's summary (and the parameter counts into its config), then close it:
    the next run of a grid in this process must start a run of its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.config.update({k: result[k] for k in ("tuned_params", "total_params", "tuned_percent")
                               if k in result}, allow_val_change=True)
            run.summary.update({k: result[k] for k in RESULT_FIELDS if result.get(k) is not None})
            run.summary.update({k: v for k, v in result.items() if k.startswith("extra_test/")})  # domain shift
            log_checkpoint(run, result)
            run.finish(exit_code=0 if result.get("status") == "ok" else 1)


def artifact_name(checkpoint: str) -> str:
    """W&B artifact names take letters, digits, '-', '_' and '.': the checkpoint's path under checkpoints/, its
    folders joined by '-' (digits-vit_embedded_p7_28-linear-frac0.1_seed0), at most 128 characters."""
    stem = Path(checkpoint).with_suffix("")
    parts = stem.parts[1:] if stem.parts and stem.parts[0] == "checkpoints" else stem.parts
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))[-128:]


def log_checkpoint(run, result: dict) -> None:
    """The run's checkpoint (benchmark/core/artifacts.py) as an Artifact of type "model" logged by `run`, with the
    method, dataset, test top-1 and sha256 as metadata; nothing when the run kept none (CHECKPOINT=0)."""
    import wandb

    relative, config = result.get("checkpoint"), result.get("config") or {}
    if not relative:
        return
    artifact = wandb.Artifact(artifact_name(relative), type="model", metadata={
        k: result.get(k) for k in ("method", "dataset", "backbone", "train_fraction", "seed", "test_top1",
                                   "tuned_params", "checkpoint_sha256")})
    artifact.add_file(str(Path(config.get("results_dir", ".")) / relative), name=Path(relative).name)
    run.log_artifact(artifact)


def finish_open_run(failed: bool) -> None:
    """Close a W&B run a failed training left open (no-op when wandb was never imported)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def log_report(figures: list[Path], tables: dict, results_dir: str) -> str:
    """One W&B run (job_type "report") holding the report's figures and tables; returns its local directory."""
    import wandb

    Path(save_dir()).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project(), job_type="report", name="report", group="report", dir=save_dir(),
                     mode=wandb_mode(), config={"results_dir": str(results_dir)})
    try:
        run.log({Path(f).stem: wandb.Image(str(f)) for f in figures if Path(f).suffix == ".png"})
        run.log({name: wandb.Table(dataframe=frame) for name, frame in tables.items()})
        return run.dir
    finally:
        run.finish()
