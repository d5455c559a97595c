"""E²VPT: Effective and Efficient Visual Prompt Tuning (Han et al., ICCV 2023, https://arxiv.org/abs/2307.13770).

Visual prompts as VPT-deep, plus key-value prompts: learnable rows prepended to every block's attention keys and
values. Follows the official code's default method "P_VK" (github:ChengHan111/E2VPT, src/models/vit_prompt/
vit_prompt_VK.py, src/models/vit_backbones/vit_changeVK.py, defaults in src/configs/config.py):

    [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])      with every attention of L_i reading
    softmax(Q [K_p; K]^T / sqrt(d)) [V_p; V]              K_p = V_p = the block's (H, T, d) key-value prompt

Choices, each the official code's unless noted:
- visual prompts: p tokens per block (NUM_TOKENS_P = 5), a fresh set at the input and before every block
  (DEEP_P), after the CLS token, replacing the previous block's prompt outputs; uniform(-v, v),
  v = sqrt(6 / (3 * patch_h * patch_w + D)) (VPT's bound); no dropout (DROPOUT_P = 0); stripped after the final
  norm, so the head reads a plain ViT's tokens.
- key-value prompts: T rows per head per block (NUM_TOKENS = 5), in head space after the key/value projections;
  one tensor serves as both keys and values (SHARE_PARAM_KV = True), placed before the sequence's keys
  (LAYER_BEHIND = True; attention is the same function of its keys in any order), Kaiming-uniform over fan-in
  T * d (ORIGIN_INIT = 2: bound sqrt(6 / (T * d))); no dropout (DROPOUT = 0).
- Pruning is not offered: the paper's token and segment pruning is a second stage (importance scores from the
  gradients of per-token and per-piece masks, a search over pruning percentages against validation accuracy, then
  rewinding and retraining the pruned prompts; src/engine/trainer.py) that costs a full retraining per percentage.
  The masks exist only for that stage, so ours has none; the official first stage keeps them at 1 but, holding
  'prompt' in their names, trains them too: p + 16 p values (85 at p = 5) our count leaves out.

Tuned at ViT-B/16 (12 blocks, D = 768, 12 heads of d = 64) with p = T = 5 and 200 classes: 12 * 5 * 768 visual
+ 12 * 12 * 5 * 64 key-value + 768 * 200 + 200 head = 245,960.

On a Swin, the official Swin variant (src/models/vit_prompt/swin_transformer_prompt_VK.py:
PromptedSwinTransformer_Prompt_VK, PromptedSwinTransformerBlock, PromptedWindowAttention; BasicLayer's deep loop in
src/models/vit_backbones/swin_transformer.py; configs/base-prompt_changed_P_VK_swin.yaml), on VPT-deep's Swin
machinery (methods/swin_prompts.py):
- visual prompts: VPT-deep's on a Swin (the code's prompt_embeddings and deep_prompt_embeddings_0..3): p rows of the
  stage's width C prepended to every window of every block, zero relative-position bias and shift-mask rows and
  columns for them, their outputs averaged over the windows, a fresh set per block (stage 0's first is the input
  set); init uniform(-v, v) with VPT's bound over the stage-0 width for every stage; no dropout (DROPOUT_P = 0).
- key-value prompts: per block one (H, T, C / H) tensor before every window's keys and values, shared by the
  windows and the batch, with zero bias and mask columns (the code pads both by p + T zeros in front), as keys and
  values (SHARE_PARAM_KV; the code raises on unshared ones for Swin), Kaiming-uniform over fan-in T * d.
- the head: the final norm over prompts and tokens, then timm's average pool over all p + H*W rows: the code's
  `norm` and `avgpool` (prompts not stripped, unlike the ViT path).
Ours, not the code's: the stage prompts are one tensor per stage for any number of stages (the code hard-codes four,
"only for 4 layers"); the window prompt outputs are averaged over each image's own windows (the code's window-major
average mixes images when a block has more than one window and batch > 1: the last block's, which reach the head,
have one window on Swin-B at 224 px, where the two agree; methods/swin_prompts.py); the bound's 3 is the backbone's
input channels (the same on RGB); timm pads maps the window does not divide and the padded windows get the prompts.

On a Swin with stage widths C and depths d: (p + T) * sum(d * C) + head; Swin-B (sum d * C = 12,032) with 200
classes: 10 * 12,032 + 1024 * 200 + 200 = 325,320. Blocks keep their state-dict keys, plus `layers.i.blocks.j.e2vpt_kv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block
from torch import nn

from methods import swin_prompts
from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class E2VPTOptions(Options):
    method = "e2vpt"
    prompt_length: int = option(5, "p: visual prompt tokens per block (the code's NUM_TOKENS_P: 5)", kind=int,
                                positive=True, hint="official default 5")
    kv_length: int = option(5, "T: key-value prompt rows per head per block (the code's NUM_TOKENS: 5)", kind=int,
                            positive=True, hint="official default 5")


class KeyValuePrompted(Block):
    """A timm Block whose attention also attends to `e2vpt_kv` (H, T, d), used as both keys and values."""

    e2vpt_kv: nn.Parameter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attend(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """timm's Attention forward with the prompt rows before the sequence's keys and values."""
        attn = self.attn
        batch, tokens, _ = h.shape
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, d)
        q, k = attn.q_norm(q), attn.k_norm(k)
        prompt = self.e2vpt_kv.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, T, d)
        k, v = torch.cat([prompt, k], dim=2), torch.cat([prompt, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
        return attn.proj_drop(attn.proj(out))


def key_value_prompt(heads: int, length: int, head_dim: int, device) -> nn.Parameter:
    """A block's (H, T, d) key-value prompt, Kaiming-uniform over fan-in T * d (ORIGIN_INIT = 2)."""
    kv = torch.empty(heads, length, head_dim, device=device)
    nn.init.kaiming_uniform_(kv, a=0, mode="fan_in", nonlinearity="leaky_relu")
    return nn.Parameter(kv)


