"""Adapter+ against a block written out here: x = block(x); x = x + s * up(gelu(down(x))), s one scale per channel
(the official `forward_post` with scaling "channel"); Houlsby init (trunc-normal std 0.01 at +-2 std, zero biases)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def adapter_plus_count(bottleneck: int, scale: int) -> int:
    """ViT-B/16, 200 classes: one adapter per block (down and up with biases) and its scale (D, 1 or 0 values)."""
    return DEPTH * (D * bottleneck + bottleneck + bottleneck * D + D + scale) + HEAD


def test_vit_b_count_follows_the_formula():
    assert vit_b_tuned("adapter_plus") == adapter_plus_count(8, D) == 319_784
    assert vit_b_tuned("adapter_plus", scaling="learned", bottleneck=32) == adapter_plus_count(32, 1)
    assert vit_b_tuned("adapter_plus", scaling="none") == adapter_plus_count(8, 0)


def reference_logits(model, images: torch.Tensor) -> torch.Tensor:
    backbone = model.backbone
    x = embed(backbone, images)
    for block in backbone.blocks:
        x = x + block.attn(block.norm1(x))
        x = x + block.mlp(block.norm2(x))
        a = block.adapter_plus
        x = x + a.scale * F.linear(F.gelu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    return backbone.head(backbone.norm(x)[:, 0])


def test_adapter_reads_and_adds_to_the_whole_blocks_output():
    torch.manual_seed(0)
    model = create_method("adapter_plus", make_tiny_vit(), num_classes=3, bottleneck=4).eval()
    with torch.no_grad():
        for a in model.adapters():  # a trained state: every tensor away from its init
            for t in (a.down.bias, a.up.weight, a.up.bias, a.scale):
                t.normal_(std=0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_logits(model, images)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        model.adapters()[0].scale.zero_()  # the scale multiplies the branch
        assert not torch.allclose(model(images), expected, atol=1e-3)


def test_houlsby_init_and_channel_scale():
    torch.manual_seed(0)
    model = create_method("adapter_plus", make_tiny_vit(), num_classes=3)
    weights = torch.cat([t.flatten() for a in model.adapters() for t in (a.down.weight, a.up.weight)])
    assert weights.abs().max() <= 0.02 and weights.abs().min() < 0.02 and 0.006 < weights.std() < 0.011
    assert all(a.down.bias.abs().sum() == 0 and a.up.bias.abs().sum() == 0 for a in model.adapters())
    assert all(torch.equal(a.scale, torch.ones(32)) for a in model.adapters())
    assert all((a.down.in_features, a.down.out_features) == (32, 8) for a in model.adapters())
    lora = create_method("adapter_plus", make_tiny_vit(), num_classes=3, init="lora")
    assert all(a.up.weight.abs().sum() == 0 and a.down.weight.abs().sum() > 0 for a in lora.adapters())


def test_lora_init_starts_as_the_pretrained_function(tiny_batch):
    torch.manual_seed(0)
    plain = make_tiny_vit().eval()
    model = create_method("adapter_plus", copy.deepcopy(plain), num_classes=3, init="lora").eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(tiny_batch[0]), plain.forward_features(tiny_batch[0]))


def test_branch_drop_path_drops_whole_samples_in_training():
    torch.manual_seed(0)
    model = create_method("adapter_plus", make_tiny_vit(), num_classes=3, adapter_drop_path=0.5)
    adapter = model.adapters()[0].train()
    x = torch.randn(64, 5, 32)
    with torch.no_grad():
        trained = adapter(x)
        kept = trained.flatten(1).abs().sum(dim=1) > 0
        assert 0 < kept.sum() < 64  # some samples' branch dropped whole, the rest kept and scaled by 1 / (1 - p)
        torch.testing.assert_close(trained[kept], adapter.eval()(x)[kept] / 0.5)
    blocks = create_method("adapter_plus", make_tiny_vit(), num_classes=3, drop_path=0.1).backbone.blocks
    assert isinstance(blocks[1].drop_path1, DropPath) and blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize(("options", "message"), [
    ({"bottleneck": 0}, "adapter_plus bottleneck must be a positive integer, got 0."),
    ({"scaling": "layer"}, "adapter_plus scaling must be one of channel, learned, none, got 'layer'."),
    ({"adapter_drop_path": 1.0}, "adapter_plus adapter_drop_path must be a number in [0, 1), got 1.0."),
])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(ValueError) as err:
        create_method("adapter_plus", make_tiny_vit(), num_classes=3, **options)
    assert str(err.value) == message
