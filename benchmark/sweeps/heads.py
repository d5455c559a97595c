"""The linear probe's lr x weight-decay search in one pass over the cached features, as dinov2's linear evaluation
trains its grid of heads (dinov2/eval/linear.py, `setup_linear_classifiers`).

The search points of a cell differ only in the head's lr and weight decay: the frozen features, the head's
initialisation (same seed) and the minibatches (same seeded loader) are the same in each. So one module holds N
copies of the initial head; a step computes all N heads' logits from one minibatch, and the sum of their
mean losses gives each head its own gradient (they share no parameter). Each head has its own
optimizer parameter groups (timm's rule: its bias without decay) with its own lr and weight decay, under the single
run's optimizer and warmup + cosine schedule (`methods.base.optimizer_and_schedule`). Each point gets the result a
separate run would write: its final-epoch val and its test top-1 (tests/benchmark/sweeps/test_heads.py compares both).

`benchmark/sweeps/search.py` uses it for `linear` wherever its runs would use the feature cache. mlp_k keeps one run per
point: its head's dropout draws from the global RNG, so one pass could not give each head its own run's masks.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from benchmark.core.callbacks import non_finite_loss_error
from benchmark.core.claims import RunClaim
from benchmark.core.config import RunConfig
from benchmark.core.features import can_cache
from benchmark.core.pipeline import (
    claimed_result,
    finished_meanwhile,
    prepare,
    record_failure,
    run_record,
    with_feature_cache,
)
from benchmark.core.store import atomic_write_json, read_result, result_path, split_path
from benchmark.core.tracking import finish_open_run
from benchmark.core.trainer import attempt_log_dir, make_trainer
from benchmark.core.validate import validate_config
from methods import OptimConfig, get_method_class
from methods.base import fused_if_supported, optimizer_and_schedule


class HeadGrid(L.LightningModule):
    """N linear heads trained side by side on the same (B, D) features; head n with `points[n]` = (lr, wd)."""

    def __init__(self, head: nn.Linear, points: list[tuple[float, float]], optim: OptimConfig):
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(head).requires_grad_(True) for _ in points)
        self.points = list(points)
        self.optim = optim
        self.step_losses: list[torch.Tensor] = []  # (N,) per training step, kept on the device: no sync per step
        self.train_losses: torch.Tensor | None = None  # (steps, N), after fit
        self.register_buffer("correct", torch.zeros(len(points), dtype=torch.long), persistent=False)
        self.seen = 0
        self.batches_per_epoch = 1
        self.val_acc: torch.Tensor | None = None
        self.test_acc: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each head through its own F.linear, the op of a single run: one wide matmul for all heads rounds
        # differently, and at large lrs (chaotic training) that changed val top-1 by up to 9.5 points (measured).
        return torch.stack([F.linear(x, head.weight, head.bias) for head in self.heads], dim=1)  # (B, N, C)

    def head_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) each head's mean cross-entropy over the batch, the loss of a single run (methods/base.py)."""
        b, n, c = logits.shape
        losses = F.cross_entropy(logits.reshape(b * n, c), labels.repeat_interleave(n), reduction="none")
        return losses.view(b, n).mean(0)

    def on_train_start(self) -> None:
        self.batches_per_epoch = self.trainer.num_training_batches

    def on_train_end(self) -> None:
        self.train_losses = torch.stack(self.step_losses).cpu()

    def training_step(self, batch, batch_idx):
        features, labels = batch
        losses = self.head_losses(self(features), labels)
        self.step_losses.append(losses.detach())
        # A separate run stops at its first non-finite loss; here that head is recorded as failed (`failure`) and
        # the others train on: the sum stays finite for the run's NaN callback, the failed head gets zero gradient.
        return losses.nan_to_num(0.0, 0.0, 0.0).sum()

    def count_correct(self, batch) -> None:
        features, labels = batch
        self.correct += (self(features).argmax(dim=-1) == labels.unsqueeze(1)).sum(dim=0)
        self.seen += len(labels)

    def accuracy(self) -> torch.Tensor:
        """(N,) top-1 as torchmetrics' accuracy computes it: float32 correct / float32 total."""
        accuracy = self.correct.float() / torch.tensor(float(self.seen), device=self.correct.device)
        self.correct.zero_()
        self.seen = 0
        return accuracy

    def validation_step(self, batch, batch_idx):
        self.count_correct(batch)

    def test_step(self, batch, batch_idx):
        self.count_correct(batch)

    def on_validation_epoch_end(self) -> None:
        self.val_acc = self.accuracy()
        self.log("val/acc_best", self.val_acc.max(), prog_bar=True)
        # Every head's accuracy straight to the loggers, one row per epoch: `self.log` costs ~5 ms a call here.
        per_head = {f"val/acc/lr{lr:g}_wd{wd:g}": float(acc) for (lr, wd), acc in zip(self.points, self.val_acc,
                                                                                      strict=True)}
        for logger in self.loggers:
            logger.log_metrics(per_head | {"epoch": self.current_epoch}, step=self.global_step)

    def on_test_epoch_end(self) -> None:
        self.test_acc = self.accuracy()

    def configure_optimizers(self):
        groups = [group | {"lr": lr} for head, (lr, wd) in zip(self.heads, self.points, strict=True)
                  for group in param_groups_weight_decay(head, weight_decay=wd)]
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        optimizer, schedule = optimizer_and_schedule(groups, self.optim, total_steps, **fused_if_supported(self))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def failure(self, n: int) -> Exception | None:
        """The error a separate run of head n would have stopped with (after fit), or None."""
        losses = self.train_losses[:, n]  # (steps,)
        failed = (~torch.isfinite(losses)).nonzero()
        if not len(failed):
            return None
        epoch, batch = divmod(int(failed[0]), self.batches_per_epoch)
        return non_finite_loss_error(epoch, f"batch {batch}", float(losses[failed[0]]))


