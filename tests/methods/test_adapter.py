"""The Pfeiffer adapter against a block written out here: it reads the MLP's output, h = mlp(norm2(x)), and the
block adds x + h + up(gelu(down(h))); bottleneck width D // reduction; `up` zero, `down` Kaiming-uniform."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import embed


def reference_adapter_logits(model, images: torch.Tensor) -> torch.Tensor:
    backbone = model.backbone
    x = embed(backbone, images)
    for block in backbone.blocks:
        x = x + block.attn(block.norm1(x))
        h = block.mlp.mlp(block.norm2(x))  # the pretrained MLP the adapter wraps
        adapter = block.mlp.adapter
        x = x + h + F.linear(F.gelu(F.linear(h, adapter.down.weight, adapter.down.bias)), adapter.up.weight,
                             adapter.up.bias)
    return backbone.head(backbone.norm(x)[:, 0])


def test_adapter_reads_the_mlp_output():
    torch.manual_seed(0)
    model = create_method("adapter", make_tiny_vit(), num_classes=3, reduction=4).eval()
    with torch.no_grad():
        for adapter in model.adapters():  # a trained adapter: `up` away from its zero init
            adapter.up.weight.normal_(std=0.5)
            adapter.up.bias.normal_(std=0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_adapter_logits(model, images)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        for adapter in model.adapters():  # and the adapters matter at this tolerance
            adapter.up.weight.zero_()
        assert not torch.allclose(model(images), expected, atol=1e-3)


@pytest.mark.parametrize(("options", "width"), [({}, 32 // 8), ({"reduction": 2}, 16), ({"reduction": 32}, 1)])
def test_bottleneck_width_is_dim_over_reduction(options, width):
    model = create_method("adapter", make_tiny_vit(), num_classes=3, **options)
    assert len(model.adapters()) == 2  # one per block
    for adapter in model.adapters():
        assert (adapter.down.in_features, adapter.down.out_features) == (32, width)
        assert (adapter.up.in_features, adapter.up.out_features) == (width, 32)
    added = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
    assert added == 2 * (32 * width + width + width * 32 + 32)


def test_up_starts_at_zero_and_down_is_kaiming_uniform():
    """nn.Linear's Kaiming-uniform (a = sqrt(5)): uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    torch.manual_seed(0)
    model = create_method("adapter", make_tiny_vit(depth=4), num_classes=3, reduction=1)
    bound = 1 / math.sqrt(32)
    down = torch.cat([a.down.weight.detach().flatten() for a in model.adapters()])  # 4 x 32 x 32 draws
    assert down.abs().max() <= bound and down.max() > 0.99 * bound and down.min() < -0.99 * bound
    assert down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for adapter in model.adapters():
        assert adapter.down.bias.abs().max() <= bound and adapter.down.bias.abs().sum() > 0
        assert adapter.up.weight.abs().sum() == 0 and adapter.up.bias.abs().sum() == 0
