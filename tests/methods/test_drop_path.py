"""The frozen backbone's drop-path (`drop_path=`) of Convpass, FacT and RepAdapter, whose official training scripts
build the ViT with timm's drop_path_rate=0.1: per block the rate rises linearly from 0 to the option (timm's rule), in
train mode each residual branch (a Convpass bypass its own) is dropped per sample and the kept ones scaled by
1 / (1 - rate), written out here with the same seeded draws; in eval mode and with the default 0 nothing changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmark.core.config import RunConfig
from methods import create_method
from tests.helpers.models import make_tiny, make_tiny_vit

METHODS = ["convpass", "fact_tt", "fact_tk", "repadapter"]
SWIN_METHODS = ["convpass", "repadapter"]  # FacT is ViT only


def build(method: str, backbone, **options):
    torch.manual_seed(0)
    model = create_method(method, backbone, num_classes=3, **options)
    with torch.no_grad():  # trained adapters: zero-init up projections would hide a dropped bypass
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


def train_without_dropout(model):
    """Train mode, with every nn.Dropout (the adapters' own) off: drop-paths are then the only random draws."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


@pytest.mark.parametrize(("method", "family"), [(m, "vit") for m in METHODS] + [(m, "swin") for m in SWIN_METHODS])
def test_rates_rise_linearly_to_the_option_and_train_with_the_method(method, family):
    backbone = make_tiny_vit(depth=3) if family == "vit" else make_tiny(family)  # 3 blocks; the Swin 2 + 2
    model = build(method, backbone, drop_path=0.3)
    blocks = model.family.blocks(model.backbone)
    n = len(blocks)
    expected = [0.3 * i / (n - 1) for i in range(n)]  # timm: linspace(0, drop_path_rate, depth)
    for block, rate in zip(blocks, expected, strict=True):
        for module in (block.drop_path1, block.drop_path2):
            if rate == 0:
                assert isinstance(module, nn.Identity)
            else:
                assert module.drop_prob == pytest.approx(rate)
    assert blocks[-1].drop_path1 is not blocks[-1].drop_path2  # one module per branch, as timm builds them
    model.train()
    assert blocks[-1].drop_path1.training and not blocks[-1].attn.training  # new: trains; pretrained: stays eval


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_drops_each_branch_per_sample_and_scales_the_kept(method):
    model = train_without_dropout(build(method, make_tiny_vit(), drop_path=0.5))  # block 1 of 2: rate 0.5
    block, keep, batch = model.backbone.blocks[1], 0.5, 16
    x = torch.randn(batch, 17, 32)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)  # timm's draw, one per drop-path call: x.new_empty((B, 1, 1)).bernoulli_(keep) / keep
    calls = 4 if method == "convpass" else 2  # Convpass: attention, its bypass, MLP, its bypass (the code's order)
    masks = [torch.empty(batch, 1, 1).bernoulli_(keep) / keep for _ in range(calls)]
    assert all(0 < (m > 0).sum() < batch for m in masks)  # this seed drops some samples and keeps others
    with torch.no_grad():
        h = block.norm1(x)
        if method == "convpass":  # x + attn(h) + s bypass(h), each term its own mask; the same for the MLP
            x1 = x + masks[0] * block.attn(h) + masks[1] * block.s * block.adapter_attn(h)
            h = block.norm2(x1)
            expected = x1 + masks[2] * block.mlp(h) + masks[3] * block.s * block.adapter_mlp(h)
        else:  # the adapted attention and MLP (their updates inside) are one branch each
            x1 = x + masks[0] * block.attn(h)
            expected = x1 + masks[1] * block.mlp(block.norm2(x1))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_eval_mode_and_the_default_leave_the_forward_unchanged(method, tiny_batch):
    images = tiny_batch[0]
    dropped = build(method, make_tiny_vit(), drop_path=0.5)
    backbone = make_tiny_vit()
    identities = [(b.drop_path1, b.drop_path2) for b in backbone.blocks]
    plain = build(method, backbone)  # the default: 0
    plain.load_state_dict(dropped.state_dict())  # drop-path adds no tensors: the same keys
    assert [(b.drop_path1, b.drop_path2) for b in plain.backbone.blocks] == identities  # timm's own, untouched
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(images), plain.eval()(images), rtol=0, atol=0)
        torch.testing.assert_close(train_without_dropout(plain)(images), plain.eval()(images), rtol=0, atol=0)
        before = copy.deepcopy(dropped.state_dict())
        train_without_dropout(dropped)(images)
        assert all(torch.equal(v, before[k]) for k, v in dropped.state_dict().items())  # a draw, no state


def test_the_paper_recipe_sets_the_official_rate_and_the_quick_one_none():
    for method in METHODS:
        assert RunConfig(method=method, dataset="cub").resolved().method_options.get("drop_path") == 0.1
        assert "drop_path" not in RunConfig(method=method, dataset="digits").resolved().method_options


def test_a_family_without_drop_paths_is_refused():
    from backbones import FAMILIES

    with pytest.raises(ValueError, match="names no drop-path modules; drop_path must be 0"):
        FAMILIES["convnet"].set_drop_path(make_tiny("convnet"), 0.1)
