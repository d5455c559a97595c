"""AdaptFormer (Chen et al., NeurIPS 2022, https://arxiv.org/abs/2205.13535): a bottleneck beside each block's MLP.

Follows the official code (github.com/ShoufaChen/AdaptFormer, models/custom_modules.py and models/adapter.py, with
main_image.py's tuning_config: ffn_option "parallel", ffn_adapter_layernorm_option "none", ffn_adapter_init_option
"lora", ffn_adapter_scalar "0.1", ffn_num 64):

    x' = x + attn(norm1(x))
    x  = x' + mlp(norm2(x')) + s * up(dropout(relu(down(x'))))

- The branch reads x', the block's residual stream before norm2 — the code's choice: its Adapter has an optional
  LayerNorm on its input, switched off ("none") in main_image.py. PETL_Vision's AdaptFormer reads it there too
  (ft_mlp_ln: before).
- bottleneck 64, fixed scale s = 0.1, ReLU and dropout 0.1 on the bottleneck: the code's defaults.
- init ("lora" in the code): `down` Kaiming-uniform (a = sqrt(5)) with a zero bias, `up` weight and bias zero, so the
  block starts as the pretrained one.
- The branch's output is added outside the block's drop-path and layer scale, as the code adds it after
  drop_path(fc2(...)).

On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 12 * (768*64 + 64 + 64*768 + 768) + (768*200 + 200) = 1,343,432
tuned parameters. Blocks keep their state-dict keys; the branch adds `blocks.i.adaptmlp.{down,up}_proj.*` (the
code's names).

On a Swin (the official code has no image Swin): as V-PETL Bench's Swin AdaptFormer (github:synbol/Parameter-
Efficient-Transfer-Learning-Benchmark, VideoActionRecognition/models/video_swin_transformer_AdaptFormer.py, `Mlp`
with ffn_option "parallel", layernorm option "none", scalar 0.1, ffn_num 64): the AdaptMLP sits inside every
block's MLP, of that block's width, and reads the MLP's input, norm2(x') (the paper's eq. 2, x~ = ReLU(LN(x') W_down)
W_up):

    x  = x' + mlp(norm2(x')) + s * up(dropout(relu(down(norm2(x')))))

so on a Swin it is inside the block's drop-path (an identity on a frozen backbone). Its keys are
`layers.i.blocks.j.mlp.adaptmlp.*` (V-PETL's names). Dropout 0.1 as on the ViT (ours: V-PETL passes its MLP's
dropout rate, 0 in its runs). Swin-B, 200 classes: sum over blocks of (129 C + 64) + head = 1,758,664.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method

ADAPTER_DROPOUT = 0.1  # the code's Adapter(..., dropout=0.1) in models/custom_modules.py


@dataclass
class AdaptFormerOptions(Options):
    method = "adaptformer"
    bottleneck: int = option(64, "bottleneck width of each AdaptMLP (the code's ffn_num: 64)", kind=int, low=1)
    scale: float = option(0.1, "fixed scale s of the branch's output (the code's 0.1)", kind=float, low=0,
                          low_open=True)


class AdaptMLP(nn.Module):
    """down -> ReLU -> dropout -> up, times a fixed scale; no residual of its own (the block adds it)."""

    def __init__(self, dim: int, bottleneck: int, scale: float):
        super().__init__()
        self.scale = scale
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(ADAPTER_DROPOUT)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.dropout(F.relu(self.down_proj(x)))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class AdaptFormerBlock(Block):
    """A timm Block with an AdaptMLP (`adaptmlp`) beside its MLP, reading the MLP's input before norm2."""

    adaptmlp: AdaptMLP

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adaptmlp(x)


class AdaptFormerMlp(Mlp):
    """A Swin block's timm Mlp with an AdaptMLP (`adaptmlp`) beside it, reading the same (normed) input."""

    adaptmlp: AdaptMLP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.adaptmlp(x)


@register_method("adaptformer")
class AdaptFormerTuning(TuningModule):
    label, color = "AdaptFormer", "#d62728"
    options_cls = AdaptFormerOptions
    families = ("vit", "swin")

    def adapt(self) -> None:
        family = self.family
        # where the branch reads differs per family (the official ViT code: the residual stream before norm2; V-PETL's
        # Swin: the MLP's input), so this stays a branch
        swin = family.name == "swin"
        for i, block in enumerate(family.plain_blocks(self.backbone, "adaptformer")):  # what the forwards above mirror
            adaptmlp = AdaptMLP(family.width_of(block), self.options.bottleneck, float(self.options.scale))
            adaptmlp = adaptmlp.to(next(block.parameters()).device)
            if not swin:
                block.adaptmlp = adaptmlp
                block.__class__ = AdaptFormerBlock  # same parameters and state-dict keys, plus `adaptmlp`
            elif type(block.mlp) is Mlp:
                block.mlp.adaptmlp = adaptmlp
                block.mlp.__class__ = AdaptFormerMlp  # same keys, plus `mlp.adaptmlp`
            else:
                raise ValueError(f"adaptformer needs timm's plain Mlp in a Swin block; blocks[{i}] has "
                                 f"{type(block.mlp).__name__}.")

    def adapters(self) -> list[AdaptMLP]:
        return [block.mlp.adaptmlp if isinstance(block.mlp, AdaptFormerMlp) else block.adaptmlp
                for block in self.family.blocks(self.backbone)]
