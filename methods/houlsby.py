"""Houlsby adapters (Houlsby et al., ICML 2019, https://arxiv.org/abs/1902.00751): two sequential bottleneck
adapters per block, one after attention and one after the MLP, each before its residual add:

    h = attn(norm1(x));  x = x + h + up(gelu(down(h)))
    h = mlp(norm2(x));   x = x + h + up(gelu(down(h)))

Follows the paper (Fig. 2: "after the projection following multi-headed attention and after the two feed-forward
layers", each with its own skip connection) and its official code (github.com/google-research/adapter-bert,
modeling.py: `feedforward_adapter(input_tensor, hidden_size=64, ...)` applied to attention_output and layer_output
before their residual LayerNorm), in the pre-norm timm block the way PETL_Vision places it (rand_h_adapter:
ft_attn_mode / ft_mlp_mode "sequential_after").
Choices, and whose:
- bottleneck 64: adapter-bert's default `hidden_size=64` (the paper sweeps {8, 64, 256}).
- GELU in the bottleneck: adapter-bert's. Both projections with bias.
- every LayerNorm of the backbone trains too, as the paper does (Fig. 2: "the green layers are trained ... this
  includes the adapter, the layer normalization parameters, and the final classification layer"; adapter-bert trains
  its "adapters", "layer_norm" and "head" collections). `train_norms=False` trains the adapters only (PETL_Vision).
- init: ours — the Adapter of methods/adapter.py, `down` nn.Linear's Kaiming-uniform and `up` zero, so every adapter
  is exactly the identity at the start. The paper and adapter-bert draw both projections from a truncated normal
  near zero (std 1e-2 in the paper, 1e-3 in the code): near-identity, not identity.
- the adapter sits inside the block's layer scale and drop-path (where the sublayer output is), both identities on
  ViT-B.

On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 12 * 2 * (768*64 + 64 + 64*768 + 768) adapters
+ (12 * 2 + 1) * 2 * 768 LayerNorm weights and biases + (768*200 + 200) head = 2,571,464 tuned parameters
(2,533,064 with train_norms=False). Blocks keep their state-dict keys; the adapters add
`blocks.i.adapter_attn.*` and `blocks.i.adapter_mlp.*`.

On a Swin (ours: neither the paper, adapter-bert nor PETL_Vision has one): the same two places in every block of
every stage, each adapter of that block's width with the same bottleneck m, the attention one on the window
attention's output after the windows are merged back into the map (an adapter acts per token, so before or after
the merge is the same), and with train_norms every LayerNorm, the patch-merge norms included. Swin-B, 200 classes:
sum over blocks of 2 (129 C + 64) + 57,600 LayerNorm values + head = 3,369,928 (3,312,328 with train_norms=False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from methods.adapter import Adapter
from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class HoulsbyOptions(Options):
    method = "houlsby"
    bottleneck: int = option(64, "bottleneck width m of each adapter (adapter-bert: 64)", kind=int, low=1)
    train_norms: bool = option(True, "also train every LayerNorm's weight and bias (the paper: yes; PETL_Vision's "
                               "version: no)", kind=bool)


class HoulsbyBlock(Block):
    """A timm Block with an adapter on its attention output and one on its MLP output, before each residual add."""

    adapter_attn: Adapter
    adapter_mlp: Adapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(h + self.adapter_attn(h)))
        h = self.mlp(self.norm2(x))
        return x + self.drop_path2(self.ls2(h + self.adapter_mlp(h)))


class HoulsbySwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock with the same two adapters, on the (B, H, W, C) map and the (B, H*W, C) tokens."""

    adapter_attn: Adapter
    adapter_mlp: Adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        h = self._attn(self.norm1(x))  # window attention, windows merged back: (B, H, W, C)
        x = (x + self.drop_path1(h + self.adapter_attn(h))).reshape(batch, -1, dim)
        h = self.mlp(self.norm2(x))
        return (x + self.drop_path2(h + self.adapter_mlp(h))).reshape(batch, height, width, dim)


@register_method("houlsby")
class HoulsbyTuning(TuningModule):
    label, color = "Houlsby", "#c49c94"
    options_cls = HoulsbyOptions
    block_classes: ClassVar[dict[str, type[nn.Module]]] = {"vit": HoulsbyBlock, "swin": HoulsbySwinBlock}
    families = tuple(block_classes)  # a family opts in with its block class above

    def adapt(self) -> None:
        bottleneck = self.options.bottleneck
        family = self.family
        adapted = self.block_classes[family.name]
        for block in family.plain_blocks(self.backbone, "houlsby"):  # the forwards above mirror the plain blocks only
            dim, device = family.width_of(block), next(block.parameters()).device
            block.adapter_attn = Adapter(dim, bottleneck).to(device)
            block.adapter_mlp = Adapter(dim, bottleneck).to(device)
            block.__class__ = adapted  # same parameters and state-dict keys, plus the two adapters
        if self.options.train_norms:
            for module in self.backbone.modules():
                if isinstance(module, nn.LayerNorm):
                    module.requires_grad_(True)

    def adapters(self) -> list[Adapter]:
        return [a for block in self.family.blocks(self.backbone) for a in (block.adapter_attn, block.adapter_mlp)]
