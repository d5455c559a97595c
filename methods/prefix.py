"""Prefix tuning on a ViT (Li & Liang, ACL 2021, https://arxiv.org/abs/2101.00190): p learned key vectors and p
learned value vectors per block, prepended to that block's attention keys and values; the sequence itself is
unchanged and no query is added:

    attn(h) = softmax(q [P_k; k]^T / sqrt(d)) [P_v; v],   q, k, v = qkv(h) per head,   P_k, P_v in R^{p x D}

Whose choices:
- the prefixes live in key/value space after the qkv projection, at every block: the paper's (its P_theta holds the
  activations of every layer; for a transformer, the keys and values its attention reads), and peft's
  (PrefixTuningConfig: `past_key_values` of shape (layers, 2, p, D)).
- parameterisation: peft's `PrefixEncoder`. Without projection (peft's default, `projection_dim=0`): per block a
  (p, D) key and a (p, D) value tensor, trained directly, initialised N(0, 1) (peft's nn.Embedding init). With
  `projection_dim=h` (peft's prefix_projection, the paper's reparameterisation P = MLP(P'), Sec. 4.3):
  P' (p, D) -> Linear(D, h) -> tanh -> Linear(h, layers * 2 * D), all trained.
- p = 10 (ours; the paper uses 10 for table-to-text and 200 for summarisation).
- the prefix keys skip the block's k_norm (they are keys already; ViT-B has none).
- the official code is for GPT-2/BART; PETL_Vision (github.com/OSU-MLB/PETL_Vision) has no prefix tuning in its
  released code, so this follows the paper and peft.

On ViT-B/16 (D = 768, 12 blocks) with 200 classes and p = 10: 12 * 2 * 10 * 768 + (768*200 + 200) = 338,120
tuned parameters. With projection_dim h: 10*768 + (768 h + h) + (h * 12*2*768 + 12*2*768) + head.

On a Swin (ours: no reference has one): every block of every stage gets p keys and p values of its stage's width C,
(2, p, C) split into the block's heads, before every window's keys and values, shared by the windows; their
columns get zero relative-position bias and zero shift mask (as E²VPT's key-value prompts in its Swin code,
methods/swin_prompts.py). Trained directly, N(0, 1): peft's default parameterisation. projection_dim is refused:
its MLP maps one width to every layer's keys and values, and a Swin's widths differ per stage. Count
sum(d * 2 p C) + head; Swin-B with 200 classes: 20 * 12,032 + 1024 * 200 + 200 = 445,640. Blocks keep their
state-dict keys, plus `layers.i.blocks.j.prefix_kv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods import swin_prompts
from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class PrefixOptions(Options):
    method = "prefix"
    prefix_length: int = option(10, "p: prefix keys and values per block (ours; the paper uses 10 and 200)", kind=int,
                                positive=True)
    projection_dim: int = option(0, "0: the prefixes are trained directly (peft's default); h > 0: they are "
                                 "an MLP's output, D -> h -> layers*2*D (the paper's reparameterisation)", kind=int,
                                 low=0)


class PrefixEncoder(nn.Module):
    """peft's PrefixEncoder for a ViT: the (layers, 2, p, D) keys and values, trained directly or through an MLP."""

    def __init__(self, layers: int, length: int, dim: int, projection_dim: int):
        super().__init__()
        self.shape = (layers, 2, length, dim)
        if projection_dim:
            self.embedding = nn.Parameter(torch.randn(length, dim))  # nn.Embedding's N(0, 1), as peft's
            self.projection = nn.Sequential(nn.Linear(dim, projection_dim), nn.Tanh(),
                                            nn.Linear(projection_dim, layers * 2 * dim))
        else:
            self.embedding = nn.Parameter(torch.randn(layers, 2, length, dim))
            self.projection = None

    def forward(self) -> torch.Tensor:
        if self.projection is None:
            return self.embedding
        layers, _, length, dim = self.shape
        return self.projection(self.embedding).reshape(length, layers, 2, dim).permute(1, 2, 0, 3)  # (L, 2, p, D)


