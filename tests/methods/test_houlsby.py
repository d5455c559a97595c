"""Houlsby adapters against a block written out here: h = attn(norm1(x)); x = x + h + A1(h); h = mlp(norm2(x));
x = x + h + A2(h), A(h) = up(gelu(down(h))); bottleneck 64 (adapter-bert's default); every LayerNorm trains too
(the paper's Fig. 2) unless train_norms=False."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

from methods import create_method
from methods.adapter import Adapter
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import assert_identity_at_init, assert_trains_exactly
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def houlsby_count(bottleneck: int, train_norms: bool = True) -> int:
    """ViT-B/16, 200 classes: two adapters per block (down D -> m and up m -> D, with biases), the 2 LayerNorms of
    every block and the final one (weight + bias each) when they train, and the head."""
    adapters = DEPTH * 2 * (D * bottleneck + bottleneck + bottleneck * D + D)
    norms = (DEPTH * 2 + 1) * 2 * D if train_norms else 0
    return adapters + norms + HEAD


def test_vit_b_count_follows_the_formula():
    assert vit_b_tuned("houlsby") == houlsby_count(64) == 2_571_464
    assert vit_b_tuned("houlsby", train_norms=False) == houlsby_count(64, train_norms=False) == 2_533_064
    assert vit_b_tuned("houlsby", bottleneck=8) == houlsby_count(8)


def test_starts_as_the_pretrained_function(tiny_batch):
    assert_identity_at_init("houlsby", tiny_batch[0])


ADAPTERS = {f"backbone.blocks.{i}.adapter_{where}.{proj}.{t}" for i in range(2) for where in ("attn", "mlp")
            for proj in ("down", "up") for t in ("weight", "bias")}
NORMS = {f"backbone.{norm}.{t}" for norm in ("blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2",
                                              "norm") for t in ("weight", "bias")}


@pytest.mark.parametrize(("options", "added"), [({}, ADAPTERS | NORMS), ({"train_norms": False}, ADAPTERS)])
def test_every_added_tensor_learns_and_the_rest_stays(options, added, tiny_batch):
    torch.manual_seed(0)
    model = create_method("houlsby", make_tiny_vit(), num_classes=3, **options)
    assert_trains_exactly(model, tiny_batch, added)


def adapter(a, h: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)


def reference_logits(model, images: torch.Tensor) -> torch.Tensor:
    backbone = model.backbone
    x = embed(backbone, images)
    for block in backbone.blocks:
        h = block.attn(block.norm1(x))
        x = x + h + adapter(block.adapter_attn, h)
        h = block.mlp(block.norm2(x))
        x = x + h + adapter(block.adapter_mlp, h)
    return backbone.head(backbone.norm(x)[:, 0])


def test_adapters_read_each_sublayer_output_before_its_residual_add():
    torch.manual_seed(0)
    model = create_method("houlsby", make_tiny_vit(), num_classes=3, bottleneck=6).eval()
    assert all(type(a) is Adapter for a in model.adapters()) and len(model.adapters()) == 4
    with torch.no_grad():
        for a in model.adapters():  # trained adapters: `up` away from its zero init
            a.up.weight.normal_(std=0.5)
            a.up.bias.normal_(std=0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_logits(model, images)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        for block in model.backbone.blocks:  # each of the two adapters matters at this tolerance
            block.adapter_attn.up.weight.zero_()
        assert not torch.allclose(model(images), expected, atol=1e-3)


def test_bottleneck_width_and_init():
    model = create_method("houlsby", make_tiny_vit(), num_classes=3)
    for a in model.adapters():
        assert (a.down.in_features, a.down.out_features, a.up.in_features, a.up.out_features) == (32, 64, 64, 32)
        assert a.up.weight.abs().sum() == 0 and a.up.bias.abs().sum() == 0 and a.down.weight.abs().sum() > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"bottleneck": 0}, "houlsby bottleneck must be an integer >= 1, got 0."),
    ({"bottleneck": 8.0}, "houlsby bottleneck must be an integer >= 1, got 8.0."),
    ({"train_norms": "yes"}, "houlsby train_norms must be true or false, got 'yes'."),
])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(ValueError) as err:
        create_method("houlsby", make_tiny_vit(), num_classes=3, **options)
    assert str(err.value) == message


def test_refuses_blocks_it_does_not_mirror():
    with pytest.raises(ValueError, match=r"houlsby needs timm's plain Block; blocks\[0\] is ResPostBlock"):
        create_method("houlsby", make_tiny_vit(block_fn=ResPostBlock), num_classes=3)
