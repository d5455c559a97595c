"""Convpass against a block and a 3x3 convolution written out here (nine shifted taps over the zero-padded patch
grid; each prefix token alone, so only the centre tap): h = norm1(x); x = x + attn(h) + s * B1(h); h = norm2(x);
x = x + mlp(h) + s * B2(h), B(h) = up(qgelu(conv(qgelu(down(h))))); the official code's init and the issue's count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

from backbones import create_backbone
from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import assert_identity_at_init, assert_trains_exactly
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def test_vit_b_count_is_the_issues():
    bypass = (D * 8 + 8) + (8 * 8 * 3 * 3 + 8) + (8 * D + D)  # down, 3x3 conv, up; all with bias
    assert vit_b_tuned("convpass") == DEPTH * 2 * bypass + HEAD == 481_352
    assert vit_b_tuned("convpass", dim=16) == DEPTH * 2 * ((D * 16 + 16) + (16 * 16 * 9 + 16) + (16 * D + D)) + HEAD


def test_starts_as_the_pretrained_function(tiny_batch):
    assert_identity_at_init("convpass", tiny_batch[0])
    assert_identity_at_init("convpass", tiny_batch[0], xavier_init=True)


def test_every_added_tensor_learns_and_the_backbone_stays(tiny_batch):
    torch.manual_seed(0)
    model = create_method("convpass", make_tiny_vit(), num_classes=3)
    added = {f"backbone.blocks.{i}.adapter_{where}.adapter_{part}.{t}" for i in range(2) for where in ("attn", "mlp")
             for part in ("down", "conv", "up") for t in ("weight", "bias")}
    assert_trains_exactly(model, tiny_batch, added)


def quick_gelu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(1.702 * z)


def conv3x3(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, H, W, d) -> (B, H, W, d): out[i, j] = bias + sum over taps (a, b) of weight[:, :, a, b] @ z[i+a-1, j+b-1],
    zero outside the grid."""
    _, grid_h, grid_w, _ = z.shape
    padded = F.pad(z, (0, 0, 1, 1, 1, 1))  # one zero row / column on each side of H and W
    out = bias.expand_as(z).clone()
    for a in range(3):
        for b in range(3):
            out = out + padded[:, a:a + grid_h, b:b + grid_w] @ weight[:, :, a, b].T
    return out


def reference_bypass(bypass, h: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    z = quick_gelu(F.linear(h, bypass.adapter_down.weight, bypass.adapter_down.bias))
    weight, bias = bypass.adapter_conv.weight, bypass.adapter_conv.bias
    singles = z[:, :prefix] @ weight[:, :, 1, 1].T + bias  # a 1x1 image: the centre tap only
    patches = conv3x3(z[:, prefix:].reshape(len(z), *grid, -1), weight, bias).flatten(1, 2)
    z = quick_gelu(torch.cat([singles, patches], dim=1))
    return F.linear(z, bypass.adapter_up.weight, bypass.adapter_up.bias)


def reference_logits(model, images: torch.Tensor, scale: float) -> torch.Tensor:
    backbone = model.backbone
    prefix, grid = backbone.num_prefix_tokens, tuple(backbone.patch_embed.grid_size)
    x = embed(backbone, images)
    for block in backbone.blocks:
        h = block.norm1(x)
        x = x + block.attn(h) + scale * reference_bypass(block.adapter_attn, h, prefix, grid)
        h = block.norm2(x)
        x = x + block.mlp(h) + scale * reference_bypass(block.adapter_mlp, h, prefix, grid)
    return backbone.head(backbone.norm(x)[:, 0])


BACKBONES = {
    "tiny 4x4 + CLS": (lambda: make_tiny_vit(), (3, 32, 32)),
    "embedded 4x4 + CLS": (lambda: create_backbone("vit_embedded_p7_28"), (1, 28, 28)),
    "CLS + 2 registers": (lambda: make_tiny_vit(reg_tokens=2), (3, 32, 32)),
    "4x2 grid, 16x8 px patches": (lambda: make_tiny_vit(img_size=(32, 16)), (3, 32, 16)),
}


@pytest.mark.parametrize(("options", "scale"), [({}, 1.0), ({"scale": 0.3, "xavier_init": True}, 0.3)])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_bypasses_read_each_sublayer_input_and_convolve_the_patch_grid(backbone, options, scale):
    build, shape = BACKBONES[backbone]
    torch.manual_seed(0)
    model = create_method("convpass", build(), num_classes=3, dim=4, **options).eval()
    with torch.no_grad():
        for bypass in model.bypasses():  # trained bypasses: every tensor away from its init
            for p in bypass.parameters():
                p.add_(torch.randn_like(p), alpha=0.5)
    images = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_logits(model, images, scale)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(reference_logits(model, images, 0.0), expected, atol=1e-3)  # the bypasses matter


def test_init_is_the_official_codes():
    """down Xavier-uniform (bound sqrt(6 / (D + d))) and zero bias; up zero; conv kernel the identity at the centre
    tap by default, Xavier-uniform (bound sqrt(6 / (9 d + 9 d))) with xavier_init; conv bias zero."""
    torch.manual_seed(0)
    model = create_method("convpass", make_tiny_vit(depth=4), num_classes=3)
    down = torch.cat([b.adapter_down.weight.detach().flatten() for b in model.bypasses()])  # 8 x 8 x 32 draws
    bound = math.sqrt(6 / (32 + 8))
    assert down.abs().max() <= bound and down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    identity = torch.zeros(8, 8, 3, 3)
    identity[:, :, 1, 1] = torch.eye(8)
    for b in model.bypasses():
        assert torch.equal(b.adapter_conv.weight, identity)
        assert not any(t.abs().sum() for t in (b.adapter_down.bias, b.adapter_conv.bias, b.adapter_up.weight,
                                                 b.adapter_up.bias))
        assert b.dropout.p == 0.1
    model = create_method("convpass", make_tiny_vit(depth=4), num_classes=3, xavier_init=True)
    conv = torch.cat([b.adapter_conv.weight.detach().flatten() for b in model.bypasses()])
    bound = math.sqrt(6 / (8 * 9 + 8 * 9))
    assert conv.abs().max() <= bound and conv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    model.train()  # the bypasses' dropout follows train(); the pretrained modules stay in eval
    assert all(b.dropout.training for b in model.bypasses()) and not model.backbone.blocks[0].attn.training


def test_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="convpass needs a fixed patch grid .* dynamic_img_size=True"):
        create_method("convpass", make_tiny_vit(dynamic_img_size=True), num_classes=3)
    with pytest.raises(ValueError, match=r"convpass needs timm's plain Block; blocks\[0\] is ResPostBlock"):
        create_method("convpass", make_tiny_vit(block_fn=ResPostBlock), num_classes=3)
    bypass = create_method("convpass", make_tiny_vit(), num_classes=3).bypasses()[0]
    with pytest.raises(ValueError, match=r"expects 1 prefix tokens \+ a 4x4 patch grid \(17 tokens\), got 20"):
        bypass(torch.randn(1, 20, 32))


@pytest.mark.parametrize(("options", "message"), [
    ({"dim": 0}, "convpass dim must be an integer >= 1, got 0."),
    ({"scale": -1.0}, "convpass scale must be a number > 0, got -1.0."),
    ({"scale": float("inf")}, "convpass scale must be a number > 0, got inf."),
    ({"xavier_init": 1}, "convpass xavier_init must be true or false, got 1."),
])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(ValueError) as err:
        create_method("convpass", make_tiny_vit(), num_classes=3, **options)
    assert str(err.value) == message
