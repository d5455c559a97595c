"""The linear probe on cached features, trained by a plain loop instead of Lightning's Trainer (one process).

Why a hand-written loop here, and only here: on cached features an epoch of the probe is a few head updates of
~0.15 ms each, while Lightning's per-epoch machinery (the training and validation loops and their hooks, four
`self.log` calls that each walk the result collection, the validation loop's capture and restore of every
module's train/eval mode) costs ~6 ms on the 2-core CPU whatever the work: 100 epochs at fraction 0.1 spent ~90%
of the run in it (measured; README "Performance"). Everything else stays the ecosystem's: the same cached
loaders and shuffling generator, the method's own updates (`LinearProbe.whole_epoch_updates`), timm's optimizer
and torch's schedule (`optimizer_and_schedule`), torchmetrics for the accuracies, and the run's Lightning loggers
(CSV, W&B) receiving the same metrics at the same steps as from the Trainer. tests/test_probe_loop.py checks it
against `Trainer.fit` + `Trainer.test` on the same features.

Used only where it reproduces the Trainer exactly: one process, whole-epoch batches, fp32 (no autocast).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.loggers import Logger
from torchmetrics import Metric
from tqdm.auto import tqdm

from benchmark.callbacks import non_finite_loss_error
from benchmark.feature_cache import CachedFeatureDataModule


def can_train_outside_trainer(model, datamodule, precision: str | None) -> bool:
    """A whole-epoch linear probe on cached features in fp32 (what the loop reproduces)."""
    return (isinstance(datamodule, CachedFeatureDataModule) and datamodule.whole_epochs
            and getattr(model, "minibatch_size", None) is not None
            and str(precision or "32") in ("32", "32-true"))


def fit_and_test(model, datamodule: CachedFeatureDataModule, epochs: int, loggers: list[Logger] = (),
                 progress_bar: bool = True) -> dict[str, float]:
    """Train the head for `epochs` on the cached training features, validating every epoch, then test.

    Returns the last epoch's metrics and the test metrics ({"train/loss", "train/acc", "val/loss", "val/acc",
    "test/loss", "test/acc"}), as `trainer.callback_metrics` and `trainer.test` would give them.
    Raises NonFiniteLossError (benchmark/callbacks.py) on a NaN/inf training loss, as StopOnNonFiniteLoss does.
    """
    datamodule.setup("fit")  # one thread for these tiny ops (CachedFeatureDataModule.setup says why)
    try:
        train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
        optimizer, schedule = model.optimizer_and_schedule(max(1, epochs * model.updates_per_epoch))
        print(model.param_summary())
        metrics: dict[str, float] = {}
        bar = tqdm(range(epochs), desc="Epochs", unit="epoch", disable=not progress_bar, dynamic_ncols=True)
        for epoch in bar:
            model.train()
            for features, labels in train_loader:  # one batch: the whole epoch in the loader's shuffled order
                loss, logits = model.whole_epoch_updates(features, labels, optimizer, schedule)
            train_loss = loss.item()
            if not math.isfinite(train_loss):  # the epoch is the loader's one batch, as the Trainer counts it
                raise non_finite_loss_error(epoch, "batch 0", train_loss)
            train = {"train/loss": train_loss, "train/acc": accuracy(model.train_acc, logits, labels)}
            val = evaluate(model, val_loader, "val", model.val_acc)
            # The Trainer's order and steps: the validation row, then the training row, both at step = epoch.
            log(loggers, val, epoch)
            log(loggers, train, epoch)
            metrics = train | val
            bar.set_postfix({"val/acc": f"{val['val/acc']:.3f}", "train/loss": f"{train['train/loss']:.3g}"},
                            refresh=False)
        bar.close()
        test = evaluate(model, datamodule.test_dataloader(), "test", model.test_acc)
        log(loggers, test, epochs)
        for logger in loggers:
            logger.finalize("success")
        return metrics | test
    finally:
        datamodule.teardown("fit")


def accuracy(metric: Metric, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The torchmetrics accuracy over one epoch's predictions, then reset (as Lightning's epoch-end logging)."""
    metric.update(logits.argmax(dim=1), labels)
    value = metric.compute().item()
    metric.reset()
    return value


@torch.inference_mode()
def evaluate(model, loader, stage: str, metric: Metric) -> dict[str, float]:
    """Mean loss (weighted by batch size, as Lightning's epoch mean of `self.log`) and accuracy over a split."""
    model.eval()
    loss_sum, count, all_logits, all_labels = 0.0, 0, [], []
    for features, labels in loader:
        logits = model(features)
        loss_sum += model.criterion(logits, labels).item() * len(labels)  # the method's own loss, as model_step
        count += len(labels)
        all_logits.append(logits)
        all_labels.append(labels)
    return {f"{stage}/loss": loss_sum / count,
            f"{stage}/acc": accuracy(metric, torch.cat(all_logits), torch.cat(all_labels))}


def log(loggers, metrics: dict[str, float], epoch: int) -> None:
    for logger in loggers:
        logger.log_metrics(metrics | {"epoch": epoch}, step=epoch)
        logger.save()
