"""The backbone families, one row each: how to recognise a built timm model of the family and where its parts are.

A method declares the families it supports (`TuningModule.families`) and reads the row of the backbone it wraps
instead of branching on family names: its blocks in forward order, each block's width, the attention and MLP
linears a tuner adapts. Parts are module names as regexes matched in full against `named_modules()`, the way peft's
`target_modules` are, and each target is anchored to a block: a bare "proj" would also match `patch_embed.proj`, a
Conv2d. A new family is a new row here plus the methods that opt in to it (docs/backbones.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from operator import attrgetter

from timm.layers import DropPath, calculate_drop_path_rates
from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


@dataclass(frozen=True)
class Family:
    """One backbone family (a row of `FAMILIES`); `block` etc. are regexes over the model's module names."""

    name: str
    covers: str  # what the family holds, in words (error messages, docs/backbones.md)
    classes: tuple[type[nn.Module], ...]  # a built model is of this family when it is an instance of one of them
    block: str  # a block's module name; `named_modules()` lists the blocks in forward order
    stage: str | None = None  # a stage's module name: blocks at one width, with the downsampling that starts it
    merge: str | None = None  # a module between blocks that changes the width (not inside a block or stage)
    plain_block: type[nn.Module] | None = None  # timm's block class, whose forward a block-rewriting method mirrors
    width: str | None = None  # attribute path from a block to its width (the channels its MLP reads)
    norms: tuple[str, ...] = ()  # a block's norms: the one before attention, the one before the MLP
    attention: str | None = None  # a block's attention module
    attention_linears: tuple[str, ...] = ()  # the attention's linears in forward order: fused q/k/v in, out
    mlp: str | None = None  # a block's MLP module
    mlp_linears: tuple[str, ...] = ()  # the MLP's linears in forward order
    after_blocks: tuple[str, ...] = ()  # modules between the last block and the classifier, where the model has them
    drop_paths: tuple[str, ...] = ()  # a block's drop-path (stochastic depth) modules, one per residual branch

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.classes)

    def find(self, model: nn.Module, pattern: str | None) -> list[nn.Module]:
        """The modules of `model` whose names match `pattern` in full, in forward order; none for no pattern."""
        if pattern is None:
            return []
        return [module for name, module in model.named_modules() if re.fullmatch(pattern, name)]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks in forward order: a ViT's `blocks`, a Swin's blocks of every stage, stage by stage."""
        return self.find(model, self.block)

    def stages(self, model: nn.Module) -> list[nn.Module]:
        return self.find(model, self.stage)

    def blocks_and_merges(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """("block" or "merge", module) for every block and every merge, in forward order (a Swin's patch merge
        between the blocks of two stages)."""
        kinds = [(kind, pattern) for kind, pattern in (("merge", self.merge), ("block", self.block)) if pattern]
        parts = []
        for name, module in model.named_modules():
            kind = next((kind for kind, pattern in kinds if re.fullmatch(pattern, name)), None)
            if kind is not None:
                parts.append((kind, module))
        return parts

    def plain_blocks(self, model: nn.Module, method: str) -> list[nn.Module]:
        """`blocks(model)`, each checked to be the family's plain timm block (a ViT's `Block`, a Swin's
        `SwinTransformerBlock`): the class whose forward a block-rewriting method mirrors; any other is a ValueError."""
        if self.plain_block is None:
            raise ValueError(f"{method} rewrites transformer blocks; the {self.name} family has none.")
        blocks = self.blocks(model)
        for i, block in enumerate(blocks):
            if type(block) is not self.plain_block:
                raise ValueError(f"{method} needs timm's plain {self.plain_block.__name__}; blocks[{i}] is "
                                 f"{type(block).__name__}.")
        return blocks

    def width_of(self, block: nn.Module) -> int:
        """A block's width: a ViT's embed_dim, a Swin block's stage width (what its MLP reads)."""
        if self.width is None:
            raise ValueError(f"The {self.name} family's row gives no block width.")
        return attrgetter(self.width)(block)

    @property
    def attention_layers(self) -> tuple[str, ...]:
        """The attention's linears, block-relative ("attn.qkv", "attn.proj")."""
        return tuple(f"{self.attention}.{name}" for name in self.attention_linears)

    @property
    def mlp_layers(self) -> tuple[str, ...]:
        """The MLP's linears, block-relative ("mlp.fc1", "mlp.fc2")."""
        return tuple(f"{self.mlp}.{name}" for name in self.mlp_linears)

    def targets(self, *layers: str) -> str:
        """A peft-style `target_modules` regex: `layers` (block-relative, e.g. "attn.qkv") of every block."""
        if not layers:
            raise ValueError(f"targets of the {self.name} family need at least one layer.")
        return rf"(?:{self.block})\.(?:{'|'.join(re.escape(layer) for layer in layers)})"

    def set_drop_path(self, model: nn.Module, rate: float) -> list[float]:
        """Stochastic depth on a built model, as timm's create_model(drop_path_rate=rate) builds it: block i of n (in
        forward order, a Swin's blocks of every stage in one list) drops each residual branch per sample with rate
        rate * i / (n - 1) (timm's calculate_drop_path_rates), a timm DropPath, or Identity at rate 0. Returns the
        rates. New modules: a method that sets them after freezing keeps them in train mode while it trains."""
        if not self.drop_paths:
            raise ValueError(f"The {self.name} family's row names no drop-path modules; drop_path must be 0.")
        blocks = self.blocks(model)
        rates = calculate_drop_path_rates(rate, len(blocks))
        for block, block_rate in zip(blocks, rates, strict=True):
            for name in self.drop_paths:
                setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())
        return rates

    def after_blocks_of(self, model: nn.Module) -> list[nn.Module]:
        """The modules between the last block and the classifier that `model` has (e.g. a ViT's `norm`, and
        `fc_norm` / `attn_pool` where built with them)."""
        found = []
        for name in self.after_blocks:
            try:
                found.append(model.get_submodule(name))
            except AttributeError:  # absent, or None (timm's ViT without attention pooling)
                continue
        return found


