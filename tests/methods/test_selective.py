"""Attention / MLP tuning as PETL_Vision's --attention_type / --mlp_type select it: the chosen linears of the chosen
blocks train whole (weight and bias), nothing else; counts at ViT-B/16 from the formula."""

from __future__ import annotations

import pytest
import torch

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import assert_trains_exactly
from tests.helpers.vit import DEPTH, HEAD, D, vit_b_tuned

HIDDEN = 4 * D  # ViT-B's MLP width


def test_vit_b_counts():
    attention = D * 3 * D + 3 * D + D * D + D  # qkv and proj, weights and biases
    mlp = D * HIDDEN + HIDDEN + HIDDEN * D + D
    assert vit_b_tuned("attention_tune") == DEPTH * attention + HEAD == 28_502_216
    assert vit_b_tuned("mlp_tune") == DEPTH * mlp + HEAD == 56_822_984
    assert vit_b_tuned("attention_tune", part="proj", blocks="1-6") == 6 * (D * D + D) + HEAD
    assert vit_b_tuned("mlp_tune", part="fc1", blocks="12") == D * HIDDEN + HIDDEN + HEAD


@pytest.mark.parametrize(("method", "options", "layers"), [
    ("attention_tune", {}, {f"{b}.attn.{n}" for b in (0, 1) for n in ("qkv", "proj")}),
    ("attention_tune", {"part": "qkv", "blocks": "2"}, {"1.attn.qkv"}),
    ("mlp_tune", {"part": "fc2"}, {"0.mlp.fc2", "1.mlp.fc2"}),
    ("mlp_tune", {"blocks": "1"}, {"0.mlp.fc1", "0.mlp.fc2"}),
])
def test_exactly_the_chosen_linears_train(method, options, layers, tiny_batch):
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(), num_classes=3, **options)
    assert_trains_exactly(model, tiny_batch, {f"backbone.blocks.{layer}.{t}" for layer in layers
                                              for t in ("weight", "bias")})


def test_a_block_beyond_the_depth_is_refused():
    with pytest.raises(ValueError, match="names block 3, but the backbone has 2 blocks"):
        create_method("mlp_tune", make_tiny_vit(), num_classes=3, blocks="2-3")
