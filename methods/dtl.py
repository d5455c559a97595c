"""DTL, disentangled transfer learning (Fu, Zhu & Wu, AAAI 2024, https://arxiv.org/abs/2312.07856): a compact side
network of low-rank maps reads the input of every block, sums their outputs, and adds the sum back into the backbone
after the later blocks, through a steep swish; the backbone itself runs unchanged:

    r_i = r_{i-1} + B_i A_i x_i          for the blocks i that feed the side network (x_i: block i's input)
    x_{i+1} = block_i(x_i) + swish_beta(r_i)    for the blocks i that take it back,  swish_beta(z) = z sigmoid(beta z)

Follows the official code (github.com/heekhero/DTL, models/vision_transformer.py: `LoRALinear`, `swish`,
`VisionTransformer.forward`; train_scripts/vit/vtab/*/train_dtl.sh and train_vit_vtab.py for the values).
Choices, and whose:
- rank r = 2, beta = 100, every block feeds the side network (--lora_before_blocks 0-11) and the last half takes
  it back (--add_after_blocks 6-11, blocks 7-12 of 12): the code's VTAB-1k scripts. Blocks are counted from 1 here,
  as VPT's prompt_layers are (`read_blocks=1-12`, `add_blocks=7-12`).
- A (r x D) Kaiming-uniform (a = sqrt(5)), B (D x r) zero, no biases: the code's LoRALinear. With B zero the sum is
  zero, swish(0) = 0, so the blocks start as the pretrained ones.
- DTL+ (`fusion_size=3`): the summed, activated side output is mixed over the patch grid by one depth-wise k x k
  convolution (no bias, shared by all blocks, PyTorch's init); prefix tokens skip it: the code's `lora_fusion`. Off
  (0) by default, as DTL.
- the head: the mean of the patch tokens (prefix tokens left out), then the backbone's final norm, then the head:
  the code's `x[:, num_tokens:].mean(dim=1)`, `norm`, `head`; `pool="backbone"` uses the backbone's own head
  (final norm, then its pooling, CLS on ViT-B) instead. With the code's pool the logits differ from the plain
  backbone's from the start, though every token does not.
- the code trains with drop_path 0.1 in the frozen backbone: `drop_path=0.1` (RECIPE=paper), 0 by default.

On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 12 * 2 * 2 * 768 + (768*200 + 200) = 190,664 tuned parameters
(36,864 in the side network; not checked against the paper's table); DTL+ adds 768 * 3 * 3 = 6,912. The side network is
`dtl_side.<block>.{down,up}`, the fusion `dtl_fusion`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from backbones import fixed_patch_grid
from methods.base import TuningModule
from methods.options import Options, drop_path_option, option
from methods.registry import register_method
from methods.vpt import parse_layers


@dataclass
class DTLOptions(Options):
    method = "dtl"
    rank: int = option(2, "r of each low-rank map (the code's VTAB scripts: 2)", kind=int, positive=True)
    beta: float = option(100.0, "beta of the swish on the side output (the code's 100)", kind=float, low=0,
                         low_open=True)
    read_blocks: str | int | None = option(None, "blocks (from 1) whose input feeds the side network, e.g. 1-12; "
                                           "None = every block (the code's --lora_before_blocks 0-11)", kind=None)
    add_blocks: str | int | None = option(None, "blocks (from 1) after which the side output is added back, e.g. "
                                          "7-12; None = the last half (the code's --add_after_blocks 6-11)",
                                          kind=None)
    fusion_size: int = option(0, "k of DTL+'s depth-wise k x k conv over the patch grid; 0 = DTL (the code's "
                              "--fusion_size 0 in its DTL scripts, 3 in DTL+)", kind=int, low=0)
    pool: str = option("patch_mean", "patch_mean (the code's: mean of the patch tokens, then the final norm) or "
                       "backbone (the backbone's own head)", kind=str, choices=("patch_mean", "backbone"))
    drop_path: float = drop_path_option()

    def __post_init__(self):
        super().__post_init__()
        for name in ("read_blocks", "add_blocks"):  # a syntax; the depth is checked with the backbone
            value = getattr(self, name)
            try:
                if value is not None:
                    parse_layers(value)
            except ValueError:
                raise ValueError(f"dtl {name} must be block numbers counted from 1: a range (7-12) or parts joined by "
                                 f"'+' (1+3+7-9), got {value!r}.") from None
        if self.fusion_size and self.fusion_size % 2 == 0:
            raise ValueError(f"dtl fusion_size must be odd (a 'same'-padded k x k conv, e.g. 3), got "
                             f"{self.fusion_size}.")


class LowRank(nn.Module):
    """x -> B A x, rank r, no bias: the code's LoRALinear (A Kaiming-uniform, B zero)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # nn.Linear's init is the code's kaiming_uniform_(a=sqrt(5))
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def swish(z: torch.Tensor, beta: float) -> torch.Tensor:
    return z * torch.sigmoid(beta * z)


