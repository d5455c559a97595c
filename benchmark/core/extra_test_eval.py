"""The extra test sets of a run (EXTRA_TEST=name=dir,...: the domain-shift protocol, datamodules/extra_test_sets.py),
evaluated after training with Lightning's multiple test dataloaders: one `trainer.test` over a list of loaders, one
accuracy per loader. A set that holds only some of the training classes is scored with its logits restricted to
those classes (ImageNet-A / -R: 200 of ImageNet's 1,000)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from benchmark.core.distributed import each_example_once
from datamodules.base import FractionDataModule
from datamodules.extra_test_sets import restricted_argmax


def result_key(name: str) -> str:
    """The flat result field (and summary.csv column) of an extra test set's top-1."""
    return f"extra_test/{name}/top1"


class ExtraTestEvaluation(L.LightningModule):
    """Wraps a trained model for `trainer.test` over the extra sets' loaders: loader n's predictions are the argmax
    over set n's classes, scored by its own torchmetrics accuracy (summed over processes when Lightning computes it).
    """

    def __init__(self, model: nn.Module, names: list[str], allowed: list[torch.Tensor], num_classes: int):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.register_buffer("allowed", torch.stack(allowed), persistent=False)  # (sets, C) bool
        self.accuracies = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in names)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images, labels = batch
        self.accuracies[dataloader_idx].update(restricted_argmax(self.model(images), self.allowed[dataloader_idx]),
                                               labels)

    def on_test_epoch_end(self) -> None:
        for name, accuracy in zip(self.names, self.accuracies, strict=True):
            self.log(result_key(name), accuracy, add_dataloader_idx=False)


def evaluate_extra_tests(trainer: L.Trainer, model: nn.Module, datamodule: FractionDataModule) -> dict:
    """{`extra_test/<name>/top1`: %, ...} plus `extra_test`: each set's folder, size, classes and whether its logits
    were restricted; {} when the run has no extra test sets."""
    sets = datamodule.extra_tests
    if not sets:
        return {}
    if getattr(model, "inputs_are_features", False):  # a linear probe trained on cached features reads images again
        model.read_features(False)
    evaluation = ExtraTestEvaluation(model, list(sets), [s.allowed() for s in sets.values()], datamodule.num_classes)
    loaders = [each_example_once(loader, trainer.world_size, trainer.global_rank)
               for loader in datamodule.extra_test_dataloaders()]
    trainer.test(evaluation, dataloaders=loaders, verbose=False)
    top1 = {result_key(name): float(trainer.callback_metrics[result_key(name)]) * 100 for name in sets}
    return top1 | {"extra_test": {name: {"folder": s.folder, "n": len(s.split.labels), "classes": len(s.classes),
                                         "restricted": s.restricted} for name, s in sets.items()}}
