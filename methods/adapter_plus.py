"""Adapter+ (Steitz & Roth, "Adapters Strike Back", CVPR 2024, https://arxiv.org/abs/2406.06820): one bottleneck
adapter after each whole block, with a learned per-channel scale:

    x = block(x);  x = x + s * drop_path(up(gelu(down(x))))        s in R^D, one scale per channel

Follows the official code (github.com/visinf/adapter_plus, adapter_plus/vit_adapter.py: `Adapter`,
`AdapterBlock.forward_post`; conf/adapter/adapter_plus.yaml over base_adapter.yaml: config "post", scaling "channel",
act_layer true, norm_layer false, bias true, init "houlsby", dim 8, dropout 0, drop_path 0.1).
Choices, and whose:
- placement "post" (after the block's second residual add, reading and adding to the block's output): the paper's
  Post-Adapter (its Sec. 4.1 finds it the best of pre, post, parallel, intermediate and Houlsby), the code's
  `forward_post`.
- channel-wise scale s, initialised to ones, trained: the paper's ("channel" scaling, Sec. 4.2); `scaling="learned"`
  is the code's single learned scalar, `"none"` no scale (both ablations in the paper).
- no LayerNorm inside the adapter, GELU, both projections with bias: the code's adapter_plus config.
- init "houlsby": both projections truncated normal, std 0.01 cut at +-2 std, zero biases (the code: "paper value,
  houlsby code implementation: std = 0.001"); `init="lora"` is the code's alternative (down Kaiming-uniform, up zero,
  which starts as the pretrained function). With "houlsby" the adapter starts near, not at, the identity.
- drop-path 0.1 on the adapter's branch in training (the code's adapter drop_path, its `DropPath` per sample);
  the code also trains the frozen ViT with drop_path_rate 0.1: `drop_path=0.1` (RECIPE=paper), 0 by default.
- bottleneck 8: the code's default (its VTAB/FGVC experiments pick 1-32 per task, conf/experiment/*/adapter_plus_*).

On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 12 * (768*8 + 8 + 8*768 + 768 + 768) + (768*200 + 200)
= 319,784 tuned parameters (165,984 in the adapters). Blocks keep their state-dict keys; the adapter adds
`blocks.i.adapter_plus.*`.

On a Swin (ours: the official code has none): the same adapter after every block of every stage, of that block's
width; it acts per token, so it reads the block's (B, H, W, C) output map as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from methods.base import TuningModule
from methods.options import Options, drop_path_option, option
from methods.registry import register_method

HOULSBY_STD = 0.01  # the paper's value; the code's trunc_normal_ cuts at +-2 std


@dataclass
class AdapterPlusOptions(Options):
    method = "adapter_plus"
    bottleneck: int = option(8, "bottleneck width of each adapter (the code's dim: 8; its runs pick 1-32 per task)",
                             kind=int, positive=True)
    scaling: str = option("channel", "the adapter output's scale: channel (a learned scale per channel, Adapter+), "
                          "learned (one learned scalar) or none", kind=str, choices=("channel", "learned", "none"))
    init: str = option("houlsby", "houlsby (both projections trunc-normal std 0.01, the code's) or lora (down "
                       "Kaiming-uniform, up zero: starts as the pretrained function)", kind=str,
                       choices=("houlsby", "lora"))
    adapter_drop_path: float = option(0.1, "drop-path rate on the adapter's branch in training (the code's 0.1)",
                                      kind=float, low=0, high=1, high_open=True)
    drop_path: float = drop_path_option()


class AdapterPlus(nn.Module):
    """s * drop_path(up(gelu(down(x)))): the branch only; the block adds it to its output."""

    def __init__(self, dim: int, bottleneck: int, scaling: str, init: str, drop_path: float):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale = nn.Parameter(torch.ones(dim if scaling == "channel" else 1)) if scaling != "none" else None
        with torch.no_grad():
            if init == "houlsby":
                for layer in (self.down, self.up):
                    nn.init.trunc_normal_(layer.weight, std=HOULSBY_STD, a=-2 * HOULSBY_STD, b=2 * HOULSBY_STD)
                    nn.init.zeros_(layer.bias)
            else:  # "lora": `down` keeps nn.Linear's init (the code's kaiming_uniform_(a=sqrt(5)) and bias bound)
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop_path(self.up(self.act(self.down(x))))
        return h if self.scale is None else h * self.scale


class AdapterPlusBlock(Block):
    """A timm Block followed by its Adapter+ (`forward_post`): x = block(x); x + adapter(x)."""

    adapter_plus: AdapterPlus

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return x + self.adapter_plus(x)


class AdapterPlusSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock followed by its Adapter+, on the block's (B, H, W, C) output."""

    adapter_plus: AdapterPlus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x + self.adapter_plus(x)


@register_method("adapter_plus")
class AdapterPlusTuning(TuningModule):
    label, color = "Adapter+", "#5254a3"
    options_cls = AdapterPlusOptions
    identity_at_init = False  # the code's "houlsby" init draws `up` near zero, not zero
    # a family opts in with the block class that follows its plain timm block (the row's plain_block)
    block_classes: ClassVar[dict[type[nn.Module], type[nn.Module]]] = {Block: AdapterPlusBlock,
                                                                       SwinTransformerBlock: AdapterPlusSwinBlock}
    families = ("vit", "swin")

    def adapt(self) -> None:
        options, family = self.options, self.family
        adapted = self.block_classes[family.plain_block]
        for block in family.plain_blocks(self.backbone, "adapter_plus"):  # the forwards above extend the plain ones
            adapter = AdapterPlus(family.width_of(block), options.bottleneck, options.scaling, options.init,
                                  float(options.adapter_drop_path))
            block.adapter_plus = adapter.to(next(block.parameters()).device)
            block.__class__ = adapted  # same parameters and state-dict keys, plus `adapter_plus`
        if options.drop_path:
            family.set_drop_path(self.backbone, options.drop_path)  # the blocks' own branches (the code's 0.1)

    def adapters(self) -> list[AdapterPlus]:
        return [block.adapter_plus for block in self.family.blocks(self.backbone)]
