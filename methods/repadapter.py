"""RepAdapter (Luo et al., 2023, https://arxiv.org/abs/2302.08106): a linear adapter before attention and before the
MLP, re-parameterised into the following linear layer for evaluation.

Follows the official code (github.com/luogen1996/RepAdapter, repadapter.py: `RepAdapter`, `forward_vit_block_adapter`
and `set_RepWeight` for method "repblock", train.py's default):

    x = x + attn(A1(norm1(x))),   x = x + mlp(A2(norm2(x))),   A(h) = h + s * up(dropout(down(h)))

- placement, the code's "repblock" (its default): one adapter on the input of attention (so of `qkv`) and one on the
  input of the MLP (so of `fc1`); "repattn" (attention only) is not offered here.
- no activation: `down` Linear(D -> 8) and a group-wise `up` (8 -> D in 2 groups: output group g reads only hidden
  group g, the code's Conv1d(8, D, 1, groups=2)), both with bias; dropout 0.1 between them (the code's, fixed).
- init, the code's: `down` Xavier-uniform, zero bias; `up` zero (weight and bias), so the block starts as the
  pretrained one.
- scale s: an option, default 1 (the RepAdapter class's default); the code's VTAB configs pick s per task from
  {0.1, 0.5, 1, 5, 10} (configs/repblock/*.yaml).
- re-parameterisation: A is affine, A(h) = (I + s U W) h + s (U a + b) with W, a = down and U, b = up (dense block-
  diagonal), so the next linear layer y = M A(h) + c folds it as M' = M + s (M U) W, c' = c + s M (U a + b): exact
  in evaluation, where dropout is off. The code copies M', c' into the pretrained weights in place; here they are a
  separate copy held while evaluating (`merge_for_eval`, as methods/lora.py), so the pretrained weights stay
  bit-identical and training resumes unmerged.

On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 12 * 2 * ((768*8 + 8) + (768*8/2 + 768)) + (768*200 + 200)
= 393,608 tuned parameters (the paper's 0.22M counts the adapters' weights only: 24 * (768*8 + 768*4) = 221,184).
Blocks keep their state-dict keys (the folded layers keep `weight` / `bias` under their names); the adapters add
`blocks.i.adapter_attn.*` and `blocks.i.adapter_mlp.*` (the code's names). Each adapter runs as the first step of
the layer it folds into (`FoldableLinear`), which on a ViT is the same as applying it to norm1(x) / norm2(x).

On a Swin, the official code's own Swin path (`forward_swin_block_adapter`, and `set_RepWeight`, which folds Swin
blocks as ViT blocks): the same two adapters in every block of every stage, of that block's width C (D above), on
the input of window attention's qkv and of fc1, folded into them. Where timm pads a map that the window does not
divide, the padded zeros enter qkv through the adapter too, as they enter the folded qkv, so the fold stays exact
(ours: the official code never pads, it asserts divisibility; an adapter before the padding could not be folded
exactly). Swin-B, 200 classes: sum over blocks of 2 ((8 C + 8) + (8 C / 2 + C)) + head = 518,216.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from methods.base import MergeForEvalTuning
from methods.options import Options, drop_path_option, option
from methods.registry import register_method

ADAPTER_DROPOUT = 0.1  # the code's RepAdapter: nn.Dropout(0.1) between its two projections


@dataclass
class RepAdapterOptions(Options):
    method = "repadapter"
    hidden_dim: int = option(8, "adapter width: down D -> hidden_dim (the code's dim: 8)", kind=int, low=1)
    groups: int = option(2, "groups of the up projection (the code's 2); divides both widths", kind=int, low=1,
                         hint="dividing hidden_dim")
    scale: float = option(1.0, "scale s of the adapter's update (code default 1; its VTAB configs pick one of 0.1-10 "
                          "per task)", kind=float, low=0, low_open=True)
    merge_for_eval: bool = option(True, "evaluate with the adapters folded into copies of qkv / fc1 (same outputs, "
                                  "faster); weights unchanged", kind=bool)
    drop_path: float = drop_path_option()

    def __post_init__(self):
        super().__post_init__()
        # a rule joining two fields; dividing the embedding width too is checked in adapt(), which has the backbone
        if self.hidden_dim % self.groups:
            raise ValueError(f"repadapter groups must be an integer >= 1 dividing hidden_dim={self.hidden_dim}, "
                             f"got {self.groups!r}.")


class GroupedLinear(nn.Module):
    """hidden -> out in `groups` blocks: output block g reads hidden block g only (a 1x1 grouped convolution)."""

    def __init__(self, hidden: int, out: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(out, hidden // groups))  # (out, hidden / groups), Conv1d's layout
        self.bias = nn.Parameter(torch.zeros(out))

    def dense_weight(self) -> torch.Tensor:
        """(out, hidden) block-diagonal matrix."""
        return torch.block_diag(*self.weight.chunk(self.groups, dim=0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.dense_weight(), self.bias)


class RepAdapter(nn.Module):
    """h + s * up(dropout(down(h))): affine, so it folds into the linear layer that reads it."""

    def __init__(self, dim: int, hidden: int, groups: int, scale: float):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, hidden)
        self.up = GroupedLinear(hidden, dim, groups)
        self.dropout = nn.Dropout(ADAPTER_DROPOUT)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scale * self.up(self.dropout(self.down(h)))

    def fold_into(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of `layer` applied after this adapter, as one linear layer (dropout off)."""
        up = self.up.dense_weight()  # (D, hidden)
        weight = layer.weight + self.scale * (layer.weight @ up) @ self.down.weight
        shift = self.scale * (up @ self.down.bias + self.up.bias)  # (D,)
        bias = layer.weight @ shift + (layer.bias if layer.bias is not None else 0)
        return weight, bias

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class FoldableLinear(nn.Module):
    """A frozen nn.Linear reading its input through a RepAdapter, or, once folded, a (weight, bias) copy with the
    adapter inside. Keeps the wrapped layer's `weight` and `bias` parameters under their names, so state-dict keys
    are unchanged; the adapter is the block's (`adapter_attn` / `adapter_mlp`), referenced here, not registered."""

    def __init__(self, base: nn.Linear, adapter: RepAdapter):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: frozen, never written to
        self.bias = base.bias
        self.adapter = (adapter,)  # a tuple: not a submodule
        self.folded: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:
            return F.linear(x, *self.folded)
        return F.linear(self.adapter[0](x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, folded={self.folded is not None}"


class RepAdapterFolding:
    """What a block with a RepAdapter on the input of attention and one on the input of the MLP adds to its timm
    class: folding them into copies of `attn.qkv` and `mlp.fc1` (FoldableLinears, which skip them once folded).
    The block's own forward is unchanged: those layers apply the adapters."""

    adapter_attn: RepAdapter
    adapter_mlp: RepAdapter

    @property
    def merged(self) -> bool:
        return self.attn.qkv.folded is not None

    def merge(self) -> None:
        with torch.no_grad():
            self.attn.qkv.folded = self.adapter_attn.fold_into(self.attn.qkv)
            self.mlp.fc1.folded = self.adapter_mlp.fold_into(self.mlp.fc1)

    def unmerge(self) -> None:
        self.attn.qkv.folded = self.mlp.fc1.folded = None


class RepAdapterBlock(RepAdapterFolding, Block):
    """A ViT's timm Block with its two RepAdapters."""


class RepAdapterSwinBlock(RepAdapterFolding, SwinTransformerBlock):
    """A Swin's timm SwinTransformerBlock with its two RepAdapters (qkv inside window attention, fc1 in the MLP)."""


@register_method("repadapter")
class RepAdapterTuning(MergeForEvalTuning):
    label, color = "RepAdapter", "#f7b6d2"
    options_cls = RepAdapterOptions
    block_classes: ClassVar[dict[str, type[nn.Module]]] = {"vit": RepAdapterBlock, "swin": RepAdapterSwinBlock}
    families = tuple(block_classes)  # a family opts in with its block class above

    def adapt(self) -> None:
        options, family = self.options, self.family
        blocks = family.plain_blocks(self.backbone, "repadapter")  # qkv reads norm1(x), fc1 norm2(x): nothing between
        for dim in sorted({family.width_of(block) for block in blocks}):  # a Swin's width doubles per stage
            if dim % options.groups:
                raise ValueError(f"repadapter groups={options.groups} must divide the embedding width {dim}.")
        adapted = self.block_classes[family.name]
        for i, block in enumerate(blocks):
            qkv, fc1 = block.attn.qkv, getattr(block.mlp, "fc1", None)
            if type(qkv) is not nn.Linear or type(fc1) is not nn.Linear:
                raise ValueError(f"repadapter folds into nn.Linear attn.qkv and mlp.fc1; blocks[{i}] has "
                                 f"{type(qkv).__name__} / {type(fc1).__name__}.")
            device = qkv.weight.device
            for name in ("adapter_attn", "adapter_mlp"):
                adapter = RepAdapter(family.width_of(block), options.hidden_dim, options.groups, float(options.scale))
                setattr(block, name, adapter.to(device))
            block.attn.qkv = FoldableLinear(qkv, block.adapter_attn)
            block.mlp.fc1 = FoldableLinear(fc1, block.adapter_mlp)
            block.__class__ = adapted  # same parameters and state-dict keys, plus the two adapters
        if options.drop_path:
            family.set_drop_path(self.backbone, options.drop_path)  # on the whole branch, adapter included

    def adapters(self) -> list[RepAdapter]:
        return [a for block in self.family.blocks(self.backbone) for a in (block.adapter_attn, block.adapter_mlp)]

    def mergeable_layers(self) -> list[RepAdapterFolding]:
        return self.family.blocks(self.backbone)
