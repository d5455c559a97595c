"""Lightning callbacks of the benchmark runner."""

from __future__ import annotations

import lightning as L
import torch


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
