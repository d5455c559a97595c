"""E²VPT against a forward written out here: deep visual prompts after CLS, and every attention with the block's
(H, T, d) key-value prompt as extra keys and values (one tensor for both), by an explicit softmax; init bounds and
the ViT-B/16 count from the formula."""

from __future__ import annotations

import math

import torch

from methods import create_method
from tests.helpers.models import TINY_VIT, make_tiny_vit
from tests.helpers.training import assert_trains_exactly
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def test_vit_b_count():
    heads, head_dim = 12, 64
    assert vit_b_tuned("e2vpt") == DEPTH * 5 * D + DEPTH * heads * 5 * head_dim + HEAD == 245_960
    assert vit_b_tuned("e2vpt", prompt_length=10, kv_length=2) == DEPTH * (10 * D + heads * 2 * head_dim) + HEAD


def test_init_bounds():
    torch.manual_seed(0)
    model = create_method("e2vpt", make_tiny_vit(), num_classes=3, prompt_length=64, kv_length=64)
    width, patch, head_dim = TINY_VIT["embed_dim"], TINY_VIT["patch_size"], TINY_VIT["embed_dim"] // 2
    prompt_bound = math.sqrt(6 / (3 * patch * patch + width))  # VPT's Xavier bound, the code's 3 channels
    kv_bound = math.sqrt(6 / (64 * head_dim))  # Kaiming-uniform, fan-in T * d
    assert model.e2vpt_prompts.abs().max() <= prompt_bound
    assert model.e2vpt_prompts.abs().max() > 0.9 * prompt_bound
    for block in model.backbone.blocks:
        assert block.e2vpt_kv.shape == (2, 64, head_dim)
        assert kv_bound * 0.9 < block.e2vpt_kv.abs().max() <= kv_bound


def reference_attention(attn, h, kv):
    batch, tokens, width = h.shape
    heads = kv.shape[0]
    q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in attn.qkv(h).chunk(3, dim=-1))
    k = torch.cat([kv.expand(batch, -1, -1, -1), k], dim=2)
    v = torch.cat([kv.expand(batch, -1, -1, -1), v], dim=2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))


def test_logits_match_a_hand_written_forward(tiny_batch):
    torch.manual_seed(0)
    model = create_method("e2vpt", make_tiny_vit(), num_classes=3, prompt_length=3, kv_length=2).eval()
    backbone, images, p = model.backbone, tiny_batch[0], 3
    with torch.no_grad():
        x = embed(backbone, images)
        for i, block in enumerate(backbone.blocks):
            prompts = model.e2vpt_prompts[i].expand(len(images), -1, -1)
            x = torch.cat([x[:, :1], prompts, x[:, 1 + (p if i else 0):]], dim=1)
            x = x + reference_attention(block.attn, block.norm1(x), block.e2vpt_kv)
            x = x + block.mlp(block.norm2(x))
        expected = backbone.head(backbone.norm(x)[:, 0])
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        assert model.forward_features(images).shape == (4, 17, TINY_VIT["embed_dim"])  # prompts stripped


def test_only_the_prompts_and_head_train(tiny_batch):
    torch.manual_seed(0)
    model = create_method("e2vpt", make_tiny_vit(), num_classes=3)
    assert_trains_exactly(model, tiny_batch, {"e2vpt_prompts", "backbone.blocks.0.e2vpt_kv",
                                              "backbone.blocks.1.e2vpt_kv"})
