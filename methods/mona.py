"""Mona, the multi-cognitive visual adapter (Yin et al., "5%>100%: Breaking Performance Shackles of Full Fine-Tuning
on Visual Recognition Tasks", CVPR 2025, https://arxiv.org/abs/2408.08345): an adapter after each residual add,
two per block, with a scaled LayerNorm on its input and depth-wise convolutions of three sizes in its bottleneck:

    x = x + attn(norm1(x));  x = mona1(x);   x = x + mlp(norm2(x));  x = mona2(x)
    mona(x) = x + up(dropout(gelu(op(down(norm(x) * gamma + x * gamma_x)))))
    op(z)   = z' + conv1x1(z'),   z' = z + (dw3x3(z) + dw5x5(z) + dw7x7(z)) / 3      (over the token map)

Follows the official code (github.com/Leiyi-Hu/mona, Swin-Transformer-Classification/mmcls/models/backbones/
swin_transformer_mona.py: `Mona`, `MonaOp`, `SwinTransformerBlock.forward` with my_module_1 / my_module_2).
Choices, and whose:
- placement: after each of the block's two residual adds, reading and replacing the residual stream (the code's;
  the paper's Fig. 3). The code's drop-path sits before the adapter (an identity on a frozen backbone).
- bottleneck 64 (the code's fixed `nn.Linear(in_dim, 64)`; its `factor` argument is unused), GELU, dropout 0.1
  after the activation (the code's), an option here.
- input scaling: LayerNorm (affine, trained) times gamma (init 1e-6 per channel) plus x times gamma_x (init 1 per
  channel): the code's `norm(x) * gamma + x * gammax`.
- init: `down` and `up` truncated normal, std 0.02, zero bias: the code's `init_weights` applies `trunc_normal_` to
  every nn.Linear before it loads the checkpoint (strict=False), so the adapters keep it; the convolutions keep
  PyTorch's default. Mona therefore does not start as the pretrained function.
- on a ViT (ours: the official code is Swin only): the convolutions run over the patch tokens laid out on the patch
  grid, and each prefix token (CLS, registers) is its own 1x1 image, so only the kernels' centre taps and biases reach
  it: the way the official Convpass code treats the CLS token (methods/convpass.py). A fixed grid is needed.
- every block of every stage of a Swin gets the two adapters of that block's width, the convolutions over the
  block's (B, H, W, C) map (the code's `hw_shapes`, there taken before padding).

Per adapter: 2D (LayerNorm) + 2D (gammas) + (64 D + 64) + 64 * (9 + 25 + 49) + 3 * 64 (depth-wise) + (64*64 + 64)
(1x1) + (64 D + D) = 133 D + 9,728. On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 24 * 111,872 + (768*200 +
200) = 2,838,728 tuned parameters. Blocks keep their state-dict keys; the adapters add `blocks.i.mona1.*` and
`blocks.i.mona2.*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from backbones import fixed_patch_grid
from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method

KERNELS = (3, 5, 7)  # the code's three depth-wise convolutions
LINEAR_STD = 0.02  # the code's trunc_normal_(m.weight, std=.02) on every nn.Linear


@dataclass
class MonaOptions(Options):
    method = "mona"
    bottleneck: int = option(64, "bottleneck width of each adapter (the code's fixed 64)", kind=int, positive=True)
    dropout: float = option(0.1, "dropout after the bottleneck's GELU (the code's 0.1)", kind=float, low=0, high=1,
                            high_open=True)


class MonaOp(nn.Module):
    """The code's MonaOp on (B, C, H, W): the mean of 3x3, 5x5, 7x7 depth-wise convs plus its input, then a 1x1 conv
    plus its input."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in KERNELS)
        self.projector = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + sum(conv(z) for conv in self.convs) / len(self.convs)
        return z + self.projector(z)


