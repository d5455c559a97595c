"""Visual Prompt Tuning, VPT-shallow and VPT-deep (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119).

Shallow (paper eq. 1-3):  [x1, Z1, E1] = L1([x0, P, E0]);  [xi, Zi, Ei] = Li([xi-1, Zi-1, Ei-1])
Deep    (paper eq. 4-5):  [xi, _, Ei]  = Li([xi-1, Pi-1, Ei-1])  — a fresh prompt set enters every block
                          and replaces the previous block's prompt outputs.
Choices, each the paper's unless noted:
- p learnable tokens of width D, inserted after the CLS (and any register) tokens and before the patch
  tokens, after the position embedding: prompts carry no position.
- init uniform(-v, v), v = sqrt(6 / (in_chans * patch_h * patch_w + D)) — the VPT code's Xavier bound for
  the patch projection (it hard-codes in_chans = 3; using the model's in_chans gives the same value on RGB).
- dropout on the prompts (the VPT code's prompt dropout; 0.1 for deep, 0.0 for shallow by default).
- prompts are stripped after the final norm, so the head sees exactly the tokens a plain ViT has; the
  classifier reads CLS (or whatever pooling the backbone was built with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.base import TuningModule
from methods.registry import register_method


@dataclass
class VPTOptions:
    prompt_length: int = field(default=50, metadata={"help": "prompt tokens per layer, p (paper searches 1..200)"})
    prompt_dropout: float | None = field(
        default=None, metadata={"help": "dropout on prompt tokens; None = 0.1 for deep, 0.0 for shallow"})

    def __post_init__(self):
        if int(self.prompt_length) != self.prompt_length or self.prompt_length < 1:
            raise ValueError(f"prompt_length must be a positive integer (the paper uses 1-200), "
                             f"got {self.prompt_length}.")
        self.prompt_length = int(self.prompt_length)
        if self.prompt_dropout is not None and not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}.")


class VisualPromptTuning(TuningModule):
    options_cls = VPTOptions
    deep: ClassVar[bool] = False

    def adapt(self) -> None:
        backbone = self.backbone
        depth = len(backbone.blocks) if self.deep else 1
        patch_h, patch_w = backbone.patch_embed.patch_size
        in_chans = backbone.patch_embed.proj.in_channels
        bound = math.sqrt(6.0 / float(in_chans * patch_h * patch_w + backbone.embed_dim))
        self.prompt_length = self.options.prompt_length
        self.vpt_prompts = nn.Parameter(torch.empty(depth, self.prompt_length, backbone.embed_dim))  # (L, p, D)
        nn.init.uniform_(self.vpt_prompts, -bound, bound)
        dropout = self.options.prompt_dropout
        self.prompt_dropout = nn.Dropout(dropout if dropout is not None else (0.1 if self.deep else 0.0))

    def prompts_for(self, layer: int, batch: int) -> torch.Tensor:
        return self.prompt_dropout(self.vpt_prompts[layer].expand(batch, -1, -1))  # (B, p, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        prefix = backbone.num_prefix_tokens  # CLS (+ registers)
        x = backbone.patch_embed(x)
        x = backbone._pos_embed(x)  # timm's own CLS/register concat + position embedding: (B, prefix+N, D)
        x = backbone.norm_pre(backbone.patch_drop(x))
        batch = x.shape[0]
        x = torch.cat([x[:, :prefix], self.prompts_for(0, batch), x[:, prefix:]], dim=1)  # (B, prefix+p+N, D)
        checkpointing = backbone.grad_checkpointing and torch.is_grad_enabled()
        for layer, block in enumerate(backbone.blocks):
            if self.deep and layer > 0:  # replace the previous block's prompt outputs with this layer's prompts
                x = torch.cat([x[:, :prefix], self.prompts_for(layer, batch), x[:, prefix + self.prompt_length:]],
                              dim=1)
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        x = backbone.norm(x)
        # prompts stripped, so the head sees a plain ViT's tokens: (B, prefix+N, D)
        return torch.cat([x[:, :prefix], x[:, prefix + self.prompt_length:]], dim=1)


@register_method("vpt_shallow")
class VPTShallow(VisualPromptTuning):
    deep = False


@register_method("vpt_deep")
class VPTDeep(VisualPromptTuning):
    deep = True
