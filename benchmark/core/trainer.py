"""The run's Lightning Trainer and its loggers (CSV always, W&B when asked)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from benchmark.core.callbacks import StopOnNonFiniteLoss
from benchmark.core.claims import attempt_name
from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.store import results_path
from benchmark.core.tracking import wandb_logger


def loggers(cfg: RunConfig) -> list:
    """The CSV logger first, into a folder of this attempt's own (logs/<run_id>/attempt-<UTC time>-<host>-<pid>): two
    processes training one run never write one metrics.csv."""
    found = [CSVLogger(results_path(cfg.results_dir, "logs"), name=cfg.run_id(), version=attempt_name())]
    if cfg.wandb:
        found.append(wandb_logger(cfg))
    return found

def attempt_log_dir(cfg: RunConfig, trainer: L.Trainer) -> str:
    """This attempt's CSV log folder, relative to the results folder (which may move). Read off the logger:
    Trainer.log_dir is a collective call in a DDP run."""
    return os.path.relpath(trainer.loggers[0].log_dir, cfg.results_dir)

def make_trainer(cfg: RunConfig) -> L.Trainer:
    """The run's Lightning Trainer. Settings Lightning cannot use here (DEVICES=4 on a 2-GPU machine, an unknown
    STRATEGY, fp16 on CPU, ...) raise ConfigError before anything is built.

    deterministic=True: torch.use_deterministic_algorithms + cuBLAS workspace config, so the same seed on the
    same machine gives bit-identical results (tests/benchmark/core/test_reproducibility.py). The NaN check reads the
    loss back every 10 steps, not every step, to keep GPU steps free of a host sync.
    """
    try:
        return L.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices,
                         num_nodes=cfg.num_nodes, strategy=cfg.strategy, precision=cfg.precision,
                         logger=loggers(cfg), enable_checkpointing=False, deterministic=True, num_sanity_val_steps=0,
                         log_every_n_steps=1, enable_model_summary=False,
                         callbacks=[StopOnNonFiniteLoss(check_every_n_steps=10)])
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        precision = f" PRECISION={cfg.precision}" if cfg.precision else ""
        raise ConfigError(f"Lightning cannot run ACCELERATOR={cfg.accelerator} DEVICES={cfg.devices} NUM_NODES="
                          f"{cfg.num_nodes} STRATEGY={cfg.strategy}{precision} here: {err}") from err
