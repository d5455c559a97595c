"""Training and evaluating a tuning method in tests: a few SGD steps, what moves, the identity at init, a real
Trainer's evaluation with the logits it saw, and a linear probe on the pattern data."""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from backbones import data_config
from methods import OptimConfig, create_method
from tests.helpers.data import PatternDataModule
from tests.helpers.models import make_tiny_vit


def train_steps(model, batch, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _, _ = model.model_step(batch)
        loss.backward()
        optimizer.step()


def assert_identity_at_init(method: str, images: torch.Tensor, **options) -> None:
    """A fresh method's features equal the plain backbone's, bit for bit (zero-init branches)."""
    torch.manual_seed(0)
    plain = make_tiny_vit().eval()
    model = create_method(method, copy.deepcopy(plain), num_classes=3, **options).eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), plain.forward_features(images))


def assert_trains_exactly(model, batch, added: set[str]) -> None:
    """`added` plus the head is what requires grad; after two steps exactly those moved, the rest bit-identical."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == added | {"backbone.head.weight", "backbone.head.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch)  # two steps: `down` only sees error once `up` left zero
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained


class CaptureLogits(L.Callback):
    """Every validation and test batch's logits, and whether the method held its merged (folded) weights while
    computing them: `is_merged(module)` says how a method shows that (LoRA's merged_weight, SSF's merged, ...)."""

    def __init__(self, is_merged: Callable[[L.LightningModule], bool]):
        self.is_merged = is_merged
        self.logits, self.merged = [], set()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record(module, batch)

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record(module, batch)

    def record(self, module, batch):
        self.merged.add(self.is_merged(module))
        with torch.no_grad():
            self.logits.append(module(batch[0]))


def evaluate(model, data, tmp_path, is_merged: Callable[[L.LightningModule], bool], *,
             test: bool = True) -> tuple[dict, torch.Tensor, set]:
    """Validate (then test, unless `test=False`) `model` on `data` under a real CPU Trainer: (the metrics, every
    batch's logits, the merged states seen while computing them)."""
    capture = CaptureLogits(is_merged)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[capture], default_root_dir=tmp_path)
    metrics = trainer.validate(model, DataLoader(data, batch_size=4), verbose=False)[0]
    if test:
        metrics |= trainer.test(model, DataLoader(data, batch_size=4), verbose=False)[0]
    return metrics, torch.cat(capture.logits), capture.merged


def setup_probe(train_fraction: float = 0.5, seed: int = 0, datamodule_cls=PatternDataModule, **config_overrides):
    """A linear probe on a tiny ViT (SGD, lr 0.5, 4 epochs, no warmup) and its set-up pattern datamodule."""
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    datamodule = datamodule_cls(data_config={**data_config(backbone), **config_overrides},
                                train_fraction=train_fraction, seed=seed, batch_size=8, eval_batch_size=16)
    datamodule.setup()
    optim = OptimConfig(optimizer="sgd", lr=0.5, max_epochs=4, warmup_epochs=0)
    return create_method("linear", backbone, datamodule.num_classes, optim), datamodule
