"""Convpass (Jie & Deng, 2022, https://arxiv.org/abs/2207.07039): convolutional bypasses beside attention and MLP.

Follows the official code (github.com/JieShibo/PETL-ViT, convpass/vtab/convpass.py, `forward_block` and `Convpass`):

    h = norm1(x);  x = x + attn(h) + s * bypass_attn(h)
    h = norm2(x);  x = x + mlp(h)  + s * bypass_mlp(h)
    bypass(h) = up(dropout(act(conv3x3(act(down(h))))))      act = QuickGELU, z * sigmoid(1.702 z)

- `down` Linear(D -> 8) and `up` Linear(8 -> D) per token; the 3x3 conv (8 -> 8, padding 1, with bias) runs over the
  patch tokens laid out on the patch grid. The CLS token goes through the same conv as a 1x1 image of its own, so with
  padding only the kernel's centre tap reaches it — the code's handling, which this file extends to every prefix
  token (CLS and register tokens, `num_prefix_tokens`), each its own 1x1 image.
- init, the code's: `down` Xavier-uniform, zero bias; `up` zero (weight and bias), so the block starts as the
  pretrained one; the conv's kernel zero with the identity at its centre tap (`xavier_init=False`, the Convpass
  class's default) or Xavier-uniform (`xavier_init=True`), zero bias.
- scale s: an option, default 1 (`set_Convpass(..., s=1)`); the code's VTAB configs pick s per task from
  {0.01, 0.1, 1, 10, 100} and xavier_init per task (configs/convpass/*.yaml).
- dropout 0.1 before `up`: the code's, fixed. The bypasses' outputs go through the block's drop-path as in the code
  (identities on a frozen backbone), not its layer scale (the code's timm 0.4 blocks have none).
- a fixed patch grid: backbones built with dynamic_img_size (or without a grid) are refused, and so is an input
  whose token count is not prefix + grid_h * grid_w.

On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 12 * 2 * ((768*8 + 8) + (8*8*9 + 8) + (8*768 + 768))
+ (768*200 + 200) = 481,352 tuned parameters. Blocks keep their state-dict keys; the bypasses add
`blocks.i.adapter_attn.*` and `blocks.i.adapter_mlp.*` (the code's names).

On a Swin, the official code's own Swin path (the same file: `Convpass_swin`, `forward_swin_block`): both bypasses
in every block of every stage, `down` from that block's width C to dim and `up` back, the 3x3 conv over the block's
whole H x W map (not its windows, before the cyclic shift: there are no prefix tokens), the attention bypass added
beside the window attention and the MLP one beside the MLP, both through the block's drop-path, with the same init,
scale, QuickGELU and dropout. Any map size works (the conv reads the map it gets). Swin-B, 200 classes: sum over
blocks of 2 ((8 C + 8) + (8*8*9 + 8) + (8 C + C)) + head = 642,504.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from backbones import fixed_patch_grid
from methods.base import TuningModule
from methods.options import Options, drop_path_option, option
from methods.registry import register_method

BYPASS_DROPOUT = 0.1  # the code's Convpass: nn.Dropout(0.1) before `up`


@dataclass
class ConvpassOptions(Options):
    method = "convpass"
    dim: int = option(8, "bypass width: down D -> dim, 3x3 conv dim -> dim, up dim -> D (8)", kind=int, low=1)
    scale: float = option(1.0, "scale s of each bypass's output (code default 1; its VTAB configs pick one of 0.01-100 "
                          "per task)", kind=float, low=0, low_open=True)
    xavier_init: bool = option(False, "Xavier-uniform conv kernel instead of the identity at the centre tap (the "
                               "code's option, off)", kind=bool)
    drop_path: float = drop_path_option()


class QuickGELU(nn.Module):
    """The code's activation (CLIP's GELU approximation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Convpass(nn.Module):
    """down, QuickGELU, 3x3 conv over the patch grid (each prefix token a 1x1 image), QuickGELU, dropout, up.
    With `grid` None it reads a Swin block's (B, H, W, C) map and convolves over that map."""

    def __init__(self, embed_dim: int, dim: int, grid: tuple[int, int] | None, num_prefix_tokens: int,
                 xavier_init: bool):
        super().__init__()
        self.grid, self.num_prefix_tokens = grid, num_prefix_tokens
        self.adapter_down = nn.Linear(embed_dim, dim)
        self.adapter_conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.adapter_up = nn.Linear(dim, embed_dim)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(BYPASS_DROPOUT)
        with torch.no_grad():
            if xavier_init:
                nn.init.xavier_uniform_(self.adapter_conv.weight)
            else:  # out channel c reads in channel c at the centre tap: the conv starts as the identity
                nn.init.zeros_(self.adapter_conv.weight)
                self.adapter_conv.weight[:, :, 1, 1] += torch.eye(dim)
            nn.init.zeros_(self.adapter_conv.bias)
            nn.init.xavier_uniform_(self.adapter_down.weight)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:  # a Swin map (B, H, W, C): Convpass_swin's conv over the whole map
            z = self.adapter_conv(self.act(self.adapter_down(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.adapter_up(self.dropout(self.act(z)))
        batch, tokens, _ = x.shape
        (grid_h, grid_w), prefix = self.grid, self.num_prefix_tokens
        if tokens != prefix + grid_h * grid_w:
            raise ValueError(f"convpass expects {prefix} prefix tokens + a {grid_h}x{grid_w} patch grid "
                             f"({prefix + grid_h * grid_w} tokens), got {tokens}; it needs the backbone's fixed grid.")
        z = self.act(self.adapter_down(x))  # (B, N, d)
        d = z.shape[-1]
        patches = z[:, prefix:].reshape(batch, grid_h, grid_w, d).permute(0, 3, 1, 2)  # (B, d, H, W)
        patches = self.adapter_conv(patches).permute(0, 2, 3, 1).reshape(batch, grid_h * grid_w, d)
        if prefix:  # each prefix token a 1x1 image: with padding 1 only the centre tap reaches it
            singles = z[:, :prefix].reshape(batch * prefix, d, 1, 1)
            patches = torch.cat([self.adapter_conv(singles).reshape(batch, prefix, d), patches], dim=1)
        return self.adapter_up(self.dropout(self.act(patches)))


class ConvpassBlock(Block):
    """A timm Block with a Convpass beside its attention and one beside its MLP, each reading the sublayer's input."""

    adapter_attn: Convpass
    adapter_mlp: Convpass
    s: float

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path1(self.ls1(self.attn(h, attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path1(self.adapter_attn(h) * self.s)
        h = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(h))) + self.drop_path2(self.adapter_mlp(h) * self.s)


class ConvpassSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock with a Convpass beside its window attention and one beside its MLP, each reading
    the sublayer's input as a (B, H, W, C) map (the official `forward_swin_block`)."""

    adapter_attn: Convpass
    adapter_mlp: Convpass
    s: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        h = self.norm1(x)
        x = x + self.drop_path1(self._attn(h)) + self.drop_path1(self.s * self.adapter_attn(h))
        h = self.norm2(x)  # per token: the same as on timm's (B, H*W, C) view
        x = x + self.drop_path2(self.mlp(h)) + self.drop_path2(self.s * self.adapter_mlp(h))
        return x.reshape(batch, height, width, dim)


@register_method("convpass")
class ConvpassTuning(TuningModule):
    label, color = "Convpass", "#ff9896"
    options_cls = ConvpassOptions
    block_classes: ClassVar[dict[str, type[nn.Module]]] = {"vit": ConvpassBlock, "swin": ConvpassSwinBlock}
    families = tuple(block_classes)  # a family opts in with its block class above

    def adapt(self) -> None:
        backbone, options, family = self.backbone, self.options, self.family
        # what the conv runs over differs per family: a ViT's tokens laid out on its fixed patch grid (each prefix
        # token a 1x1 image), a Swin block's (B, H, W, C) map as it is; so this stays a branch
        grid, prefix = self.patch_grid() if family.name == "vit" else (None, 0)
        for block in family.plain_blocks(backbone, "convpass"):  # the block forwards above mirror the plain ones
            device = next(block.parameters()).device
            for name in ("adapter_attn", "adapter_mlp"):
                bypass = Convpass(family.width_of(block), options.dim, grid, prefix, options.xavier_init)
                setattr(block, name, bypass.to(device))
            block.s = float(options.scale)
            block.__class__ = self.block_classes[family.name]  # same parameters and state-dict keys, plus the bypasses
        if options.drop_path:
            family.set_drop_path(backbone, options.drop_path)  # the bypasses pass their block's drop-path (the code)

    def patch_grid(self) -> tuple[tuple[int, int], int]:
        """A ViT's fixed patch grid (rows, columns) and its prefix tokens (CLS, registers)."""
        return fixed_patch_grid(self.backbone, "convpass", "its 3x3 conv runs over it"), self.backbone.num_prefix_tokens

    def bypasses(self) -> list[Convpass]:
        return [b for block in self.family.blocks(self.backbone) for b in (block.adapter_attn, block.adapter_mlp)]
