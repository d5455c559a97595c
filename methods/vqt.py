"""Visual Query Tuning (Tu et al., CVPR 2023, https://arxiv.org/abs/2212.03220), following the official code
(github.com/andytu28/VQT: src/models/vit_backbones/h2t_vit.py, build_h2t_model.py, src/configs/config.py,
scripts/VQT/run_vqt_vtab.sh).

Every block l gets q learnable query tokens Q_l (L, q, D). They join the block's input for attention only:
    queries of Q_l's rows and of the original tokens x_l;  keys and values of x_l only (the code's
    `kv_hidden_states = hidden_states[:, query_prompt_len:]`),
so the queries read the block's tokens, the tokens never attend to the queries (nor do the queries to each other),
and the queries' rows then pass through the block's residual and MLP like any token:
    z_l = Q_l + attn(norm1(Q_l) -> norm1(x_l));   o_l = z_l + mlp(norm2(z_l))        (the block's layer scales too)
Their outputs o_l are dropped from the sequence after the block; the next block gets its own fresh Q_{l+1}. Because
nothing in x ever sees a query, the backbone's features are exactly the plain backbone's (tested bit for bit).

The head (the code's `combine_method='concat'` with NORMALIZE_FEATS = True, its defaults) reads
    concat(normalize(f), normalize(flatten(o_1)), ..., normalize(flatten(o_L)))        (B, D · (1 + L · q))
with f the backbone's pooled feature (the final CLS after the final norm, as the code; the backbone's own pooling
where it has another) and normalize the L2 norm of each part; one Linear(D · (1 + L · q), classes).
Choices, each the official code's unless noted:
- q = 1 query per layer: README ("This can be simply set to 1") and run_demo_exp.sh, the published runs; the
  config's default MODEL.H2T.NUM_QUERY_TOKENS is 5 (`num_queries=5` gives it).
- init uniform(-v, v), v = sqrt(6 / (in_chans · patch_h · patch_w + D)) (the code hard-codes in_chans = 3, as VPT).
- dropout 0.1 on the queries, one mask per image (run_vqt_vtab.sh MODEL.H2T.DROPOUT 0.1; the config default is 0).
- the backbone runs without autograd (ours: nothing in it needs a gradient; the queries' rows are computed after it
  from each block's saved input, which gives the same values and gradients as the code's joint sequence).
- register tokens: they are original tokens, so the queries attend to them and f is pooled as the backbone pools;
  nothing else changes. Blocks other than timm's plain Block / Attention are refused.
ViT only: each query attends to all of its block's tokens, the global sequence a Swin block never has (its attention
runs within windows; the official code queries ViTs only, its Swin file is VPT's).
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

from methods.base import TuningModule
from methods.linear import no_autograd
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class VQTOptions(Options):
    method = "vqt"
    num_queries: int = option(1, "query tokens per layer, q (official README / demo runs: 1; its config default: 5)",
                              kind=int, low=1, high=1000, hint="official: 1")
    query_dropout: float = option(0.1, "dropout on the query tokens, in [0, 1) (official run script: 0.1)", kind=float,
                                  low=0, high=1, high_open=True)
    normalize: bool = option(True, "L2-normalise the pooled feature and each layer's query outputs before the head "
                             "(official: true)", kind=bool)


def supported(block: nn.Module) -> bool:
    """timm's plain Block over its Attention with an nn.Linear qkv and no gate: what `query_rows` mirrors."""
    attn = getattr(block, "attn", None)
    return (type(block) is Block and type(attn) is Attention and type(attn.qkv) is nn.Linear
            and getattr(attn, "gate", None) is None)


def query_rows(block: Block, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The block's outputs at the query rows (B, q, D): queries attend to `tokens` (B, N, D) only."""
    attn = block.attn
    batch, n_queries, _ = queries.shape
    dim, heads, head_dim = attn.attn_dim, attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias  # rows: q, then k, then v
    h_q, h_x = block.norm1(queries), block.norm1(tokens)
    q = F.linear(h_q, weight[:dim], None if bias is None else bias[:dim])
    q = attn.q_norm(q.reshape(batch, n_queries, heads, head_dim).transpose(1, 2))  # (B, H, q, d)
    kv = F.linear(h_x, weight[dim:], None if bias is None else bias[dim:])
    k, v = kv.reshape(batch, tokens.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
    out = F.scaled_dot_product_attention(q, attn.k_norm(k), v)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, n_queries, dim)))
    z = queries + block.ls1(out)
    return z + block.ls2(block.mlp(block.norm2(z)))


@register_method("vqt")
class VisualQueryTuning(TuningModule):
    label, color = "VQT", "#393b79"
    options_cls = VQTOptions
    # The queries never enter the token sequence, so the backbone's features stay the plain backbone's at every
    # step (tests/methods/test_vqt.py); but the wider head reads the query outputs beside them, so the logits are
    # not a plain head's on the pretrained features: not identity at init in the contract's sense.
    identity_at_init = False
    trains_on_frozen_features: ClassVar[bool] = False  # the queries read every block: no feature cache

    def adapt(self) -> None:
        backbone = self.backbone
        unsupported = [i for i, block in enumerate(backbone.blocks) if not supported(block)]
        if unsupported:
            raise ValueError(f"vqt runs timm's plain Block/Attention (nn.Linear qkv, no gate); blocks {unsupported} "
                             f"of this backbone are {type(backbone.blocks[unsupported[0]]).__name__}.")
        depth, dim, q = len(backbone.blocks), backbone.embed_dim, self.options.num_queries
        patch_h, patch_w = backbone.patch_embed.patch_size
        in_chans = backbone.patch_embed.proj.in_channels
        bound = math.sqrt(6.0 / float(in_chans * patch_h * patch_w + dim))
        self.vqt_queries = nn.Parameter(torch.empty(depth, q, dim))  # (L, q, D)
        nn.init.uniform_(self.vqt_queries, -bound, bound)
        self.query_dropout = nn.Dropout(self.options.query_dropout)
        backbone.head = nn.Linear(backbone.num_features + depth * q * dim, self.num_classes)

    def block_inputs_and_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each block's input (B, N, D) and the backbone's output tokens, the plain forward without autograd."""
        backbone = self.backbone
        with no_autograd():
            x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))
            inputs = []
            for block in backbone.blocks:
                inputs.append(x)
                x = block(x)
            features = backbone.norm(x)
        return [t.clone() for t in inputs], features.clone()  # clones leave inference mode for the query path

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_inputs_and_features(x)[1]  # (B, N, D): the plain backbone's, queries never enter

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """concat(f, o_1, ..., o_L), each L2-normalised: what the head reads, (B, D · (1 + L · q))."""
        inputs, features = self.block_inputs_and_features(x)
        parts = [self.backbone.forward_head(features, pre_logits=True)]
        batch = x.shape[0]
        for layer, (block, tokens) in enumerate(zip(self.backbone.blocks, inputs, strict=True)):
            queries = self.query_dropout(self.vqt_queries[layer].expand(batch, -1, -1))  # per-image masks
            parts.append(query_rows(block, queries, tokens).flatten(1))
        if self.options.normalize:
            parts = [F.normalize(part, dim=1) for part in parts]
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.head(self.head_features(x))  # (B, C)