class PrefixBlock(Block):
    """A timm Block whose attention also reads `prefix` (2, p, D): p extra keys and values, shared by the batch."""

    @staticmethod
    def supports(block: nn.Module) -> bool:
        """Plain timm Block and Attention (no gate) over an nn.Linear qkv: what `attend` mirrors."""
        attn = getattr(block, "attn", None)
        return (type(block) is Block and type(attn) is Attention and getattr(attn, "gate", None) is None
                and type(attn.qkv) is nn.Linear)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attend(self.norm1(x), prefix)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def attend(self, h: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """timm's Attention forward with the prefix keys and values before the sequence's own."""
        attn = self.attn
        batch, tokens, _ = h.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(h).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        q, k = attn.q_norm(q), attn.k_norm(k)
        pk, pv = prefix.reshape(2, -1, heads, head_dim).transpose(1, 2).unsqueeze(1).unbind(0)  # (1, H, p, d)
        k = torch.cat([pk.expand(batch, -1, -1, -1).to(k.dtype), k], dim=2)  # (B, H, p+N, d)
        v = torch.cat([pv.expand(batch, -1, -1, -1).to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
        return attn.proj_drop(attn.proj(out))


class PrefixSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock whose window attention also reads `prefix_kv` (2, p, C): p keys and p values
    before every window's own, split into the heads like them, with zero bias and mask columns."""

    prefix_kv: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, _, dim = x.shape
        heads = self.attn.num_heads
        keys, values = self.prefix_kv.reshape(2, -1, heads, dim // heads).transpose(1, 2).unbind(0)  # (H, p, d)
        no_prompts = x.new_zeros(batch, 0, dim)
        return swin_prompts.prompted_block(self, x, no_prompts, (keys, values))[0]


@register_method("prefix")
class PrefixTuning(TuningModule):
    label, color = "Prefix", "#bd9e39"
    options_cls = PrefixOptions
    identity_at_init = False  # the prefixes take a share of every softmax from the first step
    families = ("vit", "swin")

    def adapt(self) -> None:
        self.swin = self.family.plain_block is SwinTransformerBlock
        if self.swin:  # each block holds its own prefixes (widths differ per stage); timm's forward runs them
            self.adapt_swin()
            return
        blocks = self.family.plain_blocks(self.backbone, "prefix")
        for i, block in enumerate(blocks):
            if not PrefixBlock.supports(block):
                raise ValueError(f"prefix needs timm's plain Attention with an nn.Linear qkv; blocks[{i}].attn is "
                                 f"{type(block.attn).__name__}.")
            block.__class__ = PrefixBlock  # same parameters and state-dict keys, one more input
        encoder = PrefixEncoder(len(blocks), self.options.prefix_length, self.backbone.embed_dim,
                                self.options.projection_dim)
        self.prefix_encoder = encoder.to(next(self.backbone.parameters()).device)

    def adapt_swin(self) -> None:
        """A (2, p, C) prefix per Swin block, N(0, 1), trained directly."""
        if self.options.projection_dim:
            raise ValueError("prefix projection_dim maps one width to every layer's keys and values; a Swin's widths "
                             "differ per stage: use projection_dim=0 on it.")
        for block in self.family.plain_blocks(self.backbone, "prefix"):
            if type(block.attn) is not WindowAttention or type(block.attn.qkv) is not nn.Linear:
                raise ValueError("prefix needs timm's WindowAttention over one fused qkv Linear in every Swin block; "
                                 f"this one has {type(block.attn).__name__}.")
            device = block.attn.qkv.weight.device
            width = self.family.width_of(block)
            block.prefix_kv = nn.Parameter(torch.randn(2, self.options.prefix_length, width, device=device))
            block.__class__ = PrefixSwinBlock  # same parameters and state-dict keys, plus `prefix_kv`

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's VisionTransformer.forward_features with each block's prefix passed in; a Swin's own forward."""
        if self.swin:
            return self.backbone.forward_features(x)  # (B, H, W, C)
        backbone = self.backbone
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))  # (B, prefix+N, D)
        prefixes = self.prefix_encoder()  # (L, 2, p, D)
        checkpointing = backbone.grad_checkpointing and torch.is_grad_enabled()
        for block, prefix in zip(backbone.blocks, prefixes, strict=True):
            x = checkpoint(block, x, prefix, use_reentrant=False) if checkpointing else block(x, prefix)
        return backbone.norm(x)  # (B, prefix+N, D)
