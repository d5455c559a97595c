"""DTL, disentangled transfer learning (Fu, Zhu & Wu, AAAI 2024, https://arxiv.org/abs/2312.07856): a compact side
network of low-rank maps reads the input of every block, sums their outputs, and adds the sum back into the backbone
after the later blocks, through a steep swish; the backbone itself runs unchanged:

    r_i = r_{i-1} + B_i A_i x_i          for the blocks i that feed the side network (x_i: block i's input)
    x_{i+1} = block_i(x_i) + swish_beta(r_i)    for the blocks i that take it back,  swish_beta(z) = z sigmoid(beta z)

Follows the official code (github.com/heekhero/DTL, models/vision_transformer.py: `LoRALinear`, `swish`,
`VisionTransformer.forward`; train_scripts/vit/vtab/*/train_dtl.sh and train_vit_vtab.py for the values).
Choices, and whose:
- rank r = 2 (`rank=None`), beta = 100, every block feeds the side network (--lora_before_blocks 0-11) and the last
  half takes it back (--add_after_blocks 6-11, blocks 7-12 of 12): the code's VTAB-1k scripts. Blocks are counted
  from 1 here, as VPT's prompt_layers are (`read_blocks=1-12`, `add_blocks=7-12`).
- A (r x D) Kaiming-uniform (a = sqrt(5)), B (D x r) zero, no biases: the code's LoRALinear. With B zero the sum is
  zero, swish(0) = 0, so the blocks start as the pretrained ones.
- DTL+ (`fusion_size=3`): the summed, activated side output is mixed over the patch grid by one depth-wise k x k
  convolution (no bias, shared by all blocks, PyTorch's init); prefix tokens skip it: the code's `lora_fusion`. Off
  (0) by default, as DTL.
- the head: the mean of the patch tokens (prefix tokens left out), then the backbone's final norm, then the head:
  the code's `x[:, num_tokens:].mean(dim=1)`, `norm`, `head` (`pool=None`); `pool="backbone"` uses the backbone's
  own head (final norm, then its pooling, CLS on ViT-B) instead. With the code's pool the logits differ from the
  plain backbone's from the start, though every token does not.
- the code trains with drop_path 0.1 in the frozen backbone: `drop_path=0.1` (RECIPE=paper), 0 by default.

On ViT-B/16 (D = 768, 12 blocks) with 200 classes: 12 * 2 * 2 * 768 + (768*200 + 200) = 190,664 tuned parameters
(36,864 in the side network; not checked against the paper's table); DTL+ adds 768 * 3 * 3 = 6,912. The side network is
`dtl_side.<block>.{down,up}`, the fusion `dtl_fusion`.

On a Swin, the official Swin variant (models/swin_transformer.py: `LoRALayer`, `BasicLayer.forward`,
`SwinTransformer.forward_features`; train_scripts/swin/vtab/*/train_dtl{,+}.sh and train_swin_vtab.py for the values):
- the side sum starts from zero at every stage (the code passes `residual=0.0` to each `BasicLayer`) and returns only
  after blocks of the same stage; each low-rank map has its block's width C. Blocks are still counted from 1 over all
  stages in forward order (Swin-B: 1-24).
- rank r = 4 (`rank=None`: 2 on a ViT, 4 on a Swin), beta = 100; Swin-B reads blocks 5-24 and adds after 15-24 (the
  scripts' --lora_before_blocks 4-23 --add_after_blocks 14-23, from 0): the last two stages read, the second half of
  those add.
- the default on other Swins is ours: read the blocks of the last two stages, add after the second half of them (the
  ViT's rule: of n read, the last n - n // 2, which gives the official 10 of Swin-B's 20); read blocks of a stage
  that holds no adding block are left out, since their sum restarts at the stage's end before any add and could never
  reach the output (Swin-B: every read stage adds, the official set). Given read_blocks that fall in such a stage are
  refused for the same reason. On the tests' tiny Swin (depths 2, 2) read = add = the last stage's 2 blocks.
- DTL+: one depth-wise k x k conv (no bias) per stage over the stage's H x W map, the code's `lora_fusions[stage]`;
  the scripts use `fusion_size=5`. Ours: only stages with adding blocks get one (the code builds four, two of them
  never used on Swin-B, 25 * (128 + 256) = 9,600 parameters that get no gradient).
- the head: the final norm, then the average over the map, then the linear: the code's `norm`, `avgpool`, `head`,
  which is timm's Swin head (`pool=None`: patch_mean on a ViT, backbone on a Swin; `patch_mean` on a Swin averages
  first, then norms, as on the ViT). With B zero every token, and so every logit, starts as the plain Swin's.
- the scripts' drop_path is 0.0 to 0.5 per task (drop_path=..., timm's linear rule over the 24 blocks, as the code).
Count: sum over read blocks of 2 r C, plus k^2 C per adding stage for DTL+. Swin-B with 200 classes: 2 * 4 * (18 * 512
+ 2 * 1024) + (1024*200 + 200) = 90,112 + 205,000 = 295,112; DTL+ (k = 5) adds 25 * (512 + 1024) = 38,400. The
fusion is `dtl_fusion.<stage>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

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
    rank: int | None = option(None, "r of each low-rank map; None = the code's VTAB scripts: 2 on a ViT, 4 on a Swin",
                              kind=int, positive=True)
    beta: float = option(100.0, "beta of the swish on the side output (the code's 100)", kind=float, low=0,
                         low_open=True)
    read_blocks: str | int | None = option(None, "blocks (from 1) whose input feeds the side network, e.g. 1-12; "
                                           "None = every block of a ViT (the code's --lora_before_blocks 0-11), the "
                                           "last two stages' of a Swin (Swin-B: 5-24)", kind=None)
    add_blocks: str | int | None = option(None, "blocks (from 1) after which the side output is added back, e.g. "
                                          "7-12; None = the last half of the default read blocks (the code's "
                                          "--add_after_blocks 6-11 on ViT-B, 14-23 on Swin-B)", kind=None)
    fusion_size: int = option(0, "k of DTL+'s depth-wise k x k conv over the patch grid (a Swin: one per adding "
                              "stage); 0 = DTL (the code's --fusion_size 0 in its DTL scripts, 3 in DTL+ on ViT, 5 "
                              "on Swin)", kind=int, low=0)
    pool: str | None = option(None, "patch_mean (the code's ViT head: mean of the patch tokens, then the final norm) "
                              "or backbone (the backbone's own head: the code's Swin head); None = the code's for "
                              "the family", kind=str, choices=("patch_mean", "backbone"))
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


def depthwise(width: int, size: int) -> nn.Conv2d:
    """DTL+'s fusion: a depth-wise size x size conv, 'same' padding, no bias (the code's lora_fusion)."""
    return nn.Conv2d(width, width, size, padding="same", groups=width, bias=False)


@register_method("dtl")
class DTLTuning(TuningModule):
    label, color = "DTL", "#e7ba52"
    options_cls = DTLOptions
    identity_at_init = False  # the code's ViT pool (patch mean, then norm) is not the ViT's head; tokens start equal
    families = ("vit", "swin")
    # the code's VTAB scripts per family (rank=None, pool=None): train_scripts/vit/vtab/*, train_scripts/swin/vtab/*
    code_rank: ClassVar[dict[str, int]] = {"vit": 2, "swin": 4}
    code_pool: ClassVar[dict[str, str]] = {"vit": "patch_mean", "swin": "backbone"}

    def adapt(self) -> None:
        backbone, options = self.backbone, self.options
        self.swin = self.family.name == "swin"
        blocks = self.family.blocks(backbone)
        stages = self.stage_blocks(blocks)
        read, add = self.read_and_add(stages, len(blocks))
        self.add_after = set(add)
        self.rank = options.rank or self.code_rank[self.family.name]
        self.pool = options.pool or self.code_pool[self.family.name]
        if options.drop_path:
            self.family.set_drop_path(backbone, options.drop_path)  # the code's --drop_path (0.1 on ViT)
        device = next(backbone.parameters()).device
        self.dtl_side = nn.ModuleDict({str(i): LowRank(self.family.width_of(blocks[i]), self.rank)
                                       for i in read}).to(device)
        self.dtl_fusion = None
        if options.fusion_size and self.swin:  # one conv per stage that adds (the code's lora_fusions[stage])
            widths = {s: self.family.width_of(blocks[stage[0]]) for s, stage in enumerate(stages)
                      if self.add_after.intersection(stage)}
            self.dtl_fusion = nn.ModuleDict({str(s): depthwise(width, options.fusion_size)
                                             for s, width in widths.items()}).to(device)
        elif options.fusion_size:
            self.grid = self.patch_grid()
            self.dtl_fusion = depthwise(self.family.width_of(blocks[0]), options.fusion_size).to(device)

    def stage_blocks(self, blocks: list[nn.Module]) -> list[list[int]]:
        """Each stage's blocks as indices into `blocks` (forward order); a ViT is one stage."""
        stages = self.family.stages(self.backbone)
        if not stages:
            return [list(range(len(blocks)))]
        index = {id(block): i for i, block in enumerate(blocks)}
        return [[index[id(m)] for m in stage.modules() if id(m) in index] for stage in stages]

    def read_and_add(self, stages: list[list[int]], depth: int) -> tuple[list[int], list[int]]:
        """The blocks (from 0) that feed the side sum and those after which it returns. By default the last two
        stages' blocks read (a ViT's one stage: every block) and the second half of them add; default read blocks in
        a stage without an add are left out (the sum restarts at the stage's end), given ones refused."""
        options = self.options
        given_read = self.blocks_from(options.read_blocks, depth) if options.read_blocks is not None else None
        default_read = [i for stage in stages[-2:] for i in stage]
        add = (self.blocks_from(options.add_blocks, depth) if options.add_blocks is not None
               else default_read[len(default_read) // 2:])
        adding = [stage for stage in stages if set(add).intersection(stage)]
        in_adding = {i for stage in adding for i in stage}
        if given_read is None:
            read = [i for i in default_read if i in in_adding]
        else:
            read = given_read
            unused = [i + 1 for i in read if i not in in_adding]
            if unused:
                raise ValueError(f"dtl read block(s) {unused} lie in a stage with no add_blocks: the side sum restarts "
                                 "at every stage, so they could never reach the output; read only in adding stages.")
        for stage in adding:
            first_add, reads = min(set(add).intersection(stage)), [i for i in stage if i in read]
            if not reads or min(reads) > first_add:
                where = "" if len(stages) == 1 else f" in its stage (blocks {stage[0] + 1}-{stage[-1] + 1})"
                raise ValueError(f"dtl adds the side output back after block {first_add + 1}, but the first block that "
                                 f"feeds it{where} is {min(reads) + 1 if reads else 'none'}: add_blocks must start at "
                                 "or after read_blocks' first.")
        return read, add

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

    def fuse_map(self, side: torch.Tensor, stage: int) -> torch.Tensor:
        """DTL+ on a Swin: the stage's depth-wise conv over its map. (B, H, W, C)"""
        if self.dtl_fusion is None:
            return side
        return self.dtl_fusion[str(stage)](side.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def run_blocks(self, x: torch.Tensor, blocks: nn.Module, first: int, checkpointing: bool,
                   fuse: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x through `blocks` (numbered from `first`), the side sum starting from zero: a ViT's blocks, or one stage
        of a Swin's (the code's residual=0.0 per BasicLayer)."""
        beta = float(self.options.beta)
        side = torch.zeros((), dtype=x.dtype, device=x.device)
        for i, block in enumerate(blocks, start=first):
            if str(i) in self.dtl_side:
                side = side + self.dtl_side[str(i)](x)  # reads block i's input
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
            if i in self.add_after:
                x = x + fuse(swish(side, beta))
        return x

    def blocks_output(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's tokens after its last block, with the side network added back (before the final norm)."""
        backbone = self.backbone
        if self.swin:
            return self.swin_blocks_output(x)
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))  # (B, prefix+N, D)
        checkpointing = backbone.grad_checkpointing and torch.is_grad_enabled()
        return self.run_blocks(x, backbone.blocks, 0, checkpointing, self.fuse)

    def swin_blocks_output(self, x: torch.Tensor) -> torch.Tensor:
        """timm's Swin stages (merge, then blocks), each with its own side sum. (B, H, W, C)"""
        x, first = self.backbone.patch_embed(x), 0  # (B, H, W, C0), patch norm included
        for s, stage in enumerate(self.backbone.layers):
            x = stage.downsample(x)
            checkpointing = stage.grad_checkpointing and torch.is_grad_enabled()
            x = self.run_blocks(x, stage.blocks, first, checkpointing, partial(self.fuse_map, stage=s))
            first += len(stage.blocks)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(self.blocks_output(x))  # (B, prefix+N, D); a Swin's (B, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "backbone":
            return self.backbone.forward_head(self.forward_features(x))
        backbone = self.backbone
        if self.swin:  # the mean over the map, normed, through timm's head as a 1 x 1 map
            return backbone.forward_head(backbone.norm(self.blocks_output(x).mean(dim=(1, 2), keepdim=True)))
        pooled = self.blocks_output(x)[:, backbone.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return backbone.head(backbone.head_drop(backbone.norm(pooled)))  # (B, C)
