"""SCT: Salient Channel Tuning (Zhao et al., IJCV 2024, "SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning
via Salient Channels", https://arxiv.org/abs/2309.08513; github:zhaohengyuan1/SCT).

Per block, a learned K x K map on the K channels of the residual stream that the training data excites most:

    x' = x + attn(norm1(x));   x'[S] = x'[S] + W x'[S] + b;   x = x' + mlp(norm2(x'))

Follows the official code's default tuning mode "sct_attn" (models/vision_transformer_sct.py `ChannelAdapter`,
train_model_sct.py `getSalientChannels`, run_model_sct.sh):
- Salient channels S (one set per block), chosen before training from the training data on the pretrained model
  (eval mode, no adapters): the input of each block's norm2 over the patch tokens (the CLS token left out); for
  each class c the L2 norm of each channel over its images and tokens, sqrt(sum x^2); the mean of those over the
  classes the data holds; the K largest (topN = 96). The code keeps channels strictly above the (K+1)-th largest
  score, so a tie there keeps fewer than K; ours keeps exactly K (torch.topk), the same set without ties.
- W, b: a Linear(K, K) per block, weight trunc-normal std 0.02, bias 0 (the code's `_init_weights`), so the model
  does NOT start as the pretrained one (`identity_at_init = False`).
- The selection reads the run's training loader (`TuningModule.select_from_data`, called once at the start of
  training) with whatever augmentation the recipe gives it; the code reads a separate loader without augmentation
  (train_aug False, batch 50; for VTAB-1k its training loader has none either). Under several processes the
  per-class sums are added over them before the norms, as one process over all the data would compute them.
- Not offered: the code's other modes ("sct_mlp" on the MLP's output, "sct_qkv" inside attention) and its
  `scale` / `scaleonx` switches, which its ChannelAdapter reads but never applies.
- The code trains with drop_path_rate 0.1 in the frozen blocks; ours keeps a frozen backbone in eval mode
  (methods/base.py), so drop-path never acts.

Tuned at ViT-B/16 (12 blocks) with K = 96 and 200 classes: 12 * (96 * 96 + 96) + 768 * 200 + 200 = 265,544; the
111,744 without the head is the paper's "0.11M" for ViT-B (its abstract, arXiv:2309.08513v5).

On a Swin, the official Swin variant (models/swin_transformer_sct.py `SwinTransformerBlock`, `BasicLayer`):
- the adapter of every block of every stage sits where the ViT's does, after the window attention's residual add
  and before norm2, on the block's (B, H, W, C) map: the code's `x = shortcut + drop_path(x); x = sct_attn(x)`.
- one K for every block (the code passes its one topN to every block of every stage), each block's K channels
  chosen among its own stage's C; K must not exceed the narrowest stage (Swin-B: 128), K = 96 by default as on ViT-B.
- generalised (ours): the code's selection for Swin is the ViT's, hard-coded for ViT-B (width 768, 12 blocks named
  `blocks.i.norm2`, the first token dropped as CLS): its hooks find no module of a Swin. Here each block's norm2
  input is measured over all its tokens (a Swin has no CLS token; its padded windows never reach norm2), per class
  over its stage's width, with the ViT's scores.
Per block K^2 + K; Swin-B (24 blocks) with 200 classes: 24 * 9,312 + 1024 * 200 + 200 = 428,488.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class SCTOptions(Options):
    method = "sct"
    channels: int = option(96, "K: salient channels tuned per block (the code's topN: 96)", kind=int, positive=True,
                           hint="official 96 on ViT-B")


class ChannelAdapter(nn.Module):
    """x[..., S] += W x[..., S] + b over the salient channels S (a buffer, set by the selection)."""

    def __init__(self, width: int, channels: int, device=None):
        super().__init__()
        self.register_buffer("channels", torch.arange(channels, device=device))  # S until SCT's selection sets it
        self.adapt_linear = nn.Linear(channels, channels, device=device)
        nn.init.trunc_normal_(self.adapt_linear.weight, std=0.02)
        nn.init.zeros_(self.adapt_linear.bias)
        self.width = width
        self.active = True  # off while SCT measures the pretrained block's channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        # under autocast the linear gives bf16/fp16 while the residual stream stays fp32: added in the stream's dtype,
        # as the code's in-place `x[..., S] += ...` casts
        update = self.adapt_linear(x.index_select(-1, self.channels)).to(x.dtype)
        return x.index_add(-1, self.channels, update)


class SalientChannelBlock(Block):
    """A timm Block with `sct` (a ChannelAdapter) on the residual stream between attention and MLP."""

    sct: ChannelAdapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self.sct(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class SalientChannelSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock with `sct` on its (B, H, W, C) map between the window attention's residual add and
    norm2 (the code's Swin block)."""

    sct: ChannelAdapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        x = self.sct(x + self.drop_path1(self._attn(self.norm1(x)))).reshape(batch, -1, dim)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, dim)