TRANSFORMER_BLOCK = dict(width="mlp.fc1.in_features", norms=("norm1", "norm2"), attention="attn",
                         attention_linears=("qkv", "proj"), mlp="mlp", mlp_linears=("fc1", "fc2"),
                         drop_paths=("drop_path1", "drop_path2"))

# The rows, in the order docs and tables list them; a model is of the first family whose classes it is an instance of.
FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("vit", "plain ViTs: timm VisionTransformer (vit_*, deit_*, the embedded vit_embedded_p7_28)",
           classes=(VisionTransformer,), block=r"blocks\.\d+", plain_block=Block,
           after_blocks=("norm", "fc_norm", "attn_pool"), **TRANSFORMER_BLOCK),
    Family("swin", "Swin Transformers: timm SwinTransformer (swin_*)",
           classes=(SwinTransformer,), block=r"layers\.\d+\.blocks\.\d+", stage=r"layers\.\d+",
           merge=r"layers\.\d+\.downsample", plain_block=SwinTransformerBlock, after_blocks=("norm",),
           **TRANSFORMER_BLOCK),
    Family("convnet", "ConvNets: timm ResNet and ConvNeXt (resnet*, convnext*)",
           classes=(ResNet, ConvNeXt), block=r"stages\.\d+\.blocks\.\d+|layer\d+\.\d+", stage=r"stages\.\d+|layer\d+",
           after_blocks=("norm_pre", "head.norm")),
)}


def fixed_patch_grid(model: nn.Module, who: str, why: str, fix: str = "") -> tuple[int, int]:
    """A ViT's fixed patch grid (rows, columns), for a method whose convolution runs over the patch tokens laid out on
    it; a model without one (dynamic_img_size, or no patch_embed.grid_size) is refused, naming `who` needs it, `why`,
    and (optional) the `fix`."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or getattr(model, "dynamic_img_size", False):
        has = "dynamic_img_size=True" if grid is not None else "no patch_embed.grid_size"
        raise ValueError(f"{who} needs a fixed patch grid ({why}); this backbone has {has}{f'; {fix}' if fix else ''}.")
    return int(grid[0]), int(grid[1])


def family_of(model: nn.Module) -> Family | None:
    """The row of a built timm model's family, or None when the suite has no methods for it."""
    return next((family for family in FAMILIES.values() if family.matches(model)), None)


def family_table() -> str:
    """The rows as a Markdown table, one column per family: what docs/backbones.md shows (`python -m benchmark.params
    --family-table` prints it; tests/backbones/test_families.py checks the docs hold the current one)."""

    def cell(value) -> str:
        if value is None or value == ():
            return "–"
        if isinstance(value, tuple):
            return ", ".join(cell(item) for item in value)
        if isinstance(value, type):
            return f"`{value.__name__}`"
        return f"`{value}`".replace("|", "\\|")

    fields = {
        "recognised as (isinstance)": lambda f: f.classes, "block (module name)": lambda f: f.block,
        "stage": lambda f: f.stage, "merge (between stages)": lambda f: f.merge, "plain block": lambda f: f.plain_block,
        "width (from a block)": lambda f: f.width, "norms (before attention, MLP)": lambda f: f.norms,
        "attention linears": lambda f: f.attention_layers, "MLP linears": lambda f: f.mlp_layers,
        "after the blocks": lambda f: f.after_blocks, "drop-paths (stochastic depth)": lambda f: f.drop_paths,
        "attention targets (peft)": lambda f: f.targets(*f.attention_layers) if f.attention else None,
    }
    lines = ["| Row | " + " | ".join(f"`{name}`" for name in FAMILIES) + " |", "|:---|" + ":---|" * len(FAMILIES),
             "| covers | " + " | ".join(family.covers for family in FAMILIES.values()) + " |"]
    for title, value in fields.items():
        lines.append(f"| {title} | " + " | ".join(cell(value(family)) for family in FAMILIES.values()) + " |")
    return "\n".join(lines) + "\n"
