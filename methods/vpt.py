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
- `prompt_layers` (VPT-deep on a ViT; the paper's prompt-depth ablation, Sec. 4.3): the blocks, counted from 1, that
  take a fresh prompt set; a block without one runs on the previous block's prompt outputs, and blocks before the
  first prompted one see no prompts. `1-k` is the official code's MODEL.PROMPT.NUM_DEEP_LAYERS=k, `k-12` its
  REVERSE_DEEP=True with NUM_DEEP_LAYERS=13-k (src/models/vit_prompt/vit_ablations.py and src/configs/config.py
  of github.com/KMnP/vpt); shallow is `1`, deep every block. Tuned: len(layers) * p * D prompt values + the head.

Cost (VPT-deep): a block's outputs at the p prompt positions are thrown away (the "_" in eq. 4; the last block's
are stripped), so computing their queries, attention rows, projection and MLP is wasted work: on ViT-B/16 with
p = 50 that is a fifth of every block's matmuls. `KeyValuePromptBlock` runs a timm Block with the prompts as
extra keys and values only, never inserted into the sequence: the same function (tests/benchmark/test_perf.py
compares it with plain blocks) at about (N + p/6) / (N + p) of the matmul cost.

Swin (timm `swin_*`): prompts enter every window of every block and pass the patch merges, as the official code
does it; that machinery, and what the official code does there, is in methods/swin_prompts.py.
On a ConvNet (timm ResNet / ConvNeXt, the "convnet" family) VPT-shallow is the official code's pixel-space prompt
(methods/pixel_prompts.py): `location="pad"` (default there) learns p-pixel bands around the image, `"below"` p
extra input channels; p defaults to 5 pixels (the official config's NUM_TOKENS). VPT-deep needs tokens: it
supports ViTs and Swins only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from backbones import data_config
from methods import pixel_prompts, swin_prompts
from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method

TOKEN_PROMPTS = 50  # p on a ViT when prompt_length is not given
LOCATIONS = ("prepend", *pixel_prompts.LOCATIONS)


def parse_layers(value) -> tuple[int, ...]:
    """`prompt_layers` as sorted block numbers counted from 1: "1-6" -> 1..6, "1+3+7-9" -> 1, 3, 7, 8, 9, 4 -> (4,),
    [1, 2] -> (1, 2). '+' joins parts (a comma would split METHOD_ARGS and OPTIONS lists)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split("+")
    layers: set[int] = set()
    for part in parts:
        text = str(part)
        low, dash, high = text.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"prompt_layers must be block numbers counted from 1, as a range 1-6, parts joined by "
                             f"'+' (1+3+7-9) or a list; got {value!r}.")
        first, last = int(low), int(high) if dash else int(low)
        if first < 1 or last < first:
            raise ValueError(f"prompt_layers ranges go from a block >= 1 up (e.g. 1-6), got {text!r} in {value!r}.")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))


@dataclass
class VPTOptions(Options):
    prompt_length: int | None = option(None, "p: prompt tokens per layer on a ViT (paper searches 1..200; None = 50), "
                                       "pixels (pad) or channels (below) on a ConvNet (None = 5, the VPT code's "
                                       "default)", kind=int, positive=True, hint="the paper uses 1-200")
    prompt_dropout: float | None = option(None, "dropout on prompt tokens; None = 0.1 for deep, 0.0 for shallow",
                                          kind=float, low=0, high=1, high_open=True)
    location: str | None = option(None, "where prompts go: prepend (tokens, ViT), pad or below (pixels, ConvNet); "
                                  "None = the family's", kind=str, choices=LOCATIONS)
    prompt_layers: str | int | list | None = option(None, "VPT-deep on a ViT: the blocks (from 1) that take fresh "
                                                    "prompts, e.g. 1-6, 7-12, 1+3+5; None = all (the paper's "
                                                    "prompt-depth ablation)", kind=None)

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_layers is not None:  # a syntax, not a type or range: parse_layers says what is wrong
            parse_layers(self.prompt_layers)  # the depth is checked with the backbone (prompted_blocks)


class KeyValuePromptBlock(Block):
    """A timm Block that, given `prompts` (B, p, D), uses them only as extra attention keys/values for the
    sequence x and returns x's rows; without them, exactly the timm Block.

    The prompts never enter x: no copy of the sequence with the prompt rows inserted and then removed again, and
    where x needs no gradient (block 0: nothing below it trains) its queries, keys and values need no backward.
    Attention is the same function of its keys in any order, so the prompt keys go first.
    """

    @staticmethod
    def supports(block: nn.Module) -> bool:
        """Plain timm Block and Attention (fused SDPA on, no gate) over an nn.Linear qkv: what `forward` mirrors."""
        attn = getattr(block, "attn", None)
        return (type(block) is Block and type(attn) is Attention and attn.fused_attn
                and getattr(attn, "gate", None) is None and type(attn.qkv) is nn.Linear)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                prompts: torch.Tensor | None = None) -> torch.Tensor:
        if prompts is None or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.attend(self.norm1(x), self.norm1(prompts))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def attend(self, h: torch.Tensor, h_prompts: torch.Tensor) -> torch.Tensor:
        """timm's Attention forward with queries for h's rows only, keys and values for the prompts' rows and h's."""
        attn = self.attn
        batch, tokens, _ = h.shape
        dim, heads, head_dim = attn.attn_dim, attn.num_heads, attn.head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias  # rows: q, then k, then v
        q = F.linear(h, weight[:dim], None if bias is None else bias[:dim])
        q = q.reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        kv_bias = None if bias is None else bias[dim:]
        # prompts shared by the batch (1, p, D): projected once, then broadcast to every image
        kv_prompts = F.linear(h_prompts, weight[dim:], kv_bias).expand(batch, -1, -1)
        kv = torch.cat([kv_prompts, F.linear(h, weight[dim:], kv_bias)], dim=1)
        k, v = kv.reshape(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, p+N, d)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, dim))
        return attn.proj_drop(attn.proj(out))


class VisualPromptTuning(TuningModule):
    options_cls = VPTOptions
    deep: ClassVar[bool] = False
    identity_at_init = False  # the prompts change every token the head reads from the first step
    families = ("vit", "swin")

    def adapt(self) -> None:
        backbone = self.backbone
        self.pixel_prompt = None
        # one prompt mechanism per family (tokens in a ViT's sequence, tokens in every Swin window, pixels around a
        # ConvNet's image): the forwards differ, so these stay branches
        family = self.family.name
        self.swin = family == "swin"
        if family == "convnet":  # only VPT-shallow declares ConvNets
            self.adapt_pixels()
            return
        if self.options.location not in (None, "prepend"):
            raise ValueError(f"VPT location {self.options.location!r} is for ConvNets; on a ViT prompts are "
                             "prepended tokens, as on a Swin (location=prepend).")
        if self.options.prompt_layers is not None and (self.swin or not self.deep):
            raise ValueError("prompt_layers is VPT-deep's depth study on a ViT (which blocks take fresh prompts); "
                             f"{self.method_name} on a {family} prompts {'every stage' if self.swin else 'block 1'}: "
                             "use METHOD=vpt_deep on a ViT backbone, or drop prompt_layers.")
        self.prompt_length = self.options.prompt_length or TOKEN_PROMPTS
        dropout = self.options.prompt_dropout
        self.prompt_dropout = nn.Dropout(dropout if dropout is not None else (0.1 if self.deep else 0.0))
        if self.swin:  # one (blocks, p, C) tensor per stage, widths doubling with the stages
            self.vpt_prompts = swin_prompts.make_prompts(backbone, self.prompt_length, self.deep)
            return
        layers = self.prompted_blocks(len(backbone.blocks))
        self.prompt_rows = {block: row for row, block in enumerate(layers)}  # block index -> row of vpt_prompts
        patch_h, patch_w = backbone.patch_embed.patch_size
        in_chans = backbone.patch_embed.proj.in_channels
        bound = math.sqrt(6.0 / float(in_chans * patch_h * patch_w + backbone.embed_dim))
        self.vpt_prompts = nn.Parameter(torch.empty(len(layers), self.prompt_length, backbone.embed_dim))  # (L', p, D)
        nn.init.uniform_(self.vpt_prompts, -bound, bound)
        last = len(backbone.blocks) - 1
        for index, block in enumerate(backbone.blocks):
            # a block's prompt outputs are discarded where the next block takes fresh prompts (or none follows):
            # there the prompts are computed as keys/values only
            discarded = index in self.prompt_rows and (index + 1 in self.prompt_rows or index == last)
            if discarded and KeyValuePromptBlock.supports(block):
                block.__class__ = KeyValuePromptBlock  # same parameters and state dict, one more forward mode

    def prompted_blocks(self, depth: int) -> list[int]:
        """Indices (from 0) of the blocks that take a fresh prompt set: `prompt_layers`, else all (deep) or 0."""
        if self.options.prompt_layers is None:
            return list(range(depth)) if self.deep else [0]
        layers = parse_layers(self.options.prompt_layers)
        if layers[-1] > depth:
            raise ValueError(f"prompt_layers={self.options.prompt_layers} names block {layers[-1]}, but the backbone "
                             f"has {depth} blocks (counted from 1).")
        return [layer - 1 for layer in layers]

    def adapt_pixels(self) -> None:
        """The official pixel-space prompt (methods/pixel_prompts.py) in front of the frozen ConvNet."""
        location = self.options.location or "pad"
        if location == "prepend":
            raise ValueError("VPT on a ConvNet has no tokens to prepend prompts to; use location=pad or below.")
        if self.options.prompt_layers is not None:
            raise ValueError("prompt_layers chooses the ViT blocks that take prompt tokens; a ConvNet's pixel prompt "
                             "has no blocks to choose: drop prompt_layers.")
        if self.options.prompt_dropout:  # the official pixel prompts have no dropout
            raise ValueError(f"prompt_dropout is for token prompts; a ConvNet's pixel prompt has none, got "
                             f"{self.options.prompt_dropout}.")
        self.prompt_length = self.options.prompt_length or pixel_prompts.DEFAULT_PIXELS
        self.pixel_prompt = pixel_prompts.pixel_prompt(self.backbone, location, self.prompt_length,
                                                       data_config(self.backbone))

    def prompts_for(self, row: int, batch: int) -> torch.Tensor:
        """Row `row` of vpt_prompts (the row-th prompted block's set) as the block takes it."""
        return self.dropped_prompts(self.vpt_prompts[row], batch)

    def dropped_prompts(self, prompts: torch.Tensor, batch: int) -> torch.Tensor:
        """One layer's prompts (p, D) as (B, p, D) with the VPT code's per-image dropout masks (it expands, then
        drops out); (1, p, D) where dropout is off (rate 0, or eval): every image then sees the same prompts, so a
        KeyValuePromptBlock projects them to keys/values once per batch instead of once per image — the same values,
        less work."""
        prompts = prompts.unsqueeze(0)  # (1, p, D)
        if self.prompt_dropout.p == 0.0 or not self.prompt_dropout.training:
            return prompts
        return self.prompt_dropout(prompts.expand(batch, -1, -1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.swin:
            return swin_prompts.forward_features(self, x)  # (B, 1, p + H*W, C): prompts and tokens, normed
        backbone = self.backbone
        if self.pixel_prompt is not None:
            return backbone.forward_features(self.pixel_prompt(x))  # (B, C, H, W)
        prefix = backbone.num_prefix_tokens  # CLS (+ registers)
        x = backbone.patch_embed(x)
        x = backbone._pos_embed(x)  # timm's own CLS/register concat + position embedding: (B, prefix+N, D)
        x = backbone.norm_pre(backbone.patch_drop(x))
        batch, p = x.shape[0], self.prompt_length
        checkpointing = backbone.grad_checkpointing and torch.is_grad_enabled()
        has_prompts = False  # whether x holds prompt rows, after the prefix tokens
        for layer, block in enumerate(backbone.blocks):
            kwargs = {}
            if layer in self.prompt_rows:  # a fresh set replaces the previous block's prompt outputs, if any
                prompts = self.prompts_for(self.prompt_rows[layer], batch)  # (B or 1, p, D)
                rest = x[:, prefix + p:] if has_prompts else x[:, prefix:]
                if isinstance(block, KeyValuePromptBlock):  # their outputs would be discarded: keys/values only
                    x = torch.cat([x[:, :prefix], rest], dim=1) if has_prompts else x
                    kwargs, has_prompts = {"prompts": prompts}, False
                else:
                    prompts = prompts.expand(batch, -1, -1)
                    x, has_prompts = torch.cat([x[:, :prefix], prompts, rest], dim=1), True  # (B, prefix+p+N, D)
            x = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointing else block(x, **kwargs)
        x = backbone.norm(x)
        if has_prompts:  # strip them, so the head sees a plain ViT's tokens
            x = torch.cat([x[:, :prefix], x[:, prefix + p:]], dim=1)
        return x  # (B, prefix+N, D)


@register_method("vpt_shallow")
class VPTShallow(VisualPromptTuning):
    deep = False
    families = ("vit", "swin", "convnet")  # on a ConvNet: the official pad (or below) pixel prompt
    label, color, paper_row, in_fig3 = "VPT-shallow", "#17becf", 7, True


@register_method("vpt_deep")
class VPTDeep(VisualPromptTuning):
    deep = True
    # purple: the report's red and green shade where VPT-deep is behind / ahead
    label, color, paper_row, in_fig3 = "VPT-deep", "#7b2cbf", 8, True
