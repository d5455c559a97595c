"""The one LightningModule every tuning protocol shares.

A method only decides what trains and what is added to the backbone (`adapt`, and `forward_features`
when it changes the token sequence). Step, metrics, optimizer and schedule live here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import lightning as L
import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from backbones import Family, family_of
from methods.options import Options
from methods.registry import methods_for_family

# Accepted ranges: wide enough for every recipe of the paper (SGD base lrs up to 50, scaled by batch/256), narrow
# enough to catch a slipped exponent; AdamW steps are ~lr per weight, so above 1 it diverges at once.
LR_MAX = {"sgd": 1_000.0, "adamw": 1.0}
WEIGHT_DECAY_MAX = 1.0
EPOCHS_RANGE = (1, 10_000)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class OptimConfig:
    """How the tuned parameters are optimised; filled from a recipe (benchmark/recipes). It owns the ranges of its
    values: benchmark.core.validate reports `problems()` before a run, this raises them if a caller skips that."""

    optimizer: str = "sgd"  # "sgd" (momentum, no Nesterov: the VPT code) or "adamw"
    lr: float = 0.01  # the actual learning rate; recipes apply the base_lr * batch / 256 rule before
    weight_decay: float = 0.0  # on weights and prompts; biases, norms and position embeddings get none (timm rule)
    momentum: float = 0.9  # SGD only
    warmup_epochs: float = 1.0  # linear warmup, starts above 0 so the first epoch learns
    max_epochs: int = 10

    def __post_init__(self):
        problems = optim_problems(self.optimizer, self.lr, self.weight_decay, self.warmup_epochs, self.max_epochs)
        if problems:
            raise ValueError(" ".join(problems))


def optim_problems(optimizer, lr, weight_decay, warmup_epochs, max_epochs) -> list[str]:
    """Each value out of its range, named as a run's settings name it (EPOCHS, LR, WD)."""
    found = []
    low, high = EPOCHS_RANGE
    if not (isinstance(max_epochs, int) and not isinstance(max_epochs, bool) and low <= max_epochs <= high):
        found.append(f"EPOCHS must be an integer in [{low}, {high:,}], got {max_epochs!r}.")
    if optimizer not in LR_MAX:
        found.append(f"optimizer must be one of {', '.join(LR_MAX)}, got {optimizer!r}.")
    elif not (is_number(lr) and 0 < lr <= LR_MAX[optimizer]):
        found.append(f"LR must be in (0, {LR_MAX[optimizer]:g}] for {optimizer}, got {lr!r}.")
    if not (is_number(weight_decay) and 0 <= weight_decay <= WEIGHT_DECAY_MAX):
        found.append(f"weight decay must be in [0, {WEIGHT_DECAY_MAX:g}], got {weight_decay!r}.")
    if not (is_number(warmup_epochs) and warmup_epochs >= 0):
        found.append(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}.")
    return found


@dataclass
class NoOptions(Options):
    """For methods with nothing to configure."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup from 1/warmup (never 0, unlike the VPT code's first epoch) then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fused_if_supported(module: nn.Module) -> dict:
    """torch's fused (one-kernel) SGD/AdamW update where every trained tensor allows it: the same update as the
    per-tensor loop (equal within float rounding), ~5x less time on CPU for the embedded ViT's ~150 tensors."""
    trained = [p for p in module.parameters() if p.requires_grad]
    supported = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    for p in trained)
    return {"fused": True} if trained and supported else {}


HEAD_INITS = ("pytorch", "vpt")
# The VPT code's head bias (src/models/mlp.py, special_bias): -log((1 - 0.01) / 0.01), a prior of 1% per class.
VPT_HEAD_BIAS = -math.log((1 - 0.01) / 0.01)


def init_head(layer: nn.Linear, head_init: str) -> None:
    """"pytorch": nn.Linear's own init (uniform, bound 1/sqrt(fan_in)). "vpt": the VPT code's head, Kaiming-normal
    weights over fan-out (std sqrt(2 / num_classes)) and a constant bias; a constant bias shifts every logit alike,
    so only the weights change what trains."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}.")
    if head_init == "vpt":
        nn.init.kaiming_normal_(layer.weight, a=0, mode="fan_out")
        nn.init.constant_(layer.bias, VPT_HEAD_BIAS)


class UnsupportedBackbone(ValueError):
    """A method asked to wrap a backbone family it is not defined for."""


def check_family(cls: type[TuningModule], backbone: nn.Module) -> Family:
    """The row of `backbone`'s family (backbones.FAMILIES), when `cls` declares it; else UnsupportedBackbone."""
    family = family_of(backbone)
    name = family.name if family else None
    if name not in cls.families:
        others = methods_for_family(name) if name else []
        raise UnsupportedBackbone(
            f"Method {cls.method_name!r} does not support {name or 'this'} backbones (a timm "
            f"{type(backbone).__name__}); it supports: {', '.join(cls.families)}."
            + (f" Methods for {name}: {', '.join(others)}." if others else ""))
    return family