def salient_channels(sum_squares: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """The K channels with the largest mean over classes of each class's L2 norm, in ascending order.

    sum_squares: (classes, D) per class the sum over its images and tokens of x^2; counts: (classes,) its images.
    """
    norms = sum_squares[counts > 0].sqrt()  # (classes present, D)
    return norms.mean(dim=0).topk(k).indices.sort().values


@register_method("sct")
class SalientChannelTuning(TuningModule):
    label, color = "SCT", "#d6616b"
    options_cls = SCTOptions
    identity_at_init = False  # W ~ trunc-normal(0.02): the map is near, not at, zero
    selects_from_data = True
    # a family opts in with the block class that mirrors its plain timm block (the row's plain_block)
    block_classes: ClassVar[dict[type[nn.Module], type[nn.Module]]] = {Block: SalientChannelBlock,
                                                                       SwinTransformerBlock: SalientChannelSwinBlock}
    families = ("vit", "swin")

    def adapt(self) -> None:
        blocks = self.family.plain_blocks(self.backbone, "sct")  # what the block classes' forwards mirror
        adapted = self.block_classes[self.family.plain_block]
        device = self.backbone.patch_embed.proj.weight.device
        for block in blocks:
            width = self.family.width_of(block)
            if self.options.channels > width:
                raise ValueError(f"sct channels={self.options.channels} exceeds the block width {width}; choose "
                                 f"channels in 1..{width} (official: 96 of 768).")
            block.sct = ChannelAdapter(width, self.options.channels, device)
            block.__class__ = adapted  # same state-dict keys, plus `sct`

    def select_from_data(self, loader) -> None:
        """Per block, the per-class sums of squares of norm2's input over the patch tokens (a ViT's prefix tokens left
        out; a Swin has none), each over its block's width, then the K channels."""
        blocks, prefix = self.family.blocks(self.backbone), getattr(self.backbone, "num_prefix_tokens", 0)
        sums = [torch.zeros(self.num_classes, self.family.width_of(block), device=self.device) for block in blocks]
        counts = torch.zeros(self.num_classes, device=self.device)
        labels_now: list[torch.Tensor] = []

        def record(index: int):
            def hook(_module, inputs):
                squares = inputs[0][:, prefix:].float().square().sum(dim=1)  # (B, D)
                sums[index].index_add_(0, labels_now[0], squares)
            return hook

        norm = self.family.norms[1]
        handles = [block.get_submodule(norm).register_forward_pre_hook(record(i)) for i, block in enumerate(blocks)]
        was_training = self.training
        self.eval()
        for block in blocks:
            block.sct.active = False
        try:
            with torch.no_grad():
                for batch in loader:
                    images, labels = self.batch_on_device(batch)
                    labels_now[:] = [labels]
                    counts += torch.bincount(labels, minlength=self.num_classes).to(counts)
                    self.backbone.forward_features(images)
        finally:
            for handle in handles:
                handle.remove()
            for block in blocks:
                block.sct.active = True
            self.train(was_training)
        sums, counts = [self.summed_over_processes(t) for t in sums], self.summed_over_processes(counts)
        for i, block in enumerate(blocks):
            block.sct.channels.copy_(salient_channels(sums[i], counts, self.options.channels))
