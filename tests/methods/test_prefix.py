"""Prefix tuning against attention written out here: per block and head softmax(q [P_k; k]^T / sqrt(d)) [P_v; v],
the prefixes per block (p, D) split into heads like the keys; N(0, 1) init; peft's PrefixEncoder counts."""

from __future__ import annotations

import pytest
import torch

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def test_vit_b_count_follows_the_formula():
    assert vit_b_tuned("prefix") == DEPTH * 2 * 10 * D + HEAD == 338_120
    h = 512  # peft's projection: embedding (p, D), Linear(D, h), Linear(h, layers * 2 * D)
    assert vit_b_tuned("prefix", projection_dim=h) == 10 * D + (D * h + h) + (h * DEPTH * 2 * D + DEPTH * 2 * D) + HEAD


def attention(block, h: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    attn, (b, n, dim) = block.attn, h.shape
    heads = attn.num_heads
    d = dim // heads
    q, k, v = attn.qkv(h).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
    k = torch.cat([pk.reshape(-1, heads, d).transpose(0, 1).expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.reshape(-1, heads, d).transpose(0, 1).expand(b, -1, -1, -1), v], dim=2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, dim))


@pytest.mark.parametrize("options", [{"prefix_length": 3}, {"prefix_length": 2, "projection_dim": 5}])
def test_prefixes_are_extra_keys_and_values_of_every_block(options, tiny_batch):
    torch.manual_seed(0)
    model = create_method("prefix", make_tiny_vit(), num_classes=3, **options).eval()
    backbone, prefixes = model.backbone, model.prefix_encoder()
    assert prefixes.shape == (2, 2, options["prefix_length"], 32)
    with torch.no_grad():
        x = embed(backbone, tiny_batch[0])
        for block, (pk, pv) in zip(backbone.blocks, prefixes, strict=True):
            x = x + attention(block, block.norm1(x), pk, pv)
            x = x + block.mlp(block.norm2(x))
        expected = backbone.head(backbone.norm(x)[:, 0])
        torch.testing.assert_close(model(tiny_batch[0]), expected, rtol=0, atol=1e-5)


def test_projection_maps_the_embedding_through_one_mlp_per_key_and_value():
    torch.manual_seed(0)
    encoder = create_method("prefix", make_tiny_vit(), num_classes=3, prefix_length=2,
                            projection_dim=5).prefix_encoder
    with torch.no_grad():
        flat = encoder.projection(encoder.embedding)  # (p, layers * 2 * D): peft's (layer, key/value, D) order
        assert torch.equal(encoder()[1, 0, 1], flat[1, 2 * 32:3 * 32]) and torch.equal(encoder()[0, 1], flat[:, 32:64])


def test_prefixes_start_standard_normal():
    torch.manual_seed(0)
    values = create_method("prefix", make_tiny_vit(), num_classes=3, prefix_length=10).prefix_encoder.embedding
    assert values.shape == (2, 2, 10, 32) and abs(values.mean()) < 0.1 and 0.9 < values.std() < 1.1
