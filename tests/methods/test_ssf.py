"""SSF against a forward written out here: gamma * y + beta after the patch projection, norm1, qkv, proj, norm2, fc1,
fc2 of every block and the final norm (github:dongzelian/SSF, models/vision_transformer.py); the official init
N(1, 0.02) / N(0, 0.02); only gamma, beta and the head train; folded evaluation equals the unfolded one under a
Trainer and never writes the pretrained weights."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from methods import create_method
from methods.ssf import ScaleShift, SSFTuning
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import train_steps

D, C, DEPTH = 768, 200, 12
HEAD = D * C + C
# gamma and beta (2 x) per channel: patch projection D; per block norm1 D, qkv 3D, proj D, norm2 D, fc1 4D, fc2 D;
# final norm D. Issue 16: 359,624.
SSF_VIT_B = 2 * (D + DEPTH * (D + 3 * D + D + D + 4 * D + D) + D) + HEAD
SITES = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


def test_vit_b_count(vit_b):
    model = create_method("ssf", vit_b, num_classes=C)
    assert model.tuned_params == SSF_VIT_B == 359_624
    assert model.total_params == 85_952_456 + SSF_VIT_B - HEAD  # the pretrained ViT-B/16 + gamma and beta


def test_wraps_the_official_sites_and_trains_only_gamma_beta_and_the_head(tiny_batch):
    torch.manual_seed(0)
    model = create_method("ssf", make_tiny_vit(), num_classes=3)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, ScaleShift)}
    assert wrapped == {"backbone.patch_embed.proj", "backbone.norm"} | {f"backbone.blocks.{i}.{s}" for i in range(2)
                                                                        for s in SITES}
    expected = {f"{w}.ssf_{p}" for w in wrapped for p in ("scale", "shift")} | {"backbone.head.weight",
                                                                                 "backbone.head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_batch)
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == expected


def test_keeps_the_backbones_state_dict_keys():
    plain = make_tiny_vit()
    model = create_method("ssf", make_tiny_vit(), num_classes=3)
    keys = set(model.backbone.state_dict())
    assert set(plain.state_dict()) <= keys
    assert keys - set(plain.state_dict()) == {k for k in keys if ".ssf_" in k}


def affine(y, layer, channel_dim_last=True):
    scale, shift = layer.ssf_scale, layer.ssf_shift
    if not channel_dim_last:
        scale, shift = scale.view(-1, 1, 1), shift.view(-1, 1, 1)
    return y * scale + shift


def layer_norm(x, layer):
    return affine(F.layer_norm(x, (x.shape[-1],), layer.weight, layer.bias, 1e-6), layer)


def linear(x, layer):
    return affine(F.linear(x, layer.weight, layer.bias), layer)


def reference_ssf_logits(model, images):
    """The official SSF forward (ssf_ada after each site), written with plain torch ops and the tiny ViT's 2 heads."""
    backbone = model.backbone
    pe = backbone.patch_embed.proj
    x = affine(F.conv2d(images, pe.weight, pe.bias, stride=8), pe, channel_dim_last=False).flatten(2).transpose(1, 2)
    x = torch.cat([backbone.cls_token.expand(len(x), -1, -1), x], dim=1) + backbone.pos_embed
    for block in backbone.blocks:
        attn = block.attn
        h = layer_norm(x, block.norm1)
        qkv = linear(h, attn.qkv).reshape(len(x), -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(16)).softmax(-1) @ v
        x = x + linear(a.transpose(1, 2).reshape(len(x), -1, 32), attn.proj)
        h = layer_norm(x, block.norm2)
        x = x + linear(F.gelu(linear(h, block.mlp.fc1)), block.mlp.fc2)
    return backbone.head(layer_norm(x, backbone.norm)[:, 0])


def perturb(model, std=0.5):
    """A trained SSF: gamma and beta far from their init, so every site shows in the logits."""
    with torch.no_grad():
        for layer in model.ssf_layers():
            layer.ssf_scale.normal_(1.0, std)
            layer.ssf_shift.normal_(0.0, std)