def can_share_a_pass(cfg: RunConfig) -> bool:
    """Whether the method may train on cached features at all (the data's transform is checked once built)."""
    return cfg.feature_cache and getattr(get_method_class(cfg.method), "trains_on_frozen_features", False)


def train_in_one_pass(configs: list[RunConfig], name: str) -> list[dict] | None:
    """Train the search points `configs` (of one cell: they differ in lr and weight decay only) as the heads of one
    HeadGrid, and write each point's result as its own run would (its `wall_seconds` the pass's share; `one_pass`
    says which pass). None where the points' runs would not train a linear head on cached features: then they need
    runs of their own. The pass's log (every head's val accuracy per epoch) and split record are those of the cell's
    run tagged `name`.

    A failure that stops the pass (a missing dataset, out of memory) is recorded for every point, as their runs would.

    Each point's run is claimed first (benchmark/core/claims.py), as its own run would be: a point that another process
    holds comes back as its `claimed` result, one that another process finished meanwhile as read (FoundResult); the
    pass trains the rest, and lets go of their claims when it ends.
    """
    cell = [replace(cfg, lr=None, weight_decay=None, tag="", force=False) for cfg in configs]
    if any(other != cell[0] for other in cell):
        raise ValueError("A pass trains the points of one cell: configs may differ in lr, weight decay and tag only.")
    first = validate_config(configs[0])  # the others differ in lr and wd, which the search checked at its extremes
    configs = [replace(first, lr=cfg.lr, weight_decay=cfg.weight_decay, tag=cfg.tag) for cfg in configs]
    one_pass = replace(first, tag=name, devices="1", num_nodes=1, strategy="auto")
    started = time.time()
    claims, results = [], []
    try:
        for cfg in configs:
            run_id = cfg.run_id()
            path = result_path(cfg.results_dir, run_id)
            seen = read_result(path)
            claim = RunClaim(cfg.results_dir, run_id)
            if not claim.acquire():
                results.append(claimed_result(cfg, run_id, path, claim.refused_by, started))
                continue
            claims.append(claim)
            results.append(finished_meanwhile(path, seen, cfg.force))
        mine = [cfg for cfg, result in zip(configs, results, strict=True) if result is None]
        trained = train_heads(first, mine, one_pass, started) if mine else []
        if trained is None:
            return None
        left = iter(trained)
        return [result if result is not None else next(left) for result in results]
    finally:
        for claim in claims:
            claim.release()


def train_heads(first: RunConfig, configs: list[RunConfig], one_pass: RunConfig, started: float) -> list[dict] | None:
    """The pass of `train_in_one_pass` over the points `configs` (claimed by this process), on `first`'s data."""
    try:
        L.seed_everything(first.seed, workers=True, verbose=False)
        # As a single run: the trainer, then the model (the same seed gives every point the same initial head).
        trainer = make_trainer(one_pass)
        model, datamodule = prepare(first)
        if not (can_cache(model, datamodule) and isinstance(model.backbone.head, nn.Linear)):
            return None
        # One split record for all points (the split depends on dataset, fraction, seed and train_on only).
        atomic_write_json(split_path(first.results_dir, one_pass.run_id()), datamodule.split_record())
        cached = with_feature_cache(first, model, datamodule, trainer)
        grid = HeadGrid(model.backbone.head, [(cfg.lr, cfg.weight_decay) for cfg in configs], model.optim)
        trainer.fit(grid, datamodule=cached)
        trainer.test(grid, datamodule=cached, verbose=False)
    except Exception as err:  # noqa: BLE001 — recorded for every point, as benchmark.core.pipeline records a failed run
        finish_open_run(failed=True)
        return [record_failure(cfg, result_path(cfg.results_dir, cfg.run_id()), started, err) for cfg in configs]
    finish_open_run(failed=False)
    seconds = time.time() - started
    shared = run_record(first, started) | {
        "wall_seconds": seconds / len(configs),
        "one_pass": {"heads": len(configs), "wall_seconds": seconds, "run_id": one_pass.run_id()},
        "n_train": datamodule.n_train, "num_classes": datamodule.num_classes, "tuned_params": model.tuned_params,
        "total_params": model.total_params, "tuned_percent": 100 * model.tuned_params / model.total_params,
        "log_dir": attempt_log_dir(one_pass, trainer), "world_size": 1,
        # A head of a shared pass keeps no weights, predictions or curves of its own yet (issue 28): said, not absent.
        "checkpoint": None, "checkpoint_bytes": None, "checkpoint_sha256": None, "predictions": None,
        "predictions_bytes": None, "curves": None}
    results = []
    for n, cfg in enumerate(configs):
        result = shared | {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        error = grid.failure(n)
        if error is None:
            result |= {"val_top1": float(grid.val_acc[n]) * 100, "test_top1": float(grid.test_acc[n]) * 100,
                       "status": "ok"}
        else:
            result |= {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        results.append(result | {"config": asdict(cfg)})
        atomic_write_json(result_path(cfg.results_dir, cfg.run_id()), results[-1])
    return results
