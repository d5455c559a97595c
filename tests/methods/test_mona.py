"""Mona against the official forward written out here (Swin-Transformer-Classification/.../swin_transformer_mona.py):
x = mona1(x + attn(norm1(x))); x = mona2(x + mlp(norm2(x))), mona(x) = x + up(gelu(op(down(ln(x) g + x g_x)))),
op(z) = z' + conv1x1(z'), z' = z + (dw3 + dw5 + dw7)(z) / 3; on a ViT the CLS token its own 1x1 image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import create_method
from tests.helpers.models import make_tiny, make_tiny_vit
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def mona_count(dim: int, m: int = 64) -> int:
    """One adapter: LayerNorm and the two gammas (4 D), down (m D + m), three depth-wise convs (k*k*m + m each),
    the 1x1 conv (m*m + m), up (m D + D)."""
    return 4 * dim + (m * dim + m) + sum(k * k * m + m for k in (3, 5, 7)) + (m * m + m) + (m * dim + dim)


def test_vit_b_count_follows_the_formula():
    assert mona_count(D) == 133 * D + 9_728
    assert vit_b_tuned("mona") == DEPTH * 2 * mona_count(D) + HEAD == 2_838_728
    assert vit_b_tuned("mona", bottleneck=16) == DEPTH * 2 * mona_count(D, 16) + HEAD


def op(c, z: torch.Tensor) -> torch.Tensor:
    """The code's MonaOp on (B, m, H, W), written with F.conv2d."""
    m = z.shape[1]
    convs = [F.conv2d(z, conv.weight, conv.bias, padding=conv.weight.shape[-1] // 2, groups=m) for conv in c.convs]
    z = (convs[0] + convs[1] + convs[2]) / 3.0 + z
    return z + F.conv2d(z, c.projector.weight, c.projector.bias)


def mona(a, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    z = F.linear(F.layer_norm(x, (x.shape[-1],), a.norm.weight, a.norm.bias) * a.gamma + x * a.gammax,
                 a.project1.weight, a.project1.bias)
    b, n, m = z.shape
    cls = op(a.adapter_conv, z[:, :1].reshape(b, m, 1, 1)).reshape(b, 1, m)
    patches = op(a.adapter_conv, z[:, 1:].reshape(b, *grid, m).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    z = torch.cat([cls, patches.reshape(b, n - 1, m)], dim=1)
    return x + F.linear(F.gelu(z), a.project2.weight, a.project2.bias)


def perturbed(model):
    with torch.no_grad():  # away from the init: gamma from 1e-6, the norm's affine from 1 and 0
        for a in model.adapters():
            for t in (a.gamma, a.norm.weight, a.norm.bias, a.project2.weight):
                t.normal_(std=0.5)
    return model


def test_adapters_follow_each_residual_add_and_convolve_on_the_patch_grid():
    torch.manual_seed(0)
    model = perturbed(create_method("mona", make_tiny_vit(), num_classes=3, bottleneck=6)).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    backbone = model.backbone
    with torch.no_grad():
        x = embed(backbone, images)
        for block in backbone.blocks:
            x = mona(block.mona1, x + block.attn(block.norm1(x)), (4, 4))
            x = mona(block.mona2, x + block.mlp(block.norm2(x)), (4, 4))
        expected = backbone.head(backbone.norm(x)[:, 0])
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)


def test_swin_adapters_convolve_the_blocks_map():
    torch.manual_seed(0)
    model = perturbed(create_method("mona", make_tiny("swin"), num_classes=3, bottleneck=6)).eval()
    block = model.backbone.layers[0].blocks[1]  # a shifted-window block of stage 0, on an 8 x 8 map
    x = torch.randn(2, 8, 8, 24, generator=torch.Generator().manual_seed(1))

    def mona_map(a, x):
        z = F.linear(F.layer_norm(x, (24,), a.norm.weight, a.norm.bias) * a.gamma + x * a.gammax,
                     a.project1.weight, a.project1.bias)
        z = op(a.adapter_conv, z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + F.linear(F.gelu(z), a.project2.weight, a.project2.bias)

    with torch.no_grad():
        h = mona_map(block.mona1, x + block._attn(block.norm1(x)))
        expected = mona_map(block.mona2, h + block.mlp(block.norm2(h)))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)


def test_init_is_the_codes():
    torch.manual_seed(0)
    model = create_method("mona", make_tiny_vit(), num_classes=3)
    for a in model.adapters():
        assert torch.equal(a.gamma, torch.full((32,), 1e-6)) and torch.equal(a.gammax, torch.ones(32))
        for layer in (a.project1, a.project2):  # trunc_normal_(std=0.02): cut at +-2 (absolute), so all within
            assert layer.bias.abs().sum() == 0 and 0 < layer.weight.abs().max() < 0.1
        assert 0.015 < torch.cat([a.project1.weight.flatten(), a.project2.weight.flatten()]).std() < 0.025
        assert [c.kernel_size for c in a.adapter_conv.convs] == [(3, 3), (5, 5), (7, 7)]
        assert all(c.groups == 64 for c in a.adapter_conv.convs) and a.dropout.p == 0.1


def test_refuses_a_backbone_without_a_fixed_grid():
    with pytest.raises(ValueError, match="mona needs a fixed patch grid"):
        create_method("mona", make_tiny_vit(dynamic_img_size=True), num_classes=3)