class TuningModule(L.LightningModule):
    """A timm backbone (a plain ViT unless the method declares other `families`) with a new head; subclasses
    choose what trains.

    Train/eval mode: a method that freezes the backbone (every method but `full`) keeps every pretrained backbone
    module in eval mode while training, so dropout or drop-path of a backbone built with them never act on it — the
    VPT code does the same (`froze_enc` for linear, partial, bias, adapter; the prompt ViT's `train()` override).
    Only the modules a method adds (the head, prompt dropout, adapters) follow `train()` / `eval()`.
    """

    method_name: ClassVar[str] = ""  # set by @register_method
    options_cls: ClassVar[type[Options]] = NoOptions  # a methods.options.Options dataclass: each field checked
    # What figures and tables show, owned here and read through the registry (methods.registry: label, color,
    # table_order, fig3_methods).
    label: ClassVar[str] = ""  # e.g. "VPT-deep"; "" = the registered name
    color: ClassVar[str] = "#7f7f7f"
    paper_row: ClassVar[int | None] = None  # row in VPT's Table 1 (Jia et al., 2022); None: not in the paper
    in_fig3: ClassVar[bool] = False  # one of the six protocols of the paper's Fig. 3, the default grid
    frozen_backbone: ClassVar[bool] = True  # False: the pretrained modules train, in train mode (full fine-tuning)
    # True where the method's paper starts from the pretrained function (zero-init branches, unit scales): its
    # features equal the plain backbone's before any step (tests/methods/test_zoo_contract.py checks every method).
    identity_at_init: ClassVar[bool] = True
    # The backbone families (backbones.FAMILIES) the method is defined for; any other is refused before a
    # model is built (benchmark.core.validate builds on the meta device) with the families it supports named.
    families: ClassVar[tuple[str, ...]] = ("vit",)
    # True where the method decides what it tunes from the run's training data before the first step (SCT's salient
    # channels, GPS's gradient-chosen weights): `select_from_data` then gets the run's training loader once, in
    # Lightning's `on_train_start` (after the optimizer is built: a selection fills index buffers, never changes which
    # tensors train, so the optimizer and `tuned_params` are fixed from construction on).
    selects_from_data: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, num_classes: int, optim: OptimConfig | None = None,
                 options: Any = None, *, head_init: str = "pytorch"):
        super().__init__()
        self.family = check_family(type(self), backbone)  # the row a method reads: blocks, widths, targets
        self.backbone = backbone
        pretrained = list(backbone.modules())  # before the new head and whatever the method adds
        self.backbone.reset_classifier(num_classes)
        self.num_classes = num_classes
        self.optim = optim or OptimConfig()
        self.options = options if options is not None else self.options_cls()
        self.backbone.requires_grad_(False)
        self.adapt()
        if self.selects_from_data:  # saved with the tuned tensors: a rebuilt model keeps its selection
            self.register_buffer("selected", torch.tensor(False))
        self.backbone.get_classifier().requires_grad_(True)  # every protocol trains a fresh head
        init_head(self.classifier_layer(), head_init)
        # A plain list (not registered as submodules): only the train() override below reads it.
        in_model = {id(m) for m in self.backbone.modules()}
        self.pretrained_modules = [m for m in pretrained if id(m) in in_model] if self.frozen_backbone else []
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def from_options(cls, backbone: nn.Module, num_classes: int, optim: OptimConfig | None = None, *,
                     head_init: str = "pytorch", **options) -> TuningModule:
        valid = {f.name for f in fields(cls.options_cls)}
        unknown = set(options) - valid
        if unknown:
            raise ValueError(f"Method {cls.method_name!r} has no option(s) {sorted(unknown)}; "
                             f"its options are: {sorted(valid) or 'none'}.")
        return cls(backbone, num_classes, optim, cls.options_cls(**options), head_init=head_init)

    def classifier_layer(self) -> nn.Linear:
        """The Linear that produces the logits: the head itself, or the last layer of a deeper head (mlp_k)."""
        return [m for m in self.backbone.get_classifier().modules() if isinstance(m, nn.Linear)][-1]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # pretrained modules of a frozen backbone stay in eval mode (see the class docstring)
            for module in self.pretrained_modules:
                module.training = False
        return self

    # --- what a method changes -------------------------------------------------------------------
    def adapt(self) -> None:
        """Unfreeze or add parameters. The backbone arrives fully frozen; the head is unfrozen after."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # (B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.forward_features(x))  # (B, C)

    def select_from_data(self, loader) -> None:
        """Choose what trains from the training data (`selects_from_data` methods): `loader` yields batches as the
        run's training loader does; `batch_on_device` moves one as a training step gets it."""
        raise NotImplementedError(f"{type(self).__name__} sets selects_from_data but defines no select_from_data.")

    def batch_on_device(self, batch):
        """A loader's batch as a training step sees it: on this module's device, through the datamodule's transfer
        hooks (the image cache crops there) when a Trainer runs the module."""
        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # Lightning's word for "not attached to a Trainer"
            return [t.to(self.device) if isinstance(t, torch.Tensor) else t for t in batch]
        return strategy.batch_to_device(batch)

    def summed_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` added over a multi-process run's processes (each saw its share of the data); as is in one."""
        try:
            return self.trainer.strategy.reduce(tensor, reduce_op="sum")
        except RuntimeError:  # not attached to a Trainer
            return tensor

    def on_train_start(self) -> None:
        # the training loader exists from here on (Lightning sets it up after on_fit_start); a rebuilt or resumed
        # model whose selection was saved (`selected`) keeps it
        if self.selects_from_data and not bool(self.selected):
            self.select_from_data(self.trainer.train_dataloader)
            self.selected.fill_(True)

    # --- parameter accounting --------------------------------------------------------------------
    @property
    def tuned_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_summary(self) -> str:
        """peft's standard line."""
        tuned, total = self.tuned_params, self.total_params
        return f"trainable params: {tuned:,d} || all params: {total:,d} || trainable%: {100 * tuned / total:.4f}"

    def no_weight_decay(self) -> set[str]:
        # timm's ResNet and ConvNeXt define none: every weight there decays (biases and norms never do)
        exempt = getattr(self.backbone, "no_weight_decay", set)()
        return {f"backbone.{name}" for name in exempt}

    # --- Lightning -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            print(self.param_summary())

    def model_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        return self.criterion(logits, labels), logits.argmax(dim=1), labels

    def training_step(self, batch, batch_idx):
        loss, preds, labels = self.model_step(batch)
        self.train_acc.update(preds, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, preds, labels = self.model_step(batch)
        self.val_acc.update(preds, labels)
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        loss, preds, labels = self.model_step(batch)
        self.test_acc.update(preds, labels)
        self.log("test/loss", loss, on_step=False, on_epoch=True, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self.log_epoch_metric("train/acc", self.train_acc)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metric("val/acc", self.val_acc, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metric("test/acc", self.test_acc)

    def log_epoch_metric(self, name: str, metric, prog_bar: bool = False) -> None:
        """Log a torchmetrics metric once per epoch: Lightning computes it over the epoch's updates (summing the
        counts over all processes, in the same order on every rank as its other epoch-end reductions) and resets it.

        Why not `self.log(name, metric)` in each step: Lightning then moves the Metric module to the device and
        walks its state on every call (~1 ms each on the 2-core CPU, measured), which is most of an epoch for the
        linear probe on cached features. Why not `metric.compute()` here: in a multi-process run that gathers
        across processes at once, out of step with the reductions rank 0's progress bar has already started.
        """
        self.log(name, metric, prog_bar=prog_bar)

    def configure_optimizers(self):
        # timm's factory skips frozen parameters and exempts biases/norms (and no_weight_decay()) from decay.
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        optimizer, schedule = optimizer_and_schedule(self, self.optim, total_steps, **fused_if_supported(self))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def optimizer_and_schedule(params, optim: OptimConfig, total_steps: int, **kwargs):
    """`optim`'s optimizer over `params` (a module, or parameter groups that each set their own lr and weight decay)
    and its per-update warmup + cosine schedule, which scales every group's own lr."""
    # timm's "momentum" is plain SGD with momentum; its "sgd" would be Nesterov, which the VPT code does not use.
    optimizer = create_optimizer_v2(params, opt="momentum" if optim.optimizer == "sgd" else "adamw", lr=optim.lr,
                                    weight_decay=optim.weight_decay, momentum=optim.momentum, **kwargs)
    warmup_steps = int(round(total_steps * optim.warmup_epochs / max(1, optim.max_epochs)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
    return optimizer, schedule


class MergeForEvalTuning(TuningModule):
    """A method whose trained update folds into copies of the frozen weights while it evaluates (LoRA, SSF,
    RepAdapter): one matmul per layer instead of two, the pretrained tensors never written, and training always
    reading the unmerged layers.

    Subclasses list their layers in `mergeable_layers()` (each has `merge()` and `unmerge()`) and give their options
    a `merge_for_eval` switch. Lightning puts the module in eval mode before the *_start hooks and back in train mode
    (which unmerges) after fit's validation; the *_end hooks free the merged copies once evaluation is done.
    """

    def mergeable_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def merge_layers(self) -> None:
        """Fold the update into every layer's copy; valid until the next `unmerge_layers` or `train()`."""
        for layer in self.mergeable_layers():
            layer.merge()

    def unmerge_layers(self) -> None:
        for layer in self.mergeable_layers():
            layer.unmerge()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # the tuned tensors are about to change: a merged copy would go stale
            self.unmerge_layers()
        return self

    def merge_if_enabled(self) -> None:
        if self.options.merge_for_eval:
            self.merge_layers()

    def on_validation_start(self) -> None:
        self.merge_if_enabled()

    def on_test_start(self) -> None:
        self.merge_if_enabled()

    def on_predict_start(self) -> None:
        self.merge_if_enabled()

    def on_validation_end(self) -> None:
        self.unmerge_layers()

    def on_test_end(self) -> None:
        self.unmerge_layers()

    def on_predict_end(self) -> None:
        self.unmerge_layers()
