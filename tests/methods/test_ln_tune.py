"""LN-tune: exactly the LayerNorms' weights and biases and the head train; nothing is added, so it starts as the
pretrained function; the ViT-B/16 count is 25 LayerNorms x 2 x 768 + the 200-class head (issue 16: 192,200)."""

from __future__ import annotations

import copy

import pytest
import torch

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import train_steps

D, C, DEPTH = 768, 200, 12
HEAD = D * C + C


def test_vit_b_count_is_every_layernorm_and_the_head(vit_b):
    model = create_method("ln_tune", vit_b, num_classes=C)
    assert model.tuned_params == (2 * DEPTH + 1) * 2 * D + HEAD == 192_200  # norm1, norm2 per block, final norm


def test_trains_exactly_the_norms_and_the_head(tiny_batch):
    torch.manual_seed(0)
    model = create_method("ln_tune", make_tiny_vit(), num_classes=3)
    expected = {f"backbone.blocks.{i}.{n}.{wb}" for i in range(2) for n in ("norm1", "norm2") for wb in
                ("weight", "bias")} | {"backbone.norm.weight", "backbone.norm.bias", "backbone.head.weight",
                                       "backbone.head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_batch)
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == expected


def test_fc_norm_and_qk_norms_are_layernorms_too():
    model = create_method("ln_tune", make_tiny_vit(global_pool="avg", fc_norm=True, qk_norm=True), num_classes=3)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"backbone.fc_norm.weight", "backbone.blocks.0.attn.q_norm.weight", "backbone.blocks.1.attn.k_norm.bias"
            } <= tuned


def test_starts_as_the_pretrained_function(tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    plain = copy.deepcopy(backbone).eval()
    model = create_method("ln_tune", backbone, num_classes=3).eval()
    assert torch.equal(model.backbone.forward_features(tiny_batch[0]), plain.forward_features(tiny_batch[0]))


def test_a_backbone_without_layernorms_is_refused():
    backbone = make_tiny_vit()
    for block in backbone.blocks:
        block.norm1 = block.norm2 = torch.nn.Identity()
    backbone.norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="ln_tune trains the backbone's LayerNorms; this backbone has none"):
        create_method("ln_tune", backbone, num_classes=3)
