"""Bottleneck adapters in the Pfeiffer placement (Pfeiffer et al., 2020, https://arxiv.org/abs/2005.00247),
as used for the ADAPTER baseline in VPT (Jia et al., 2022, https://arxiv.org/abs/2203.12119).

Placement (the VPT code's Pfeiffer variant): after each block's MLP, before its residual add,
    h = mlp(norm2(x));  x = x + h + up(gelu(down(h)))
with a bottleneck of dim // reduction, both projections with bias, no extra norm. On a Swin (ours: the VPT code has
no Swin adapter) every block of every stage gets one in the same place, its bottleneck from that stage's width.

Initialisation: `up` is zero so every adapter starts as the identity, but `down` is Kaiming-uniform.
The VPT code zero-initialises both projections, which makes every gradient zero forever (the output of
`down` is 0, so `up` sees no input, and `up` is 0, so `down` sees no error): its adapters never learn.
"""

from dataclasses import dataclass

import torch
from torch import nn

from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class AdapterOptions(Options):
    method = "adapter"
    # that it divides the backbone's width is checked in adapt(), which has the backbone
    reduction: int = option(8, "bottleneck width = embed_dim // reduction (paper: 8)", kind=int, positive=True)


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


class MlpWithAdapter(nn.Module):
    """The block's MLP followed by its adapter; the block's own residual adds the sum."""

    def __init__(self, mlp: nn.Module, adapter: Adapter):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)  # x is already norm2(x) inside the timm Block
        return h + self.adapter(h)


@register_method("adapter")
class AdapterTuning(TuningModule):
    label, color, paper_row, in_fig3 = "Adapter", "#8c564b", 6, True
    options_cls = AdapterOptions
    families = ("vit", "swin")

    def adapt(self) -> None:
        reduction, family = int(self.options.reduction), self.family
        blocks = family.blocks(self.backbone)
        for dim in sorted({family.width_of(block) for block in blocks}):  # a Swin's width doubles per stage
            if dim % reduction:
                divisors = [r for r in range(1, dim + 1) if dim % r == 0 and r <= 64]
                raise ValueError(f"adapter reduction {reduction} does not divide the embedding width {dim}; "
                                 f"choose one of {divisors}.")
        for block in blocks:
            dim = family.width_of(block)
            adapter = Adapter(dim, dim // reduction)  # new params trainable
            setattr(block, family.mlp, MlpWithAdapter(block.get_submodule(family.mlp), adapter))

    def adapters(self) -> list[Adapter]:
        return [block.get_submodule(self.family.mlp).adapter for block in self.family.blocks(self.backbone)]
