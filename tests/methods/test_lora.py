"""LoRA by hand: it wraps exactly every block's attn.qkv and attn.proj, computes W x + b + (alpha / r) B A x,
starts from A Kaiming-uniform (a = sqrt(5)) and B = 0, and evaluates merged exactly as unmerged under a real
Lightning Trainer, with W bit-identical afterwards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from methods import create_method
from methods.lora import LoRALinear
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import evaluate as evaluate_merged


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


def evaluate(model, data, tmp_path) -> tuple[dict, torch.Tensor, set]:
    """(metrics, logits, merged states) of validate + test; merged: the LoRA layers held a merged copy."""
    return evaluate_merged(model, data, tmp_path,
                           lambda m: all(layer.merged_weight is not None for layer in m.lora_layers()))


def test_merged_evaluation_equals_unmerged_under_a_trainer(tmp_path):
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3, merge_for_eval=True)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.lora_B.normal_(std=0.5)
    unmerged_model = copy.deepcopy(model)
    unmerged_model.options.merge_for_eval = False
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = TensorDataset(torch.randn(10, 3, 32, 32), torch.randint(0, 3, (10,)))
    merged_metrics, merged_logits, merged_state = evaluate(model, data, tmp_path)
    unmerged_metrics, unmerged_logits, unmerged_state = evaluate(unmerged_model, data, tmp_path)
    assert merged_state == {True} and unmerged_state == {False}  # each ran the way it says
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    assert merged_metrics.keys() == {"val/loss", "val/acc", "test/loss", "test/acc"} == unmerged_metrics.keys()
    for key, value in merged_metrics.items():
        assert value == pytest.approx(unmerged_metrics[key], abs=1e-5), key
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # W never written
    assert all(layer.merged_weight is None for layer in model.lora_layers())
