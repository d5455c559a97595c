"""AdaptFormer against a block written out here: x' = x + attn(norm1(x)); x = x' + mlp(norm2(x')) +
0.1 * up(relu(down(x'))) — the branch reads x' before norm2 (the official code's ffn_adapter_layernorm_option "none");
bottleneck 64, `down` Kaiming-uniform with a zero bias, `up` zero; the ViT-B/16 count of the issue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import assert_identity_at_init, assert_trains_exactly
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def test_vit_b_count_is_the_issues():
    per_block = D * 64 + 64 + 64 * D + D  # down (D -> 64) and up (64 -> D), both with bias
    assert vit_b_tuned("adaptformer") == DEPTH * per_block + HEAD == 1_343_432
    assert vit_b_tuned("adaptformer", bottleneck=8) == DEPTH * (D * 8 + 8 + 8 * D + D) + HEAD


def test_starts_as_the_pretrained_function(tiny_batch):
    assert_identity_at_init("adaptformer", tiny_batch[0])


def test_every_added_tensor_learns_and_the_backbone_stays(tiny_batch):
    torch.manual_seed(0)
    model = create_method("adaptformer", make_tiny_vit(), num_classes=3)
    added = {f"backbone.blocks.{i}.adaptmlp.{proj}.{t}" for i in range(2) for proj in ("down_proj", "up_proj")
             for t in ("weight", "bias")}
    assert_trains_exactly(model, tiny_batch, added)


def reference_logits(model, images: torch.Tensor, scale: float) -> torch.Tensor:
    backbone = model.backbone
    x = embed(backbone, images)
    for block in backbone.blocks:
        x = x + block.attn(block.norm1(x))
        a = block.adaptmlp
        branch = F.linear(F.relu(F.linear(x, a.down_proj.weight, a.down_proj.bias)), a.up_proj.weight, a.up_proj.bias)
        x = x + block.mlp(block.norm2(x)) + scale * branch  # the branch reads x, not norm2(x)
    return backbone.head(backbone.norm(x)[:, 0])


@pytest.mark.parametrize(("options", "scale"), [({}, 0.1), ({"scale": 2.5}, 2.5)])
def test_branch_reads_the_residual_stream_beside_the_mlp(options, scale):
    torch.manual_seed(0)
    model = create_method("adaptformer", make_tiny_vit(), num_classes=3, bottleneck=5, **options).eval()
    with torch.no_grad():
        for a in model.adapters():  # a trained branch: `up` and the biases away from zero
            for p in (a.down_proj.bias, a.up_proj.weight, a.up_proj.bias):
                p.normal_(std=0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_logits(model, images, scale)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(reference_logits(model, images, 0.0), expected, atol=1e-3)  # the branch matters


def test_init_bottleneck_and_dropout():
    """Kaiming-uniform (a = sqrt(5)): uniform(-1/sqrt(D), 1/sqrt(D)); zero biases and zero `up`; dropout 0.1 acts in
    training only, on the bottleneck."""
    torch.manual_seed(0)
    model = create_method("adaptformer", make_tiny_vit(depth=4), num_classes=3, bottleneck=32)
    bound = 1 / math.sqrt(32)
    down = torch.cat([a.down_proj.weight.detach().flatten() for a in model.adapters()])
    assert down.abs().max() <= bound and down.max() > 0.99 * bound and down.min() < -0.99 * bound
    assert down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for a in model.adapters():
        assert (a.down_proj.in_features, a.down_proj.out_features, a.up_proj.out_features) == (32, 32, 32)
        assert not any(t.abs().sum() for t in (a.down_proj.bias, a.up_proj.weight, a.up_proj.bias))
        assert a.dropout.p == 0.1
    model.train()
    assert all(a.training for a in model.adapters()) and not model.backbone.blocks[0].mlp.training
    a = model.adapters()[0]
    with torch.no_grad():
        a.up_proj.weight.fill_(1.0)
        x = torch.randn(2, 17, 32)
        assert not torch.equal(a(x), a(x))  # dropout draws a new mask
        a.eval()
        assert torch.equal(a(x), a(x))


@pytest.mark.parametrize(("options", "message"), [
    ({"bottleneck": 0}, "adaptformer bottleneck must be an integer >= 1, got 0."),
    ({"bottleneck": 2.5}, "adaptformer bottleneck must be an integer >= 1, got 2.5."),
    ({"scale": 0}, "adaptformer scale must be a number > 0, got 0."),
    ({"scale": "big"}, "adaptformer scale must be a number > 0, got 'big'."),
])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(ValueError) as err:
        create_method("adaptformer", make_tiny_vit(), num_classes=3, **options)
    assert str(err.value) == message


def test_refuses_blocks_it_does_not_mirror():
    with pytest.raises(ValueError, match=r"adaptformer needs timm's plain Block; blocks\[0\] is ResPostBlock"):
        create_method("adaptformer", make_tiny_vit(block_fn=ResPostBlock), num_classes=3)
