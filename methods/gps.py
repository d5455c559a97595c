"""GPS: Gradient-based Parameter Selection (Zhang et al., CVPR 2024, https://arxiv.org/abs/2312.10136;
github:FightingFighting/GPS).

Before training, one pass over the training data accumulates the gradient of every pretrained weight; then, for each
neuron (a row of a weight: an output channel), the K input connections with the largest |gradient| are the only
entries of that weight that train. Follows the official code (train_gps.py `calculate_gradient`,
utils/pruning.py `prune_by_percentile_gradient_perCell`, utils/cuda.py masking the other entries' gradients, the
train_scripts' flags):
- Which parameters, by the code's name rule: names holding "norm", "pos_embed" or "cls_token" stay frozen (we add
  timm's "reg_token"); names holding "bias" or "gamma" (layer scale) train whole; every other weight (the patch
  projection, qkv, proj, fc1, fc2; on a Swin also each patch merge's reduction) trains K entries per row, a
  convolution's row being an output channel's in_channels * kh * kw inputs. On a Swin the relative-position bias
  tables hold "bias": they train whole, as the code's Swin does. The new head trains (the code's "head").
- The selection loss: the supervised contrastive loss (SupCon, temperature 0.07, features L2-normalised; the code's
  --contrastive, utils/loss_utils.py) on the pooled pre-logits features of two augmented views of each image (the
  code's --contrast-aug): here two draws of the run's training transform, one view per pass of two loaders over the
  training set in one shared shuffled order. `selection_loss="ce"`: cross-entropy through the fresh head instead
  (the paper's ablation). Gradients are summed over the whole epoch (one backward per batch, none cleared), then
  over processes.
- K: `per_neuron` (the code's --times_para: 1 for VTAB-1k, 1-2 per FGVC dataset; 2 for CUB).
- Training: the code zeroes the gradients of the unselected entries and trains the weights in place (Adam, weight
  decay 0). Ours keeps each pretrained weight frozen and trains a (rows, K) tensor `gps_delta` added at the selected
  entries (torch.nn.utils.parametrize): under Adam-type updates without decay the same steps, with exact counts
  and a checkpoint of only the trained values and their `gps_index`. A weight decay (the run's WD) pulls the delta
  toward zero, i.e. toward the pretrained value, where the code would decay the weight itself; its recipes use 0.
- Starts as the pretrained function (the deltas are zero).
- Before the selection pass (a model never trained, as in the contract tests) each row's first K entries are
  selected; a run always selects at the start of training, and a rebuilt model reads its saved selection.

Tuned at ViT-B/16 (12 blocks) with K = 1 and 200 classes: weights 768 (patch projection rows) + 12 * (2304 + 768 +
3072 + 768) = 83,712 entries, the same number of biases (norms excluded), and the head 153,800: 321,224.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method

FROZEN_NAMES = ("norm", "pos_embed", "cls_token", "reg_token")  # the code's frozen names, plus timm's register tokens
WHOLE_NAMES = ("bias", "gamma")  # trained whole in the code (after the frozen names are checked)
SUPCON_TEMPERATURE = 0.07  # the code's SupConLoss default (temperature = base_temperature)


@dataclass
class GPSOptions(Options):
    method = "gps"
    per_neuron: int = option(1, "K: weights selected per neuron (row) of each matrix (the code's --times_para: 1 on "
                             "VTAB-1k, 2 on CUB)", kind=int, positive=True, hint="official 1 or 2")
    selection_loss: str = option("supcon", "the loss whose gradients choose the weights: supcon (the paper's "
                                 "supervised contrastive loss on two views) or ce (cross-entropy through the new "
                                 "head)", kind=str, choices=("supcon", "ce"))


class SparseUpdate(nn.Module):
    """A parametrization: the frozen weight plus `gps_delta` (rows, K) at the columns `gps_index` (rows, K) of its
    rows (a convolution flattened to (out_channels, in_channels * kh * kw))."""

    def __init__(self, weight: torch.Tensor, k: int):
        super().__init__()
        rows = weight.shape[0]
        self.gps_delta = nn.Parameter(torch.zeros(rows, k, device=weight.device, dtype=weight.dtype))
        self.register_buffer("gps_index", torch.arange(k, device=weight.device).repeat(rows, 1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1).scatter_add(1, self.gps_index, self.gps_delta).view_as(weight)


def role(name: str, parameter: nn.Parameter) -> str:
    """What the code's name rule does with a backbone parameter: "frozen", "whole" or "rows"."""
    if any(part in name for part in FROZEN_NAMES):
        return "frozen"
    if any(part in name for part in WHOLE_NAMES):
        return "whole"
    if parameter.dim() < 2:
        raise ValueError(f"gps selects entries per row of a weight matrix; {name} is a {parameter.dim()}-D tensor "
                         "its name rule does not place (norm, bias, gamma, pos_embed, cls_token).")
    return "rows"


