"""Selective tuning of the attention or the MLP of each block, as PETL_Vision implements it (Mai et al., "Lessons
and Insights from a Unifying Study of Parameter-Efficient Fine-Tuning (PEFT) in Visual Recognition", CVPR 2025,
https://arxiv.org/abs/2409.16434; github:OSU-MLB/PETL_Vision, experiment/build_model.py).

PETL_Vision's `--attention_index` / `--attention_type {qkv, proj, full}` and `--mlp_index` / `--mlp_type {fc1, fc2,
full}` add `<i>.attn.qkv`, `<i>.attn.proj`, `<i>.mlp.fc1`, `<i>.mlp.fc2` to its list of tuned name fragments: the
chosen linears of the chosen blocks train whole (weight and bias), with the new head; everything else stays frozen.
Choices, each PETL_Vision's unless noted:
- `part`: which linears ("full": both, the study's setting; or one of them), read from the family row's attention
  and MLP linears, so a Swin's blocks (the same timm names) take it too (ours: PETL_Vision has ViTs only). A Swin's
  relative-position table sits in its attention but is no linear: it stays frozen, as PETL_Vision's name filter
  would leave it.
- `blocks`: which blocks, counted from 1 as VPT's prompt_layers ("1-12", "1+3+5"); None, every block (the study's
  runs). PETL_Vision matches `str(i) + '.attn.qkv'` as a substring, so its index 1 also tunes block 11: ours tunes
  exactly the blocks named.
- Nothing is added: the function is the pretrained one until the first step.

Tuned at ViT-B/16 (D = 768, 12 blocks, MLP 3072) with 200 classes, the head 768 * 200 + 200 = 153,800 included:
attention 12 * (768 * 2304 + 2304 + 768 * 768 + 768) + head = 28,502,216; MLP 12 * (2 * 768 * 3072 + 3072 + 768) +
head = 56,822,984.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method
from methods.vpt import parse_layers

BLOCKS_HELP = "the blocks (from 1) whose layers train, e.g. 1-6, 7-12, 1+3+5; None = every block"


@dataclass
class AttentionOptions(Options):
    method = "attention_tune"
    part: str = option("full", "which attention linears train: full (qkv and proj; PETL_Vision's attention_type "
                       "full), qkv or proj", kind=str, choices=("full", "qkv", "proj"))
    blocks: str | int | list | None = option(None, BLOCKS_HELP, kind=None)

    def __post_init__(self):
        super().__post_init__()
        if self.blocks is not None:  # a syntax: parse_layers names what is wrong; the depth is checked in adapt()
            parse_layers(self.blocks)


@dataclass
class MLPOptions(AttentionOptions):
    method = "mlp_tune"
    part: str = option("full", "which MLP linears train: full (fc1 and fc2; PETL_Vision's mlp_type full), fc1 or "
                       "fc2", kind=str, choices=("full", "fc1", "fc2"))


class SelectiveTuning(TuningModule):
    """The chosen linears of the chosen blocks train (weight and bias); `linears` says which of the row's lists."""

    linears: ClassVar[str] = ""  # "attention" or "mlp": the family row's attention_layers or mlp_layers
    families = ("vit", "swin")

    def adapt(self) -> None:
        family, part = self.family, self.options.part
        layers = family.attention_layers if self.linears == "attention" else family.mlp_layers
        chosen = layers if part == "full" else [layer for layer in layers if layer.rsplit(".", 1)[-1] == part]
        blocks = family.blocks(self.backbone)
        for block in self.chosen_blocks(blocks):
            for layer in chosen:
                block.get_submodule(layer).requires_grad_(True)

    def chosen_blocks(self, blocks: list) -> list:
        if self.options.blocks is None:
            return blocks
        numbers = parse_layers(self.options.blocks)
        if numbers[-1] > len(blocks):
            raise ValueError(f"{self.method_name} blocks={self.options.blocks} names block {numbers[-1]}, but the "
                             f"backbone has {len(blocks)} blocks (counted from 1).")
        return [blocks[number - 1] for number in numbers]


@register_method("attention_tune")
class AttentionTuning(SelectiveTuning):
    label, color = "Attention tuning", "#a55194"
    options_cls = AttentionOptions
    linears = "attention"


@register_method("mlp_tune")
class MLPTuning(SelectiveTuning):
    label, color = "MLP tuning", "#ce6dbd"
    options_cls = MLPOptions
    linears = "mlp"
