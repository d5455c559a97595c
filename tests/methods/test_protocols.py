"""What partial_k, bias and mlp_k tune, by rule on a 4-block ViT; the mlp_k head's layers and init; the embedded
backbone's geometry and data config (they decide every embedded number)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backbones import create_backbone, data_config
from methods import create_method
from tests.helpers.models import make_tiny_vit


def trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


HEAD = {"backbone.head.weight", "backbone.head.bias"}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_partial_k_trains_the_last_k_blocks_the_final_norm_and_the_head(k):
    model = create_method("partial_k", make_tiny_vit(depth=4), num_classes=3, k=k)
    blocks = {n for n, _ in model.backbone.named_parameters() if n.startswith("blocks.")}
    last_k = {f"backbone.{n}" for n in blocks if int(n.split(".")[1]) >= 4 - k}
    assert trained(model) == last_k | {"backbone.norm.weight", "backbone.norm.bias"} | HEAD
    assert len(last_k) == k * len(blocks) // 4


def test_partial_k_default_is_partial_1():
    assert create_method("partial_k", make_tiny_vit(depth=4), num_classes=3).options.k == 1


def test_bias_trains_exactly_the_bias_tensors_and_the_head():
    model = create_method("bias", make_tiny_vit(), num_classes=3)
    per_block = {f"backbone.blocks.{i}.{m}.bias" for i in range(2)
                 for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")}
    assert trained(model) == per_block | {"backbone.patch_embed.proj.bias", "backbone.norm.bias"} | HEAD


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mlp_k_head_layers(k):
    model = create_method("mlp_k", make_tiny_vit(), num_classes=3, k=k)
    head = model.backbone.head
    expected = [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Dropout] * (k - 1) + [nn.Linear]
    assert [type(m) for m in head] == expected
    for i in range(k - 1):
        linear, norm, dropout = head[4 * i], head[4 * i + 2], head[4 * i + 3]
        assert (linear.in_features, linear.out_features) == (32, 32) and norm.normalized_shape == (32,)
        assert dropout.p == 0.1  # the VPT code's default
    assert (head[-1].in_features, head[-1].out_features) == (32, 3)
    assert trained(model) == {f"backbone.head.{n}" for n, _ in head.named_parameters()}


def test_mlp_k_default_and_dropout_option():
    model = create_method("mlp_k", make_tiny_vit(), num_classes=3, dropout=0.25)
    assert len(model.backbone.head) == 4 * 2 + 1  # the default, MLP-3
    assert all(m.p == 0.25 for m in model.backbone.head if isinstance(m, nn.Dropout))


def test_mlp_k_hidden_weights_are_kaiming_normal_fan_out():
    """kaiming_normal_(mode='fan_out', a=0): N(0, 2 / fan_out). Normal, not uniform: some draws lie beyond the
    same-variance uniform's bound sqrt(3) * std."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_embedded_p7_28")  # width 128: 2 x 16,384 hidden weights
    model = create_method("mlp_k", backbone, num_classes=10, k=3)
    weights = torch.cat([m.weight.detach().flatten() for m in list(model.backbone.head)[:-1]
                         if isinstance(m, nn.Linear)])
    std = math.sqrt(2 / 128)
    assert weights.numel() == 2 * 128 * 128
    assert weights.std().item() == pytest.approx(std, rel=0.03)
    assert abs(weights.mean().item()) < 0.05 * std
    beyond = (weights.abs() > math.sqrt(3) * std).float().mean().item()
    assert beyond == pytest.approx(0.0833, abs=0.02)  # P(|z| > sqrt(3)) for a standard normal


def test_embedded_backbone_geometry_and_data_config():
    backbone = create_backbone("vit_embedded_p7_28")
    d, n = 128, 16
    assert backbone.patch_embed.proj.in_channels == 1 and backbone.patch_embed.patch_size == (7, 7)
    assert backbone.patch_embed.num_patches == n and backbone.embed_dim == d and len(backbone.blocks) == 6
    assert all(block.attn.num_heads == 4 for block in backbone.blocks)
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = (49 * d + d) + d + (n + 1) * d + 6 * block + 2 * d + (d * 10 + 10)  # patches, CLS, pos, blocks, norm
    assert sum(p.numel() for p in backbone.parameters()) == expected  # 1.2M
    config = data_config(backbone)
    assert config["input_size"] == (1, 28, 28)
    assert config["mean"] == pytest.approx((0.2860,)) and config["std"] == pytest.approx((0.3530,))  # Fashion-MNIST
    assert config["crop_pct"] == 1.0 and config["interpolation"] == "bilinear"


def test_adapter_default_reduction_is_the_papers_8():
    model = create_method("adapter", create_backbone("vit_embedded_p7_28"), num_classes=10)
    assert all(block.mlp.adapter.down.out_features == 128 // 8 for block in model.backbone.blocks)
