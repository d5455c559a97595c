"""LoRA: low-rank updates of frozen weights (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

Every block's attention `qkv` and `proj` projections compute
    h = W x + b + (alpha / r) * B A x,    A: (r, in), B: (out, r)
with W and b frozen and untouched, A Kaiming-uniform and B zero (the paper's init, so training starts from
the pretrained function), alpha = 16 and r = 8 by default. Only A, B and the new head train.

`merge_for_eval` folds the delta into a copy of W while the module evaluates (one matmul per projection
instead of three). The copy is a separate tensor, never written into W, so W stays bit-identical: merging in
place and subtracting afterwards, as peft does, drifts W by rounding at every validation epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MergeForEvalTuning
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class LoRAOptions(Options):
    rank: int = option(8, "rank r of each update B A (LoRA paper: 1-64; 8 is common)", kind=int, positive=True,
                       hint="e.g. rank=8")
    alpha: float = option(16.0, "the update is scaled by alpha / rank", kind=float, positive=True,
                          hint="the scale is alpha / rank")
    merge_for_eval: bool = option(True, "evaluate with W + (alpha / r) B A precomputed (same outputs, faster); W "
                                  "itself is never changed", kind=bool)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Keeps the wrapped layer's `weight` and `bias`
    parameters under their own names, so the backbone's state-dict keys are unchanged (LoRA adds `lora_*`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: frozen, never written to
        self.bias = base.bias
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the LoRA reference code (loralib) init
        self.merged_weight: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    def merge(self) -> None:
        with torch.no_grad():
            self.merged_weight = self.weight + self.delta_weight().to(self.weight.dtype)

    def unmerge(self) -> None:
        self.merged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.bias)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., out) via the rank-r bottleneck
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}, "
                f"scaling={self.scaling:g}, merged={self.merged_weight is not None}")


@register_method("lora")
class LoRATuning(MergeForEvalTuning):
    label, color = "LoRA", "#9edae5"
    options_cls = LoRAOptions
    families = ("vit", "swin")

    def adapt(self) -> None:
        rank, alpha, family = self.options.rank, float(self.options.alpha), self.family
        for block in family.blocks(self.backbone):  # a Swin's window attention has the same qkv / proj
            attn = block.get_submodule(family.attention)
            layers = [getattr(attn, name) for name in family.attention_linears]
            if not all(isinstance(layer, nn.Linear) for layer in layers):
                raise ValueError(f"LoRA wraps nn.Linear attention projections; this backbone's are "
                                 f"{' / '.join(type(layer).__name__ for layer in layers)}.")
            for name, layer in zip(family.attention_linears, layers, strict=True):
                setattr(attn, name, LoRALinear(layer, rank, alpha))  # new lora_A / lora_B are trainable

    def lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    mergeable_layers = lora_layers
