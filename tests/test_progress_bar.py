"""The suite's progress bar: epochs when every epoch is one batch, Lightning's per-batch bar otherwise."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmark.callbacks import EpochProgressBar


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_with_bar(batches_per_epoch: int, epochs: int = 5) -> tuple[EpochProgressBar, L.Trainer]:
    data = DataLoader(TensorDataset(torch.randn(4 * batches_per_epoch, 4)), batch_size=4)
    bar = EpochProgressBar()
    trainer = L.Trainer(max_epochs=epochs, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(TinyRegression(), data, data)
    return bar, trainer


def test_one_batch_per_epoch_counts_epochs_with_the_latest_metrics():
    bar, trainer = fit_with_bar(batches_per_epoch=1, epochs=5)
    assert bar.counts_epochs
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (5, 5)
    assert bar.train_progress_bar.desc.startswith("Epochs")
    assert "train/loss=" in bar.train_progress_bar.postfix and "val/loss=" in bar.train_progress_bar.postfix


def test_several_batches_per_epoch_keep_lightnings_bar():
    bar, trainer = fit_with_bar(batches_per_epoch=3, epochs=2)
    assert not bar.counts_epochs
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
    assert bar.train_progress_bar.desc.startswith("Epoch 1")
