"""RepAdapter against a block written out here: x = x + attn(A1(norm1(x))); x = x + mlp(A2(norm2(x))), with
A(h) = h + s * up(down(h)) and `up` group-wise (output group g reads hidden group g only, written out per group);
folded into qkv / fc1 for evaluation with the same outputs, under a real Trainer, and the pretrained weights
bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import assert_identity_at_init, assert_trains_exactly
from tests.helpers.vit import DEPTH, HEAD, D, embed, rep_adapter, vit_b_tuned


def repadapter_count(hidden: int = 8, groups: int = 2) -> int:
    """ViT-B/16, 200 classes; the official default (train.py --dim 8, RepAdapter(groups=2), method repblock: two
    adapters per block): down D -> hidden with bias, up hidden -> D in `groups` groups (D * hidden / groups), bias."""
    per_adapter = (D * hidden + hidden) + (D * hidden // groups + D)
    return DEPTH * 2 * per_adapter + HEAD


def test_vit_b_count_follows_the_formula():
    assert vit_b_tuned("repadapter") == repadapter_count() == 393_608
    assert vit_b_tuned("repadapter", hidden_dim=16, groups=4) == repadapter_count(16, 4)


def test_starts_as_the_pretrained_function(tiny_batch):
    assert_identity_at_init("repadapter", tiny_batch[0])


def test_every_added_tensor_learns_and_the_backbone_stays(tiny_batch):
    torch.manual_seed(0)
    model = create_method("repadapter", make_tiny_vit(), num_classes=3)
    added = {f"backbone.blocks.{i}.adapter_{where}.{proj}.{t}" for i in range(2) for where in ("attn", "mlp")
             for proj in ("down", "up") for t in ("weight", "bias")}
    assert_trains_exactly(model, tiny_batch, added)
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.fc1.bias"} <= set(model.state_dict())


def attention(attn, h: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention from qkv's and proj's own weights (the layers read through the adapters)."""
    batch, tokens, dim = h.shape
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim)
    a = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    return F.linear(a.transpose(1, 2).reshape(batch, tokens, dim), attn.proj.weight, attn.proj.bias)


def mlp(m, h: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(h, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)


def reference_logits(model, images: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    backbone = model.backbone
    x = embed(backbone, images)
    for block in backbone.blocks:
        x = x + attention(block.attn, rep_adapter(block.adapter_attn, block.norm1(x), scale, groups))
        x = x + mlp(block.mlp, rep_adapter(block.adapter_mlp, block.norm2(x), scale, groups))
    return backbone.head(backbone.norm(x)[:, 0])


def trained(model):
    with torch.no_grad():
        for a in model.adapters():  # trained adapters: `up` and the biases away from zero
            for p in (a.down.bias, a.up.weight, a.up.bias):
                p.normal_(std=0.5)
    return model


@pytest.mark.parametrize(("options", "scale", "groups"), [({}, 1.0, 2), ({"scale": 0.4, "groups": 4}, 0.4, 4)])
@pytest.mark.parametrize("vit", [{}, {"qkv_bias": False}])
def test_adapters_sit_before_qkv_and_fc1_and_fold_exactly(vit, options, scale, groups):
    torch.manual_seed(0)
    model = trained(create_method("repadapter", make_tiny_vit(**vit), num_classes=3, **options)).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        expected = reference_logits(model, images, scale, groups)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(reference_logits(model, images, 0.0, groups), expected, atol=1e-3)  # they matter
        model.merge_layers()
        assert all(block.merged for block in model.backbone.blocks)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        model.unmerge_layers()
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # never written


def test_folded_weights_by_hand():
    """qkv(A(h)) = M (h + s (U (W h + a) + b)) + c  =>  M' = M + s M U W, c' = c + s M (U a + b), U dense."""
    torch.manual_seed(0)
    model = trained(create_method("repadapter", make_tiny_vit(), num_classes=3, scale=0.7)).eval()
    block = model.backbone.blocks[0]
    a, qkv = block.adapter_attn, block.attn.qkv
    dense_up = torch.zeros(32, 8)
    dense_up[:16, :4], dense_up[16:, 4:] = a.up.weight[:16], a.up.weight[16:]  # groups=2: (32 / 2) x (8 / 2) blocks
    model.merge_layers()
    weight, bias = qkv.folded
    with torch.no_grad():
        torch.testing.assert_close(weight, qkv.weight + 0.7 * qkv.weight @ dense_up @ a.down.weight)
        torch.testing.assert_close(bias, qkv.bias + 0.7 * qkv.weight @ (dense_up @ a.down.bias + a.up.bias))
    model.train()  # training resumes unmerged
    assert not any(b.merged for b in model.backbone.blocks)


def test_init_and_dropout():
    """down Xavier-uniform (bound sqrt(6 / (D + hidden))) with a zero bias; up zero; dropout 0.1 in training only."""
    torch.manual_seed(0)
    model = create_method("repadapter", make_tiny_vit(depth=4), num_classes=3, hidden_dim=32, groups=4)
    down = torch.cat([a.down.weight.detach().flatten() for a in model.adapters()])
    bound = math.sqrt(6 / (32 + 32))
    assert down.abs().max() <= bound and down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for a in model.adapters():
        assert a.up.weight.shape == (32, 32 // 4) and a.dropout.p == 0.1
        assert not any(t.abs().sum() for t in (a.down.bias, a.up.weight, a.up.bias))
    a = trained(model).adapters()[0].train()
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        assert not torch.equal(a(h), a(h))
        a.eval()
        assert torch.equal(a(h), a(h))


@pytest.mark.parametrize(("options", "message"), [
    ({"hidden_dim": 0}, "repadapter hidden_dim must be an integer >= 1, got 0."),
    ({"groups": 3}, "repadapter groups must be an integer >= 1 dividing hidden_dim=8, got 3."),
    ({"groups": 0}, "repadapter groups must be an integer >= 1 (dividing hidden_dim), got 0."),
    ({"scale": 0.0}, "repadapter scale must be a number > 0, got 0.0."),
    ({"merge_for_eval": "no"}, "repadapter merge_for_eval must be true or false, got 'no'."),
    ({"hidden_dim": 6, "groups": 3}, "repadapter groups=3 must divide the embedding width 32."),
])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(ValueError) as err:
        create_method("repadapter", make_tiny_vit(), num_classes=3, **options)
    assert str(err.value) == message


def test_refuses_blocks_it_does_not_mirror():
    with pytest.raises(ValueError, match=r"repadapter needs timm's plain Block; blocks\[0\] is ResPostBlock"):
        create_method("repadapter", make_tiny_vit(block_fn=ResPostBlock), num_classes=3)