class Mona(nn.Module):
    """x + up(dropout(gelu(MonaOp(down(norm(x) * gamma + x * gamma_x))))). With `grid` None it reads a Swin map
    (B, H, W, C); else ViT tokens (B, prefix + grid_h * grid_w, D), each prefix token a 1x1 image."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, grid: tuple[int, int] | None, num_prefix_tokens: int):
        super().__init__()
        self.grid, self.num_prefix_tokens = grid, num_prefix_tokens
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(dim))
        self.project1 = nn.Linear(dim, bottleneck)
        self.adapter_conv = MonaOp(bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            for layer in (self.project1, self.project2):
                nn.init.trunc_normal_(layer.weight, std=LINEAR_STD)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        z = self.convolve_map(z) if self.grid is None else self.convolve_tokens(z)
        return x + self.project2(self.dropout(F.gelu(z)))

    def convolve_map(self, z: torch.Tensor) -> torch.Tensor:
        return self.adapter_conv(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, m)

    def convolve_tokens(self, z: torch.Tensor) -> torch.Tensor:
        batch, tokens, m = z.shape
        (grid_h, grid_w), prefix = self.grid, self.num_prefix_tokens
        if tokens != prefix + grid_h * grid_w:
            raise ValueError(f"mona expects {prefix} prefix tokens + a {grid_h}x{grid_w} patch grid "
                             f"({prefix + grid_h * grid_w} tokens), got {tokens}; it needs the backbone's fixed grid.")
        patches = z[:, prefix:].reshape(batch, grid_h, grid_w, m).permute(0, 3, 1, 2)  # (B, m, H, W)
        patches = self.adapter_conv(patches).permute(0, 2, 3, 1).reshape(batch, grid_h * grid_w, m)
        if not prefix:
            return patches
        singles = self.adapter_conv(z[:, :prefix].reshape(batch * prefix, m, 1, 1)).reshape(batch, prefix, m)
        return torch.cat([singles, patches], dim=1)


class MonaBlock(Block):
    """A timm Block with a Mona after each residual add."""

    tokens_on_grid: ClassVar[bool] = True  # its Mona reads a (B, N, D) sequence laid out on the patch grid
    mona1: Mona
    mona2: Mona

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.mona1(x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask,
                                                              is_causal=is_causal))))
        return self.mona2(x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class MonaSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock with a Mona after each residual add, on the (B, H, W, C) map."""

    tokens_on_grid: ClassVar[bool] = False  # its Mona reads the block's map as it is
    mona1: Mona
    mona2: Mona

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        x = self.mona1(x + self.drop_path1(self._attn(self.norm1(x))))
        x = x.reshape(batch, -1, dim)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.mona2(x.reshape(batch, height, width, dim))


@register_method("mona")
class MonaTuning(TuningModule):
    label, color = "Mona", "#8ca252"
    options_cls = MonaOptions
    identity_at_init = False  # `up` is drawn with std 0.02 (the code's init), not zero
    # a family opts in with the block class that mirrors its plain timm block (the row's plain_block)
    block_classes: ClassVar[dict[type[nn.Module], type[nn.Module]]] = {Block: MonaBlock,
                                                                       SwinTransformerBlock: MonaSwinBlock}
    families = ("vit", "swin")

    def adapt(self) -> None:
        family, options = self.family, self.options
        adapted = self.block_classes[family.plain_block]
        grid, prefix = self.patch_grid() if adapted.tokens_on_grid else (None, 0)
        for block in family.plain_blocks(self.backbone, "mona"):  # the forwards above mirror the plain blocks only
            device = next(block.parameters()).device
            for name in ("mona1", "mona2"):
                mona = Mona(family.width_of(block), options.bottleneck, float(options.dropout), grid, prefix)
                setattr(block, name, mona.to(device))
            block.__class__ = adapted  # same parameters and state-dict keys, plus the two adapters

    def patch_grid(self) -> tuple[tuple[int, int], int]:
        """A ViT's fixed patch grid (rows, columns) and its prefix tokens (CLS, registers)."""
        return fixed_patch_grid(self.backbone, "mona", "its convolutions run over it"), self.backbone.num_prefix_tokens

    def adapters(self) -> list[Mona]:
        return [m for block in self.family.blocks(self.backbone) for m in (block.mona1, block.mona2)]
