"""LoRA: low-rank updates of frozen weights (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

An adapted projection computes
    h = W x + b + (alpha / r) * B A dropout(x),    A: (r, in), B: (out, r)
with W and b frozen and untouched, A Kaiming-uniform (a = sqrt(5)) and B zero (the LoRA reference code's init,
loralib, so training starts from the pretrained function). Only A, B and the new head train.

Which projections, and whose choice (`targets`):
- "qv" (default, the paper's): the query and value projections (its Sec. 7.1 / Table 5 adapt W_q and W_v). timm fuses
  q, k and v into one `qkv` Linear whose output rows are q, then k, then v (Attention.forward's
  reshape(B, N, 3, heads, head_dim)); each of the q and v thirds gets its own A and B and the k rows none, as the
  reference code adapts GPT-2's fused `c_attn` (loralib `MergedLinear(..., enable_lora=[True, False, True])`, stored
  as its lora_A (2r, in) and lora_B (2 out/3, r)). ViT-B/16, r = 8: 12 * 2 * 8 * (768 + 768) = 294,912 + head.
- "qkv" (PETL_Vision's, github:OSU-MLB/PETL_Vision model/lora.py): the fused qkv as one layer: one A (r, in) shared
  by q, k and v and one B (3D, r); the same count at r = 8. PETL_Vision also applies dropout 0.1 to LoRA's input
  (`dropout=0.1` here).
- "qkv_proj" (this suite's earlier default, with alpha 16): the fused qkv as one layer and the output projection
  `proj`: 12 * 8 * ((768 + 2304) + (768 + 768)) = 442,368 + head (519,268 at 100 classes). Its numbers in
  results/reference were produced with `targets=qkv_proj alpha=16`.
Scale alpha / r = 1 by default: alpha = 8 = r, the paper's rule (alpha is set to the first r tried and not tuned, so
a larger rank keeps alpha and scales its update down); PETL_Vision's `merge_factor` is 1 too. Dropout 0 by default
(loralib's `lora_dropout` default). Families: a ViT's and a Swin's attention (the row's `attention_linears`).

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

# Per `targets` choice: {index into the family row's attention_linears (0: the fused qkv, 1: the output
# projection): which equal parts of that layer's output rows get an update}, loralib's `enable_lora`.
TARGETS: dict[str, dict[int, tuple[bool, ...]]] = {
    "qv": {0: (True, False, True)},  # q and v thirds of the fused qkv: the paper's
    "qkv": {0: (True,)},  # the fused qkv as one layer: PETL_Vision's
    "qkv_proj": {0: (True,), 1: (True,)},  # fused qkv and proj: this suite's earlier default
}


@dataclass
class LoRAOptions(Options):
    rank: int = option(8, "rank r of each update B A (LoRA paper: 1-64; 8 is common)", kind=int, positive=True,
                       hint="e.g. rank=8")
    alpha: float = option(8.0, "the update is scaled by alpha / rank (paper: alpha = the first rank tried, so 1; "
                          "16 with targets=qkv_proj was this suite's earlier default)", kind=float, positive=True,
                          hint="the scale is alpha / rank")
    targets: str = option("qv", "qv: the q and v rows of the fused qkv (paper); qkv: the fused qkv as one layer "
                          "(PETL_Vision); qkv_proj: fused qkv and proj (this suite's earlier default)", kind=str,
                          choices=tuple(TARGETS), hint="qv, qkv or qkv_proj")
    dropout: float = option(0.0, "dropout on the update's input (loralib default 0; PETL_Vision 0.1)", kind=float,
                            low=0, high=1, high_open=True)
    merge_for_eval: bool = option(True, "evaluate with W + (alpha / r) B A precomputed (same outputs, faster); W "
                                  "itself is never changed", kind=bool)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update of some of its output rows. The rows split into
    len(adapted) equal parts; each adapted part gets its own rank-r update (loralib's MergedLinear), stored stacked:
    lora_A (k r, in), lora_B (k out / parts, r) for k adapted parts. Keeps the wrapped layer's `weight` and `bias`
    parameters under their own names, so the backbone's state-dict keys are unchanged (LoRA adds `lora_*`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, adapted: tuple[bool, ...] = (True,),
                 dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if self.out_features % len(adapted) or not any(adapted):
            raise ValueError(f"LoRA splits a layer's {self.out_features} output rows into {len(adapted)} equal parts "
                             "and adapts at least one; they do not divide.")
        self.adapted, self.rank, self.part = tuple(adapted), rank, self.out_features // len(adapted)
        self.weight = base.weight  # the same Parameter objects: frozen, never written to
        self.bias = base.bias
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        count = sum(self.adapted)
        self.lora_A = nn.Parameter(torch.empty(count * rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(count * self.part, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the LoRA reference code (loralib) init
        self.merged_weight: torch.Tensor | None = None

    def pad(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The adapted parts in their places along `dim`, zeros in the others (loralib's zero_pad)."""
        found, zeros = iter(parts), torch.zeros_like(parts[0])
        return torch.cat([next(found) if adapted else zeros for adapted in self.adapted], dim=dim)

    def delta_weight(self) -> torch.Tensor:
        count = sum(self.adapted)
        b = self.lora_B.view(count, self.part, self.rank)
        a = self.lora_A.view(count, self.rank, self.in_features)
        return self.scaling * self.pad(list(b @ a), dim=0)  # (out, in)

    def merge(self) -> None:
        with torch.no_grad():
            self.merged_weight = self.weight + self.delta_weight().to(self.weight.dtype)

    def unmerge(self) -> None:
        self.merged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.bias)
        count = sum(self.adapted)
        z = F.linear(self.dropout(x), self.lora_A).unflatten(-1, (count, self.rank))  # (..., k, r)
        update = torch.einsum("...kr,ksr->...ks", z, self.lora_B.view(count, self.part, self.rank))  # (..., k, s)
        return F.linear(x, self.weight, self.bias) + self.scaling * self.pad(list(update.unbind(-2)), dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"adapted={self.adapted}, scaling={self.scaling:g}, merged={self.merged_weight is not None}")


@register_method("lora")
class LoRATuning(MergeForEvalTuning):
    label, color = "LoRA", "#9edae5"
    options_cls = LoRAOptions
    families = ("vit", "swin")

    def adapt(self) -> None:
        options, family = self.options, self.family
        targets = {family.attention_linears[i]: adapted for i, adapted in TARGETS[options.targets].items()}
        for block in family.blocks(self.backbone):  # a Swin's window attention has the same qkv / proj
            attn = block.get_submodule(family.attention)
            layers = {name: getattr(attn, name) for name in targets}
            if not all(isinstance(layer, nn.Linear) for layer in layers.values()):
                raise ValueError(f"LoRA wraps nn.Linear attention projections; this backbone's are "
                                 f"{' / '.join(type(layer).__name__ for layer in layers.values())}.")
            for name, layer in layers.items():
                if len(targets[name]) == 3 and layer.out_features != 3 * layer.in_features:
                    raise ValueError(f"LoRA targets={options.targets} adapts the q and v rows of a fused qkv "
                                     f"(out = 3 x in); this {name} maps {layer.in_features} -> "
                                     f"{layer.out_features}: use targets=qkv.")
                wrapped = LoRALinear(layer, options.rank, float(options.alpha), targets[name], options.dropout)
                setattr(attn, name, wrapped)  # new lora_A / lora_B are trainable

    def lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    mergeable_layers = lora_layers
