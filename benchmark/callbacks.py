"""Lightning callbacks of the benchmark runner."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run is recorded as failed with this message."""


def non_finite_loss_error(epoch: int, where: str, last_loss: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"non-finite training loss in epoch {epoch}, {where} (last loss {last_loss}); the run was stopped. "
        "Usual causes: a learning rate too high for this method (lower LR), or NaN/inf in the input data.")


class StopOnNonFiniteLoss(L.Callback):
    """Stop training at the first NaN/inf training loss instead of finishing the epochs on garbage weights.

    Lightning's own options do not fit: `detect_anomaly` is autograd's anomaly mode (several times slower,
    meant for debugging) and `EarlyStopping(check_finite=True)` looks only at a validation metric at epoch
    end and stops "successfully". Here the loss is tested every `check_every_n_steps` steps: the per-step
    finiteness flags accumulate on the device and are read back at most once per window, so on a GPU the
    check adds no host synchronisation to most steps.
    """

    def __init__(self, check_every_n_steps: int = 1):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}.")
        self.check_every_n_steps = check_every_n_steps
        self._all_finite: torch.Tensor | None = None
        self._first_batch = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        finite = torch.isfinite(loss.detach()).all()
        if self._all_finite is None:
            self._all_finite, self._first_batch = finite, batch_idx
        else:
            self._all_finite = self._all_finite & finite
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if (batch_idx + 1) % self.check_every_n_steps == 0 or last_of_epoch:
            self._raise_if_nonfinite(trainer, batch_idx, float(loss.detach().float()))

    def _raise_if_nonfinite(self, trainer: L.Trainer, batch_idx: int, last_loss: float) -> None:
        all_finite, self._all_finite = bool(self._all_finite), None
        if not all_finite:
            first = self._first_batch
            where = f"batch {batch_idx}" if batch_idx == first else f"batches {first}-{batch_idx}"
            raise non_finite_loss_error(trainer.current_epoch, where, last_loss)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, counting epochs instead of batches when every epoch is a single batch.

    The linear probe on cached features takes each epoch as one batch (methods/linear.py), and then an epoch
    takes a few milliseconds: the per-batch bar, redrawn and reset every epoch beside a validation bar opened
    and closed every epoch, cost about as much as the training itself (measured: ~2 ms per epoch). In that case
    this bar shows `Epochs 37/100` with the latest metrics, through tqdm's own rate-limited updates, and no
    validation bars during fit. Any other run gets Lightning's bar unchanged.
    """

    counts_epochs = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.counts_epochs = trainer.num_training_batches == 1 and (trainer.max_epochs or 0) > 1
        if self.counts_epochs:
            self.train_progress_bar.reset(total=trainer.max_epochs - trainer.current_epoch)
            self.train_progress_bar.set_description("Epochs")

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if not self.counts_epochs:
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if not self.counts_epochs:
            super().on_train_batch_end(*args, **kwargs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.counts_epochs:
            return super().on_train_epoch_end(trainer, pl_module)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        self.train_progress_bar.update(1)  # tqdm redraws at most every `mininterval` seconds

    def in_fit_by_epochs(self, trainer: L.Trainer) -> bool:
        return self.counts_epochs and trainer.state.fn == "fit"

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.in_fit_by_epochs(trainer):
            super().on_validation_start(trainer, pl_module)

    def on_validation_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if not self.in_fit_by_epochs(trainer):
            super().on_validation_batch_start(trainer, *args, **kwargs)

    def on_validation_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if not self.in_fit_by_epochs(trainer):
            super().on_validation_batch_end(trainer, *args, **kwargs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.in_fit_by_epochs(trainer):
            super().on_validation_end(trainer, pl_module)
