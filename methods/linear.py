"""Linear probe: only the new head trains (the paper's LINEAR baseline).

The frozen backbone runs in eval mode under `torch.inference_mode`: no autograd graph and no saved
activations for it, so a linear-probe step costs one inference forward plus a matmul.

Everything before the head is a fixed function of the image, so its output (the pooled, normed
"pre-logits") can be computed once and cached (benchmark/feature_cache.py): `read_features(True)` makes the
module take those (B, D) features as input instead of images, and the head sees exactly the same values.

On cached features a step is a (B, D) x (D, C) matmul: microseconds of work under milliseconds of Lightning's
per-batch machinery (hooks, logging, progress bar). `read_features(True, minibatch_size=B)` therefore takes one
loader batch per epoch, the whole shuffled training set, and makes the same SGD updates on its consecutive
B-sized slices inside one training_step (Lightning's manual optimization): same batches, same order, same
optimizer and per-update schedule as one Lightning step per minibatch, at a fraction of the overhead. For the
usual linear head under cross-entropy the slices' gradients are written in closed form instead of through
autograd (`head_backward_closed_form`, which says why); torch's optimizer and scheduler still make every update.
In one process in fp32 a run drives these same updates from a plain loop instead of the Trainer
(benchmark/probe_loop.py says why).
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import TuningModule
from methods.registry import register_method


def no_autograd():
    """inference_mode, or no_grad inside torch.compile (which cannot trace inference mode): either way no graph
    and no saved activations for the frozen backbone."""
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()


@register_method("linear")
class LinearProbe(TuningModule):
    label, color, paper_row, in_fig3 = "Linear", "#1f77b4", 1, True
    trains_on_frozen_features: ClassVar[bool] = True  # a feature cache may stand in for the backbone
    inputs_are_features: bool = False
    minibatch_size: int | None = None  # set: each training batch is a whole epoch, updated in slices of this size
    updates_per_epoch: int = 1

    def train(self, mode: bool = True):
        # The frozen backbone (head included: it has no dropout of its own) stays in eval mode, so dropout and
        # drop-path never touch the features; skipping it here also spares Lightning's twice-per-epoch mode
        # switches a walk over every backbone module, which is most of an epoch on cached features.
        self.training = mode
        for child in self.children():
            if child is not self.backbone:
                child.train(mode)
        if self.backbone.training:
            self.backbone.eval()
        return self

    def read_features(self, enabled: bool = True, minibatch_size: int | None = None, n_train: int = 0) -> None:
        """Take cached pre-logit features (B, D) as input instead of images (B, C, H, W).

        With `minibatch_size`, each training batch is one epoch of `n_train` features in loader order, and the
        head makes one optimizer update per `minibatch_size` slice of it (see the module docstring).
        """
        if minibatch_size is not None and not (enabled and minibatch_size > 0 and n_train > 0):
            raise ValueError(f"Whole-epoch batches need enabled=True, minibatch_size > 0 and n_train > 0; got "
                             f"enabled={enabled}, minibatch_size={minibatch_size}, n_train={n_train}.")
        self.inputs_are_features = enabled
        self.minibatch_size = minibatch_size
        self.updates_per_epoch = math.ceil(n_train / minibatch_size) if minibatch_size else 1
        self.automatic_optimization = minibatch_size is None

    def optimizer_updates_per_batch(self) -> int:
        return self.updates_per_epoch

    def training_step(self, batch, batch_idx):
        if self.minibatch_size is None:
            return super().training_step(batch, batch_idx)
        features, labels = batch
        loss, logits = self.whole_epoch_updates(features, labels, self.optimizers(), self.lr_schedulers())
        self.train_acc.update(logits.argmax(dim=1), labels)  # one update: the counts are the same
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(labels))
        return loss

    def whole_epoch_updates(self, features: torch.Tensor, labels: torch.Tensor, optimizer, schedule):
        """Lightning's automatic step (training_step, zero_grad, backward, optimizer step, then the per-step
        scheduler) once per minibatch slice of the epoch; returns what the per-minibatch steps would log: the
        size-weighted mean loss, and every row's logits (each from the weights before its own update)."""
        closed_form = self.head_gradient_has_closed_form(features)
        targets = F.one_hot(labels, self.num_classes).to(features.dtype) if closed_form else labels
        all_logits, weighted_losses = [], []
        for x, y in zip(features.split(self.minibatch_size), targets.split(self.minibatch_size), strict=True):
            if closed_form:  # assigns .grad outright: nothing to zero first
                logits = self.head_backward_closed_form(x, y)
            else:
                optimizer.zero_grad()
                logits = self(x)
                loss = self.criterion(logits, y)
                if self._trainer is not None:  # in Lightning's loop: its backward (precision plugin, hooks)
                    self.manual_backward(loss)
                else:  # benchmark/probe_loop.py
                    loss.backward()
                weighted_losses.append(loss.detach() * len(x))
            optimizer.step()
            schedule.step()
            all_logits.append(logits.detach())
        logits = torch.cat(all_logits)
        # Where the closed form applies (plain mean cross-entropy), the size-weighted mean of the slices' mean
        # losses is the mean over all rows: one op per epoch instead of several per update.
        with torch.no_grad():
            loss = (self.criterion(logits, labels) if closed_form
                    else torch.stack(weighted_losses).sum() / len(labels))
        return loss, logits

    def head_gradient_has_closed_form(self, features: torch.Tensor) -> bool:
        """A linear head under plain mean cross-entropy, outside autocast: see head_backward_closed_form."""
        head, criterion = self.backbone.head, self.criterion
        return (isinstance(head, nn.Linear) and head.bias is not None and type(criterion) is nn.CrossEntropyLoss
                and criterion.weight is None and criterion.label_smoothing == 0 and criterion.reduction == "mean"
                and not torch.is_autocast_enabled(features.device.type))

    @torch.no_grad()
    def head_backward_closed_form(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Logits of one minibatch, with the head's gradients under mean cross-entropy written to .grad (what
        backward would).

        Why not autograd: for mean cross-entropy over softmax(x W^T + b) the gradient is known in closed form,
        dL/dlogits = (softmax - onehot) / B, so dL/dW = dlogits^T x and dL/db = dlogits summed over the batch.
        On a (64, D) x (D, C) head, autograd's backward costs ~150 us of engine overhead per update against ~30 us
        of arithmetic (measured on the 2-core CPU; 1,600 updates per 100 epochs made it a third of a cached run).
        Six ops, each ~10 us of dispatch here, so none is spent on the loss: whole_epoch_updates computes it once
        per epoch from the logits. torch's optimizer and scheduler still make the update; tests/test_feature_cache.py
        checks the result against autograd steps.
        """
        head = self.backbone.head
        logits = torch.addmm(head.bias, x, head.weight.t())
        grad_logits = logits.softmax(dim=1).sub_(onehot).div_(len(x))
        head.weight.grad = grad_logits.t() @ x
        head.bias.grad = grad_logits.sum(dim=0)
        return logits

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: pooled, normed backbone features (B, D), without autograd."""
        with no_autograd():
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with no_autograd():
            features = self.backbone.forward_features(x)
        # An inference tensor cannot be saved for the head's backward; a clone outside the mode can.
        return features.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inputs_are_features:
            x = self.frozen_features(x).clone()  # clone: leaves inference mode so the head can save it
        elif x.ndim != 2 or x.shape[1] != self.backbone.num_features:
            raise ValueError(f"With read_features(True) the linear probe takes (batch, {self.backbone.num_features}) "
                             f"features, got shape {tuple(x.shape)}; pass images after read_features(False).")
        return self.backbone.head(x)  # (B, C)