def top_per_row(gradient: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, K): each row's K columns of largest |gradient|, ascending (a weight flattened to rows first)."""
    return gradient.flatten(1).abs().topk(k, dim=1).indices.sort(dim=1).values


def supcon_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over (B, V, D) features of V views, as the GPS code computes
    it (contrast mode "all"); written here as no installed package has it."""
    batch, views = features.shape[:2]
    z = torch.cat(F.normalize(features, dim=-1).unbind(1))  # (V*B, D), view-major
    logits = z @ z.T / SUPCON_TEMPERATURE
    self_pairs = torch.eye(views * batch, dtype=torch.bool, device=z.device)
    targets = labels.repeat(views)
    positives = (targets[:, None] == targets[None, :]) & ~self_pairs
    log_prob = logits - logits.masked_fill(self_pairs, float("-inf")).logsumexp(dim=1, keepdim=True)
    return -(log_prob * positives).sum(dim=1).div(positives.sum(dim=1)).mean()


@register_method("gps")
class GradientParameterSelection(TuningModule):
    label, color = "GPS", "#b5cf6b"
    options_cls = GPSOptions
    families = ("vit", "swin")
    selects_from_data = True

    def adapt(self) -> None:
        k = self.options.per_neuron
        named = dict(self.backbone.named_modules())
        head = {id(p) for p in self.backbone.get_classifier().parameters()}  # the new head trains whole (base)
        for name, parameter in list(self.backbone.named_parameters()):
            if id(parameter) in head:
                continue
            kind = role(name, parameter)
            if kind == "whole":
                parameter.requires_grad_(True)
            elif kind == "rows":
                if k > parameter[0].numel():
                    raise ValueError(f"gps per_neuron={k} exceeds the {parameter[0].numel()} inputs of a row of "
                                     f"{name}; choose per_neuron in 1..{parameter[0].numel()}.")
                module_name, _, attribute = name.rpartition(".")
                parametrize.register_parametrization(named[module_name], attribute, SparseUpdate(parameter, k))

    def updates(self) -> list[tuple[nn.Parameter, SparseUpdate]]:
        """(frozen pretrained weight, its SparseUpdate) for every weight whose rows GPS selects."""
        found = []
        for module in self.backbone.modules():
            if parametrize.is_parametrized(module):
                for entry in module.parametrizations.values():
                    found.append((entry.original, entry[0]))
        return found

    def select_from_data(self, loader) -> None:
        """Sum each weight's gradient over one pass of the training data, then keep each row's top K."""
        pairs = self.updates()
        for original, _ in pairs:
            original.requires_grad_(True)
            original.grad = None
        try:
            for batches in self.selection_batches(loader):
                self.selection_loss(batches).backward()
            for original, update in pairs:
                gradient = self.summed_over_processes(original.grad)
                update.gps_index.copy_(top_per_row(gradient, self.options.per_neuron))
        finally:
            for original, _ in pairs:
                original.requires_grad_(False)
                original.grad = None
            for parameter in self.parameters():  # the pass's gradients must not reach the first step
                parameter.grad = None

    def selection_batches(self, loader):
        """One pass: (batch,) of the run's loader for "ce"; for "supcon" (view 1, view 2) of the same images, from
        two loaders over the training set in one shared shuffled order (this process's share of it)."""
        if self.options.selection_loss == "ce":
            return ((self.batch_on_device(batch),) for batch in loader)
        try:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        except RuntimeError:  # not attached to a Trainer
            rank, world = 0, 1
        order = torch.randperm(len(loader.dataset)).tolist()[rank::world]

        def views() -> DataLoader:
            return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=order,
                              num_workers=loader.num_workers, collate_fn=loader.collate_fn)

        return ((self.batch_on_device(a), self.batch_on_device(b)) for a, b in zip(views(), views(), strict=True))

    def selection_loss(self, batches) -> torch.Tensor:
        if self.options.selection_loss == "ce":
            images, labels = batches[0]
            return self.criterion(self(images), labels)
        (first, labels), (second, _) = batches
        pooled = self.backbone.forward_head(self.forward_features(torch.cat([first, second])), pre_logits=True)
        return supcon_loss(torch.stack(pooled.split(len(labels)), dim=1), labels)  # (B, 2, D)