@register_method("dtl")
class DTLTuning(TuningModule):
    label, color = "DTL", "#e7ba52"
    options_cls = DTLOptions
    identity_at_init = False  # the code's pool (patch mean, then norm) is not the backbone's head; tokens start equal

    def adapt(self) -> None:
        backbone, options = self.backbone, self.options
        depth, dim = len(self.family.blocks(backbone)), backbone.embed_dim
        read = self.blocks_from(options.read_blocks, depth) if options.read_blocks is not None else list(range(depth))
        add = (self.blocks_from(options.add_blocks, depth) if options.add_blocks is not None
               else list(range(depth // 2, depth)))
        if min(read) > min(add):
            raise ValueError(f"dtl adds the side output back after block {min(add) + 1}, but the first block that "
                             f"feeds it is {min(read) + 1}: add_blocks must start at or after read_blocks' first.")
        self.add_after = set(add)
        if options.drop_path:
            self.family.set_drop_path(backbone, options.drop_path)  # the code's --drop_path 0.1
        device = next(backbone.parameters()).device
        self.dtl_side = nn.ModuleDict({str(i): LowRank(dim, options.rank) for i in read}).to(device)
        self.dtl_fusion = None
        if options.fusion_size:
            self.grid = self.patch_grid()
            self.dtl_fusion = nn.Conv2d(dim, dim, options.fusion_size, padding="same", groups=dim, bias=False)
            self.dtl_fusion.to(device)

    @staticmethod
    def blocks_from(value, depth: int) -> list[int]:
        """Block numbers counted from 1 (`1-12`) as indices from 0, each checked against the depth."""
        layers = parse_layers(value)
        if layers[-1] > depth:
            raise ValueError(f"dtl block {layers[-1]} in {value!r} is beyond the backbone's {depth} blocks "
                             "(counted from 1).")
        return [layer - 1 for layer in layers]

    def patch_grid(self) -> tuple[int, int]:
        return fixed_patch_grid(self.backbone, "dtl fusion_size > 0 (DTL+)", "its conv runs over it",
                                "use fusion_size=0 on it")

    def fuse(self, side: torch.Tensor) -> torch.Tensor:
        """DTL+'s depth-wise conv over the patch tokens' grid; prefix tokens pass unchanged. (B, prefix+N, D)"""
        if self.dtl_fusion is None:
            return side
        prefix, (grid_h, grid_w) = self.backbone.num_prefix_tokens, self.grid
        batch, tokens, dim = side.shape
        patches = side[:, prefix:].reshape(batch, grid_h, grid_w, dim).permute(0, 3, 1, 2)  # (B, D, H, W)
        patches = self.dtl_fusion(patches).permute(0, 2, 3, 1).reshape(batch, grid_h * grid_w, dim)
        return torch.cat([side[:, :prefix], patches], dim=1)

    def blocks_output(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's tokens after its last block, with the side network added back (before the final norm)."""
        backbone, beta = self.backbone, float(self.options.beta)
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))  # (B, prefix+N, D)
        checkpointing = backbone.grad_checkpointing and torch.is_grad_enabled()
        side = torch.zeros((), dtype=x.dtype, device=x.device)
        for i, block in enumerate(backbone.blocks):
            if str(i) in self.dtl_side:
                side = side + self.dtl_side[str(i)](x)  # reads block i's input
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
            if i in self.add_after:
                x = x + self.fuse(swish(side, beta))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(self.blocks_output(x))  # (B, prefix+N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.pool == "backbone":
            return self.backbone.forward_head(self.forward_features(x))
        backbone = self.backbone
        pooled = self.blocks_output(x)[:, backbone.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return backbone.head(backbone.head_drop(backbone.norm(pooled)))  # (B, C)