class KeyValuePromptedSwin(SwinTransformerBlock):
    """timm's SwinTransformerBlock on its map (B, H, W, C) and the visual prompts (B, p, C), returning both, with
    `e2vpt_kv` (H, T, d) before every window's keys and values (the code's PromptedSwinTransformerBlock and
    PromptedWindowAttention)."""

    e2vpt_kv: nn.Parameter

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return swin_prompts.prompted_block(self, x, prompts, (self.e2vpt_kv, self.e2vpt_kv))


def run_block(block: KeyValuePromptedSwin, x: torch.Tensor, prompts: torch.Tensor):
    return block(x, prompts)


def shared_prompts(prompts: torch.Tensor, batch: int) -> torch.Tensor:
    """A block's (p, C) set as every image reads it, (1, p, C): no prompt dropout (DROPOUT_P = 0)."""
    return prompts.unsqueeze(0)


@register_method("e2vpt")
class E2VPT(TuningModule):
    label, color = "E²VPT", "#6b6ecf"
    options_cls = E2VPTOptions
    identity_at_init = False  # both prompt kinds change every token from the first step

    families = ("vit", "swin")  # a Swin's blocks become KeyValuePromptedSwin, a ViT's KeyValuePrompted

    def adapt(self) -> None:
        # one prompt mechanism per family (tokens after CLS in one sequence, tokens in every Swin window through the
        # stages and merges): the forwards differ, so these stay branches, as in methods/vpt.py
        self.swin = self.family.plain_block is SwinTransformerBlock
        if self.swin:
            self.adapt_swin()
            return
        backbone, p, t = self.backbone, self.options.prompt_length, self.options.kv_length
        blocks = self.family.plain_blocks(backbone, "e2vpt")  # what KeyValuePrompted.forward mirrors
        patch_h, patch_w = backbone.patch_embed.patch_size
        width = backbone.embed_dim
        device = backbone.patch_embed.proj.weight.device
        bound = math.sqrt(6.0 / float(3 * patch_h * patch_w + width))  # the code hard-codes 3 input channels
        self.e2vpt_prompts = nn.Parameter(torch.empty(len(blocks), p, width, device=device))  # (L, p, D)
        nn.init.uniform_(self.e2vpt_prompts, -bound, bound)
        for block in blocks:
            if type(block.attn) is not Attention or type(block.attn.qkv) is not nn.Linear:
                raise ValueError("e2vpt needs timm's Attention over one fused qkv Linear in every block; "
                                 f"this one has {type(block.attn).__name__}.")
            block.e2vpt_kv = key_value_prompt(block.attn.num_heads, t, block.attn.head_dim, device)
            block.__class__ = KeyValuePrompted  # same state-dict keys, plus `e2vpt_kv`

    def adapt_swin(self) -> None:
        """VPT-deep's Swin prompts, one (d, p, C) tensor per stage, and a (H, T, C / H) key-value prompt per block."""
        backbone, t = self.backbone, self.options.kv_length
        blocks = self.family.plain_blocks(backbone, "e2vpt")  # what swin_prompts.prompted_block mirrors
        device = backbone.patch_embed.proj.weight.device
        self.e2vpt_prompts = swin_prompts.make_prompts(backbone, self.options.prompt_length, deep=True).to(device)
        for block in blocks:
            attn = block.attn
            if type(attn) is not WindowAttention or type(attn.qkv) is not nn.Linear:
                raise ValueError("e2vpt needs timm's WindowAttention over one fused qkv Linear in every Swin block; "
                                 f"this one has {type(attn).__name__}.")
            block.e2vpt_kv = key_value_prompt(attn.num_heads, t, attn.qkv.out_features // (3 * attn.num_heads), device)
            block.__class__ = KeyValuePromptedSwin  # same state-dict keys, plus `e2vpt_kv`

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.swin:  # (B, 1, p + H*W, C): prompts and tokens after the final norm, for timm's average pool
            return swin_prompts.prompted_features(self.backbone, x, self.e2vpt_prompts, True, shared_prompts,
                                                  run_block)
        backbone, p = self.backbone, self.options.prompt_length
        prefix = backbone.num_prefix_tokens  # CLS (+ registers): the code inserts after the CLS token
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))  # (B, prefix+N, D)
        for i, block in enumerate(backbone.blocks):
            prompts = self.e2vpt_prompts[i].expand(x.shape[0], -1, -1)  # (B, p, D)
            rest = x[:, prefix + p:] if i else x[:, prefix:]  # block i > 0: drop the previous block's prompt rows
            x = block(torch.cat([x[:, :prefix], prompts, rest], dim=1))  # (B, prefix+p+N, D)
        x = backbone.norm(x)
        return torch.cat([x[:, :prefix], x[:, prefix + p:]], dim=1)  # (B, prefix+N, D)