def test_placement_matches_the_official_forward():
    torch.manual_seed(0)
    model = create_method("ssf", make_tiny_vit(), num_classes=3).eval()
    perturb(model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_ssf_logits(model, images)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        for layer in model.ssf_layers():  # and every site matters at this tolerance
            saved = layer.ssf_shift.clone()
            layer.ssf_shift.zero_()
            assert not torch.allclose(model(images), expected, atol=1e-4), layer
            layer.ssf_shift.copy_(saved)


def test_init_is_the_official_normal_and_not_the_identity(tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit(depth=6)
    plain = copy.deepcopy(backbone).eval()
    model = create_method("ssf", backbone, num_classes=3).eval()
    scale = torch.cat([m.ssf_scale.detach() for m in model.ssf_layers()])  # 2 + 6 * 11 channel blocks of 32
    shift = torch.cat([m.ssf_shift.detach() for m in model.ssf_layers()])
    assert scale.numel() == 32 * (2 + 6 * 11)
    assert scale.mean().item() == pytest.approx(1.0, abs=0.003) and scale.std().item() == pytest.approx(0.02, rel=0.1)
    assert shift.mean().item() == pytest.approx(0.0, abs=0.003) and shift.std().item() == pytest.approx(0.02, rel=0.1)
    assert not SSFTuning.identity_at_init
    images = tiny_batch[0]
    assert not torch.allclose(model.backbone.forward_features(images), plain.forward_features(images), atol=1e-3)
    exact = create_method("ssf", copy.deepcopy(plain), num_classes=3, init_std=0.0).eval()
    torch.testing.assert_close(exact.backbone.forward_features(images), plain.forward_features(images), rtol=0,
                               atol=1e-6)


def test_folded_weights_are_diag_gamma_w_and_gamma_b_plus_beta_in_copies():
    torch.manual_seed(0)
    model = create_method("ssf", make_tiny_vit(), num_classes=3).eval()
    perturb(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.merge_layers()
    qkv = model.backbone.blocks[0].attn.qkv
    weight, bias = qkv.merged
    torch.testing.assert_close(weight, qkv.ssf_scale[:, None] * qkv.weight)
    torch.testing.assert_close(bias, qkv.ssf_scale * qkv.bias + qkv.ssf_shift)
    conv = model.backbone.patch_embed.proj
    torch.testing.assert_close(conv.merged[0], conv.ssf_scale[:, None, None, None] * conv.weight)
    norm = model.backbone.norm
    torch.testing.assert_close(norm.merged[0], norm.ssf_scale * norm.weight)
    torch.testing.assert_close(norm.merged[1], norm.ssf_scale * norm.bias + norm.ssf_shift)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    model.train()
    assert all(layer.merged is None for layer in model.ssf_layers())  # training never reads a stale fold


def test_fold_without_a_bias():
    torch.manual_seed(0)
    model = create_method("ssf", make_tiny_vit(qkv_bias=False), num_classes=3).eval()
    perturb(model)
    x = torch.randn(2, 17, 32)
    qkv = model.backbone.blocks[0].attn.qkv
    with torch.no_grad():
        expected = (x @ qkv.weight.T) * qkv.ssf_scale + qkv.ssf_shift
        torch.testing.assert_close(qkv(x), expected, rtol=0, atol=1e-5)
        qkv.merge()
        torch.testing.assert_close(qkv(x), expected, rtol=0, atol=1e-5)


def test_merges_only_during_evaluation_when_fitting(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    model = create_method("ssf", make_tiny_vit(), num_classes=3)
    states = {"train": set(), "val": set()}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            states["train"].add(all(m.merged is not None for m in module.ssf_layers()))

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            states["val"].add(all(m.merged is not None for m in module.ssf_layers()))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert states == {"train": {False}, "val": {True}}


@pytest.mark.parametrize(("options", "message"), [
    ({"init_std": -0.1}, r"init_std must be a number in \[0, 1\] \(official: 0.02\), got -0.1"),
    ({"init_std": "small"}, r"init_std must be a number in \[0, 1\]"),
    ({"init_std": float("nan")}, r"init_std must be a number in \[0, 1\]"),
    ({"merge_for_eval": "yes"}, "merge_for_eval must be true or false, got 'yes'"),
    ({"rank": 1}, "has no option"),
])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("ssf", make_tiny_vit(), num_classes=3, **options)


def test_a_mean_pooled_backbone_scales_after_its_fc_norm_and_one_without_a_final_norm_is_refused(tiny_batch):
    model = create_method("ssf", make_tiny_vit(global_pool="avg", fc_norm=True), num_classes=3)
    backbone = model.backbone
    assert isinstance(backbone.norm, torch.nn.Identity) and type(backbone.fc_norm).__name__ == "ScaleShift"
    with torch.no_grad():  # the head reads gamma * fc_norm(mean of the patch tokens) + beta
        tokens = backbone.forward_features(tiny_batch[0])
        pooled = tokens[:, backbone.num_prefix_tokens:].mean(1)
        layer = backbone.fc_norm
        expected = torch.nn.functional.layer_norm(pooled, (32,), layer.weight, layer.bias, layer.eps)
        expected = expected * layer.ssf_scale + layer.ssf_shift
        torch.testing.assert_close(backbone.forward_head(tokens, pre_logits=True), expected)
    bare = make_tiny_vit(global_pool="avg", fc_norm=True)
    bare.fc_norm = torch.nn.Identity()  # no norm after the blocks at all
    with pytest.raises(ValueError, match="SSF needs a final LayerNorm"):
        create_method("ssf", bare, num_classes=3)
