"""DiffFit as PETL_Vision runs it on a ViT (github:OSU-MLB/PETL_Vision, model/block.py and experiment/build_model.py):
every bias and LayerNorm, the head, and per block gamma1 / gamma2 (init 1) scaling the attention and MLP branch
outputs before their residual adds; checked against a block written out here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import train_steps
from tests.helpers.vit import embed

D, C, DEPTH = 768, 200, 12
HEAD = D * C + C
# Biases: patch projection D; per block norm1 D, qkv 3D, proj D, norm2 D, fc1 4D, fc2 D; final norm D.
BIASES = D + DEPTH * (D + 3 * D + D + D + 4 * D + D) + D
NORM_WEIGHTS = (2 * DEPTH + 1) * D  # norm1, norm2 per block and the final norm
GAMMAS = DEPTH * 2 * D  # gamma1, gamma2 per block (PETL_Vision: torch.ones(dim) each)
DIFFFIT_VIT_B = BIASES + NORM_WEIGHTS + GAMMAS + HEAD


def test_vit_b_count(vit_b):
    model = create_method("difffit", vit_b, num_classes=C)
    assert model.tuned_params == DIFFFIT_VIT_B == 294_344
    assert model.total_params == 85_952_456 + GAMMAS


def expected_trained(depth: int) -> set[str]:
    names = {"backbone.patch_embed.proj.bias", "backbone.norm.weight", "backbone.norm.bias", "backbone.head.weight",
             "backbone.head.bias"}
    for i in range(depth):
        block = f"backbone.blocks.{i}"
        names |= {f"{block}.{n}.{wb}" for n in ("norm1", "norm2") for wb in ("weight", "bias")}
        names |= {f"{block}.{m}.bias" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
        names |= {f"{block}.ls1.difffit_gamma", f"{block}.ls2.difffit_gamma"}
    return names


def test_trains_biases_norms_gammas_and_the_head(tiny_batch):
    torch.manual_seed(0)
    model = create_method("difffit", make_tiny_vit(), num_classes=3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trained(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_batch)
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == expected_trained(2)


def test_starts_as_the_pretrained_function_with_unit_gammas(tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    plain = copy.deepcopy(backbone).eval()
    model = create_method("difffit", backbone, num_classes=3).eval()
    assert all(torch.equal(s.difffit_gamma, torch.ones(32)) for s in model.branch_scales())
    assert set(plain.state_dict()) - {"head.weight", "head.bias"} <= set(model.backbone.state_dict())
    torch.testing.assert_close(model.backbone.forward_features(tiny_batch[0]), plain.forward_features(tiny_batch[0]),
                               rtol=0, atol=0)


def reference_difffit_logits(model, images):
    backbone = model.backbone
    x = embed(backbone, images)
    for block in backbone.blocks:
        a = block.norm1(x)
        qkv = F.linear(a, block.attn.qkv.weight, block.attn.qkv.bias).reshape(len(x), -1, 3, 2, 16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = (((q @ k.transpose(-2, -1)) / math.sqrt(16)).softmax(-1) @ v).transpose(1, 2).reshape(len(x), -1, 32)
        x = x + block.ls1.difffit_gamma * F.linear(a, block.attn.proj.weight, block.attn.proj.bias)
        m = block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))
        x = x + block.ls2.difffit_gamma * m
    return backbone.head(backbone.norm(x)[:, 0])


def test_gammas_scale_the_attention_and_mlp_branches():
    torch.manual_seed(0)
    model = create_method("difffit", make_tiny_vit(), num_classes=3).eval()
    with torch.no_grad():
        for scale in model.branch_scales():  # trained gammas, away from 1
            scale.difffit_gamma.normal_(1.0, 0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_difffit_logits(model, images)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        for scale in model.branch_scales():  # each gamma matters at this tolerance
            saved = scale.difffit_gamma.clone()
            scale.difffit_gamma.fill_(1.0)
            assert not torch.allclose(model(images), expected, atol=1e-4)
            scale.difffit_gamma.copy_(saved)


def test_a_pretrained_layerscale_stays_frozen_and_applies_before_gamma(tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit(init_values=0.1)
    plain = copy.deepcopy(backbone).eval()
    model = create_method("difffit", backbone, num_classes=3).eval()
    assert "blocks.0.ls1.gamma" in model.backbone.state_dict()  # LayerScale's own key kept
    assert not model.backbone.blocks[0].ls1.gamma.requires_grad
    torch.testing.assert_close(model.backbone.forward_features(tiny_batch[0]), plain.forward_features(tiny_batch[0]),
                               rtol=0, atol=1e-6)


def test_an_unknown_branch_scale_is_refused():
    backbone = make_tiny_vit()
    backbone.blocks[0].ls1 = torch.nn.Dropout(0.1)
    with pytest.raises(ValueError, match="after its LayerScale or Identity, got Dropout"):
        create_method("difffit", backbone, num_classes=3)
    with pytest.raises(ValueError, match="has no option"):
        create_method("difffit", make_tiny_vit(), num_classes=3, scale=1.0)
