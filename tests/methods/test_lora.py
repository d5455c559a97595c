"""LoRA by hand: which layers and rows each `targets` choice adapts (the paper's q and v by default, PETL_Vision's
fused qkv, the suite's earlier qkv + proj), the update W x + b + (alpha / r) B A x written out per row block, the
init (A Kaiming-uniform with a = sqrt(5), B = 0), the counts on ViT-B/16 from their formulas, and merged == unmerged.
Under a real Lightning Trainer: tests/methods/test_extra_methods.py and test_merge_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backbones import create_backbone
from methods import create_method
from methods.lora import LoRALinear
from tests.helpers.models import make_tiny, make_tiny_vit

D, R = 32, 8  # the tiny ViT's width; the default rank


def lora_of(model, block: int, name: str) -> LoRALinear:
    return model.backbone.blocks[block].attn.get_submodule(name)


@pytest.mark.parametrize(("targets", "layers"), [("qv", {"qkv"}), ("qkv", {"qkv"}), ("qkv_proj", {"qkv", "proj"})])
def test_each_target_choice_wraps_its_layers_and_only_lora_and_the_head_train(targets, layers):
    model = create_method("lora", make_tiny_vit(depth=3), num_classes=3, targets=targets)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"backbone.blocks.{i}.attn.{name}" for i in range(3) for name in layers}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{layer}.lora_{ab}" for layer in wrapped for ab in "AB"} | {"backbone.head.weight",
                                                                                     "backbone.head.bias"}


def test_the_default_is_the_papers_q_and_v_at_rank_8_and_scale_1():
    layer = lora_of(create_method("lora", make_tiny_vit(), num_classes=3), 0, "qkv")
    assert layer.adapted == (True, False, True) and layer.rank == 8 and layer.scaling == 1.0  # alpha 8 / r 8
    assert layer.lora_A.shape == (2 * R, D) and layer.lora_B.shape == (2 * D, R)  # A_q; A_v stacked, B_q; B_v


def test_qv_updates_the_q_and_v_rows_only_each_with_its_own_a_and_b():
    """The q rows [0, D) get s B_q A_q x, the k rows [D, 2D) nothing, the v rows [2D, 3D) s B_v A_v x (loralib's
    MergedLinear with enable_lora=[True, False, True])."""
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3, rank=4, alpha=6.0).eval()
    layer, x = lora_of(model, 1, "qkv"), torch.randn(2, 17, D)
    with torch.no_grad():
        layer.lora_B.normal_()
        a_q, a_v, b_q, b_v = layer.lora_A[:4], layer.lora_A[4:], layer.lora_B[:D], layer.lora_B[D:]
        plain = x @ layer.weight.T + layer.bias
        s = 6.0 / 4
        expected = torch.cat([plain[..., :D] + s * x @ a_q.T @ b_q.T, plain[..., D:2 * D],
                              plain[..., 2 * D:] + s * x @ a_v.T @ b_v.T], dim=-1)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x)[..., D:2 * D], F.linear(x, layer.weight, layer.bias)[..., D:2 * D])  # k untouched
        delta = torch.zeros(3 * D, D)
        delta[:D], delta[2 * D:] = s * b_q @ a_q, s * b_v @ a_v
        torch.testing.assert_close(layer.delta_weight(), delta)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()


@pytest.mark.parametrize(("targets", "rank", "alpha"), [("qkv", 4, 3.0), ("qkv_proj", 8, 16.0)])
def test_a_whole_layer_computes_w_x_plus_b_plus_scaled_b_a_x(targets, rank, alpha):
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3, targets=targets, rank=rank, alpha=alpha).eval()
    x = torch.randn(2, 17, D)
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


def test_dropout_acts_on_the_updates_input_in_training_only():
    """PETL_Vision's lora_drop: dropout(x) feeds A; W x + b reads x itself. In eval the update reads x."""
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3, targets="qkv", dropout=0.5)
    layer, x = lora_of(model, 0, "qkv"), torch.randn(2, 17, D)
    with torch.no_grad():
        layer.lora_B.normal_()
        model.train()
        torch.manual_seed(1)
        out = layer(x)
        torch.manual_seed(1)
        dropped = F.dropout(x, 0.5, training=True)  # the same draw: one mask over x's elements
        torch.testing.assert_close(out, x @ layer.weight.T + layer.bias + dropped @ layer.lora_A.T @ layer.lora_B.T)
        model.eval()
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias + x @ layer.lora_A.T @ layer.lora_B.T)


def test_a_is_kaiming_uniform_and_b_zero():
    """kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)."""
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3, rank=32, alpha=32.0)
    bound = 1 / math.sqrt(32)
    a = torch.cat([layer.lora_A.detach().flatten() for layer in model.lora_layers()])  # 2 x 64 x 32 draws
    assert a.abs().max() <= bound and a.max() > 0.99 * bound and a.min() < -0.99 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(layer.lora_B.abs().sum() == 0 for layer in model.lora_layers())


VIT_B_HEAD = 768 * 100 + 100  # 100 classes


@pytest.mark.parametrize(("options", "expected"), [
    ({}, 12 * 2 * 8 * (768 + 768) + VIT_B_HEAD),  # the paper's q, v: 294,912 + head
    ({"targets": "qkv"}, 12 * 8 * (768 + 3 * 768) + VIT_B_HEAD),  # PETL_Vision's: the same 294,912
    ({"targets": "qkv_proj"}, 12 * 8 * ((768 + 2304) + (768 + 768)) + VIT_B_HEAD),  # the earlier default: 519,268
])
def test_vit_b_counts_follow_their_formulas(options, expected):
    with torch.device("meta"):
        model = create_method("lora", create_backbone("vit_base_patch16_224"), num_classes=100, **options)
    assert model.tuned_params == expected
    if options.get("targets") == "qkv_proj":
        assert expected == 519_268  # the count results/reference quotes for its LoRA runs


def test_qv_on_a_swin_adapts_q_and_v_of_every_window_attention():
    model = create_method("lora", make_tiny("swin"), num_classes=3)
    widths = [layer.in_features for layer in model.lora_layers()]
    assert widths == [24, 24, 48, 48]  # two blocks per stage, each its stage's width
    assert model.tuned_params == sum(2 * R * (c + c) for c in widths) + 48 * 3 + 3


@pytest.mark.parametrize("out", [2 * D, 3 * 16])  # not q, k and v of the width D, even where 3 divides it
def test_qv_refuses_a_qkv_that_is_not_three_parts_of_the_width(out):
    backbone = make_tiny_vit()
    for block in backbone.blocks:
        block.attn.qkv = torch.nn.Linear(D, out)
    with pytest.raises(ValueError, match=r"targets=qv adapts the q and v rows of a fused qkv .* use targets=qkv"):
        create_method("lora", backbone, num_classes=3)


@pytest.mark.parametrize(("options", "message"), [
    ({"targets": "q"}, r"LoRA targets must be one of qv, qkv, qkv_proj \(qv, qkv or qkv_proj\), got 'q'\."),
    ({"dropout": 1.0}, r"LoRA dropout must be a number in \[0, 1\), got 1\.0\."),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("lora", make_tiny_vit(), num_classes=3, **options)
