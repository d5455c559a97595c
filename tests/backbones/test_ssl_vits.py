"""Self-supervised and CLIP ViTs (backbones/ssl_vits.py) on random-init geometries: each checkpoint's architecture
kwargs as timm configures it, at tiny widths and depths. What the head reads (MAE: mean of the patch tokens,
fc_norm; MoCo v3, DINOv2, CLIP: CLS after norm), each one's mean/std as the datamodule gets it, MoCo v3's key
mapping on a fake official checkpoint, MAE's norm -> fc_norm, DINOv2 at 224 px with registers and the VPT layout,
CLIP's norm_pre. Every expected value is written here from the formulas, never from the code under test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from timm.layers import resample_abs_pos_embed
from torch import nn

from backbones import create_backbone, data_config
from benchmark.core.config import RunConfig
from benchmark.core.validate import check_backbone_name, planned_data_config
from benchmark.run import config_from_args
from datamodules.files import fgvc_transform
from methods import create_method, get_method_class, list_methods
from tests.helpers.models import TINY_VIT, tiny_options

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
DINO = dict(embed_dim=32, depth=2, num_heads=2)  # patch 14 and the registers kept: only the width and depth shrink
# name, tiny kwargs, what the head reads (pool, the norm before the head), whether norm_pre is a LayerNorm, mean/std
GEOMETRIES = {
    "mae": ("vit_base_patch16_224.mae", TINY_VIT, ("avg", "fc_norm"), False, IMAGENET),
    "mocov3": ("vit_base_patch16_224.mocov3", TINY_VIT, ("token", "norm"), False, IMAGENET),
    "dinov2": ("vit_base_patch14_dinov2.lvd142m", {**DINO, "img_size": 224}, ("token", "norm"), False, IMAGENET),
    "dinov2-reg4": ("vit_base_patch14_reg4_dinov2.lvd142m", {**DINO, "img_size": 224}, ("token", "norm"), False,
                    IMAGENET),
    "clip": ("vit_base_patch16_clip_224.openai", TINY_VIT, ("token", "norm"), True, OPENAI_CLIP),
}


def build(kind: str, **overrides):
    name, kwargs, *_ = GEOMETRIES[kind]
    torch.manual_seed(0)
    return create_backbone(name, pretrained=False, **{**kwargs, **overrides})


def images_for(backbone, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *backbone.patch_embed.img_size, generator=torch.Generator().manual_seed(1))


def layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def embed(backbone, images: torch.Tensor) -> torch.Tensor:
    """[CLS, registers, patches] + position embedding (on the patches only where timm's no_embed_class)."""
    x = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    prefix = [t.expand(len(images), -1, -1) for t in (backbone.cls_token, backbone.reg_token) if t is not None]
    if backbone.no_embed_class:
        return torch.cat([*prefix, x + backbone.pos_embed], dim=1)
    return torch.cat([*prefix, x], dim=1) + backbone.pos_embed


def reference_logits(backbone, images: torch.Tensor, pool: str, head_norm: str, pre_norm: bool) -> torch.Tensor:
    """The plain forward with the head input the checkpoint was trained for, written out."""
    x = embed(backbone, images)
    if pre_norm:  # CLIP's ln_pre over the whole sequence, before the first block
        x = layer_norm(backbone.norm_pre, x)
    for block in backbone.blocks:
        x = block(x)
    prefix = backbone.num_prefix_tokens
    if head_norm == "fc_norm":  # MAE: mean of the patch tokens (CLS and registers out), then fc_norm
        pooled = layer_norm(backbone.fc_norm, x[:, prefix:].mean(dim=1))
    else:  # CLS after the final norm
        pooled = layer_norm(backbone.norm, x)[:, 0]
    return backbone.head(pooled)


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_the_head_reads_what_the_checkpoint_was_trained_for(kind):
    _, _, (pool, head_norm), pre_norm, _ = GEOMETRIES[kind]
    model = create_method("linear", build(kind), num_classes=3).eval()
    backbone = model.backbone
    assert backbone.global_pool == pool
    unused = backbone.norm if head_norm == "fc_norm" else backbone.fc_norm
    assert isinstance(unused, nn.Identity)  # the other norm is not applied on the way to the head
    assert isinstance(backbone.norm_pre, nn.LayerNorm) == pre_norm
    images = images_for(backbone)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_logits(backbone, images, pool, head_norm, pre_norm),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_each_checkpoint_normalises_with_its_own_mean_and_std_in_the_datamodule(kind, tmp_path):
    name, kwargs, *_, (mean, std) = GEOMETRIES[kind]
    backbone_kwargs = {"img_size": 224} if "dinov2" in kind else {}
    cfg = RunConfig(backbone=name, dataset="cub", data_root=str(tmp_path), backbone_kwargs=backbone_kwargs)
    planned = planned_data_config(cfg.resolved())  # what the pipeline hands the datamodule
    assert planned["mean"] == pytest.approx(mean) and planned["std"] == pytest.approx(std)
    assert planned["input_size"] == (3, 224, 224)  # DINOv2: timm's 518 px config, built for 224 px
    normalise = [t for t in fgvc_transform(planned, train=False).transforms if isinstance(t, T.Normalize)]
    assert normalise and normalise[0].mean == pytest.approx(list(mean)) and normalise[0].std == pytest.approx(list(std))
    assert data_config(build(kind))["mean"] == pytest.approx(mean)


def test_mocov3_uses_its_evaluation_transform():
    config = data_config(build("mocov3"))
    assert config["crop_pct"] == 0.875 and config["interpolation"] == "bilinear"  # Resize(256) + CenterCrop(224)


# --- MoCo v3 -------------------------------------------------------------------------------------------------
def sincos_reference(h: int, w: int, dim: int) -> torch.Tensor:
    """MoCo v3's fixed position embedding, one token at a time: token (row r, column c) of the row-major grid gets
    [sin(r * f_k), cos(r * f_k), sin(c * f_k), cos(c * f_k)] over f_k = 10000^(-k / (dim/4)); CLS a zero row."""
    quarter = dim // 4
    rows = [[0.0] * dim]
    for r in range(h):
        for c in range(w):
            freqs = [10000.0 ** (-k / quarter) for k in range(quarter)]
            rows.append([math.sin(r * f) for f in freqs] + [math.cos(r * f) for f in freqs]
                        + [math.sin(c * f) for f in freqs] + [math.cos(c * f) for f in freqs])
    return torch.tensor(rows)[None]


def test_mocov3_has_the_fixed_sincos_position_embedding_as_a_buffer():
    backbone = build("mocov3")
    assert "pos_embed" in dict(backbone.named_buffers()) and "pos_embed" not in dict(backbone.named_parameters())
    torch.testing.assert_close(backbone.pos_embed, sincos_reference(4, 4, 32), rtol=0, atol=1e-6)
    full = create_method("full", backbone, num_classes=3)  # even full fine-tuning leaves it fixed (MoCo's)
    assert "backbone.pos_embed" not in {n for n, p in full.named_parameters() if p.requires_grad}


def moco_checkpoint(tmp_path, linear_probe: bool = False):
    """A tiny ViT written as MoCo v3's official files: {'state_dict': {'module.base_encoder.<timm name>', the
    momentum encoder, the predictor, the projection MLP under head.}} (pretraining) or {'module.<timm name>',
    'module.head' the linear classifier} (main_lincls.py, what the VPT code loads)."""
    torch.manual_seed(3)
    source = create_backbone("vit_base_patch16_224", pretrained=False, **TINY_VIT)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # away from any init the loader could fall back to
        source.pos_embed.copy_(sincos_reference(4, 4, 32))
    encoder = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("head.")}
    if linear_probe:
        state = {f"module.{k}": v for k, v in encoder.items()}
        state |= {"module.head.weight": torch.randn(1000, 32), "module.head.bias": torch.randn(1000)}
    else:
        state = {f"module.base_encoder.{k}": v for k, v in encoder.items()}
        state |= {f"module.momentum_encoder.{k}": v + 1 for k, v in encoder.items()}
        state |= {"module.base_encoder.head.0.weight": torch.randn(64, 32), "module.base_encoder.head.1.weight":
                  torch.ones(64), "module.base_encoder.head.1.running_mean": torch.zeros(64),
                  "module.base_encoder.head.3.weight": torch.randn(16, 64),
                  "module.predictor.0.weight": torch.randn(64, 16)}
    path = tmp_path / ("linear-vit-b-300ep.pth.tar" if linear_probe else "vit-b-300ep.pth.tar")
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}}}, path)
    return path, encoder


@pytest.mark.parametrize("linear_probe", [False, True], ids=["pretraining file", "linear-probe file"])
def test_a_mocov3_checkpoint_loads_bit_identically(tmp_path, linear_probe):
    path, encoder = moco_checkpoint(tmp_path, linear_probe)
    backbone = create_backbone("vit_base_patch16_224.mocov3", weights=path, **TINY_VIT)
    loaded = backbone.state_dict()
    assert set(loaded) == set(encoder)  # built without a head (MoCo's is not a classifier): every tensor is MoCo's
    for key, value in encoder.items():
        assert torch.equal(loaded[key], value), key


def test_a_file_that_is_not_mocov3_is_refused_in_one_line(tmp_path):
    path = tmp_path / "timm.pth"
    torch.save(create_backbone("vit_base_patch16_224", **TINY_VIT).state_dict(), path)
    with pytest.raises(ValueError, match="is not a MoCo v3 checkpoint: no 'module.base_encoder.' keys") as err:
        create_backbone("vit_base_patch16_224.mocov3", weights=path, **TINY_VIT)
    assert "\n" not in str(err.value)


def test_mocov3_needs_a_local_file():
    with pytest.raises(ValueError, match="MoCo v3 weights are not on the timm hub; pass .*WEIGHTS="):
        create_backbone("vit_base_patch16_224.mocov3", pretrained=True)
    assert check_backbone_name("vit_base_patch16_224.mocov3", uses_hub=False) == []  # WEIGHTS given
    problems = check_backbone_name("vit_base_patch16_224.mocov3", uses_hub=True)  # refused before anything runs
    assert len(problems) == 1 and "MoCo v3 weights are not on the timm hub" in problems[0]


def test_mocov3_vit_small_has_mocos_twelve_heads():
    with torch.device("meta"):
        backbone = create_backbone("vit_small_patch16_224.mocov3", weight_init="skip")
    assert backbone.embed_dim == 384 and backbone.blocks[0].attn.num_heads == 12
    with pytest.raises(ValueError, match="MoCo v3 released ViTs for vit_base_patch16_224, vit_small_patch16_224"):
        create_backbone("vit_large_patch16_224.mocov3")


# --- MAE ------------------------------------------------------------------------------------------------------
def mae_checkpoint(tmp_path):
    """MAE's pretraining file: {'model': the encoder under timm names, its final `norm`, no fc_norm} plus the
    decoder and mask token of its visualisation checkpoints."""
    torch.manual_seed(4)
    source = create_backbone("vit_base_patch16_224", pretrained=False, **TINY_VIT)  # CLS + norm: MAE's encoder
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    encoder = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("head.")}
    state = {**encoder, "mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32)}
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": state}, path)
    return path, encoder


@pytest.mark.parametrize("source", ["WEIGHTS file", "timm's pretrained loader"])
def test_mae_weights_load_with_a_fresh_fc_norm_for_the_average_pool(tmp_path, source):
    path, encoder = mae_checkpoint(tmp_path)
    if source == "WEIGHTS file":
        backbone = create_backbone("vit_base_patch16_224.mae", weights=path, **TINY_VIT)
    else:  # the hub path, fed a local file through timm's own pretrained_cfg override
        backbone = create_backbone("vit_base_patch16_224.mae", pretrained=True,
                                   pretrained_cfg_overlay={"file": str(path)}, **TINY_VIT)
    loaded = backbone.state_dict()
    for key, value in encoder.items():
        if not key.startswith("norm."):
            assert torch.equal(loaded[key], value), key
    assert not any(k.startswith("norm.") for k in loaded)  # MAE's fine-tuning and the VPT code drop it ...
    assert torch.equal(loaded["fc_norm.weight"], torch.ones(32)) and torch.equal(loaded["fc_norm.bias"],
                                                                                 torch.zeros(32))  # ... fc_norm is new


def test_mae_with_cls_pooling_keeps_the_pretrained_norm(tmp_path):
    path, encoder = mae_checkpoint(tmp_path)
    backbone = create_backbone("vit_base_patch16_224.mae", weights=path, global_pool="token", **TINY_VIT)
    assert isinstance(backbone.fc_norm, nn.Identity)
    assert torch.equal(backbone.norm.weight, encoder["norm.weight"])


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_on_mae_strips_the_prompts_and_means_the_patches(deep):
    torch.manual_seed(0)
    model = create_method("vpt_deep" if deep else "vpt_shallow", build("mae"), num_classes=3, prompt_length=4,
                          prompt_dropout=0.0).eval()
    backbone, prompts = model.backbone, model.vpt_prompts
    with torch.no_grad():
        prompts.normal_()
    images = images_for(backbone)
    x = embed(backbone, images)
    for layer, block in enumerate(backbone.blocks):  # [CLS, prompts, patches]; deep: fresh prompts per block
        if layer == 0 or deep:
            rest = x[:, 1:] if layer == 0 else x[:, 1 + 4:]
            x = torch.cat([x[:, :1], prompts[layer].expand(len(x), -1, -1), rest], dim=1)
        x = block(x)
    expected = backbone.head(layer_norm(backbone.fc_norm, x[:, 1 + 4:].mean(dim=1)))  # the 16 patches only
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        assert model.forward_features(images).shape == (2, 1 + 16, 32)


# --- DINOv2 ---------------------------------------------------------------------------------------------------
def test_dinov2_with_registers_at_224_px_and_the_vpt_layout():
    backbone = build("dinov2-reg4")
    assert backbone.patch_embed.patch_size == (14, 14) and backbone.patch_embed.grid_size == (16, 16)
    assert backbone.num_prefix_tokens == 1 + 4 and backbone.pos_embed.shape == (1, 16 * 16, 32)  # patches only
    model = create_method("vpt_shallow", backbone, num_classes=3, prompt_length=3).eval()
    seen = {}
    handle = backbone.blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    images = images_for(backbone, 1)
    with torch.no_grad():
        model(images)
    handle.remove()
    patches = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2) + backbone.pos_embed
    expected = torch.cat([backbone.cls_token, backbone.reg_token, model.vpt_prompts[0][None], patches], dim=1)
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=1e-6)  # CLS, 4 registers, 3 prompts, 256 patches


def test_a_dinov2_checkpoint_loads_at_224_px_with_its_position_embedding_resampled(tmp_path):
    torch.manual_seed(5)
    source = create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False, **DINO)  # timm's 518 px: 37 x 37
    assert source.patch_embed.grid_size == (37, 37)
    timm_state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    first = torch.randn(1, 1, 32)  # DINOv2's own layout: a CLS position row, tokens named as facebookresearch's
    original = {k: v for k, v in timm_state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    original |= {"cls_token": timm_state["cls_token"] - first, "register_tokens": timm_state["reg_token"],
                 "pos_embed": torch.cat([first, timm_state["pos_embed"]], dim=1), "mask_token": torch.zeros(1, 32)}
    path = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    torch.save(original, path)
    backbone = create_backbone("vit_base_patch14_reg4_dinov2", weights=path, img_size=224, **DINO)
    torch.testing.assert_close(backbone.cls_token, timm_state["cls_token"], rtol=0, atol=1e-6)
    assert torch.equal(backbone.reg_token, timm_state["reg_token"])
    resampled = resample_abs_pos_embed(timm_state["pos_embed"], new_size=(16, 16), num_prefix_tokens=0)
    torch.testing.assert_close(backbone.pos_embed, resampled, rtol=0, atol=1e-6)


def test_backbone_args_reach_the_run_config_and_its_id():
    cfg = config_from_args(["--backbone", "vit_base_patch14_dinov2.lvd142m", "--backbone-args", "img_size=224"])
    assert cfg.backbone_kwargs == {"img_size": 224}
    assert "/vit_base_patch14_dinov2.lvd142m+img_size=224/" in cfg.resolved().run_id()
    with pytest.raises(SystemExit):
        config_from_args(["--backbone-args", "img_size"])


# --- CLIP -----------------------------------------------------------------------------------------------------
def test_vpt_on_clip_inserts_the_prompts_after_norm_pre():
    model = create_method("vpt_shallow", build("clip"), num_classes=3, prompt_length=2).eval()
    backbone, seen = model.backbone, {}
    handle = backbone.blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    images = images_for(backbone)
    with torch.no_grad():
        model(images)
    handle.remove()
    x = layer_norm(backbone.norm_pre, embed(backbone, images))  # ln_pre on [CLS, patches]; prompts added after it
    expected = torch.cat([x[:, :1], model.vpt_prompts[0].expand(2, -1, -1), x[:, 1:]], dim=1)
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=1e-6)


# --- every ViT method on every geometry ------------------------------------------------------------------------
# The methods that read or change the token sequence, pooling or norms in the fast suite; every ViT method in
# `make test-slow` (each geometry builds a model per method: ~130 cases).
TOKEN_SENSITIVE = ("linear", "vpt_shallow", "vpt_deep", "partial_k", "ssf", "vqt", "convpass")


@pytest.mark.parametrize("kind", GEOMETRIES)
@pytest.mark.parametrize("method", [m if m in TOKEN_SENSITIVE else pytest.param(m, marks=pytest.mark.slow)
                                    for m in list_methods() if "vit" in get_method_class(m).families])
def test_every_vit_method_trains_a_step_on_each_geometry(method, kind):
    backbone = build(kind, **({"img_size": 56} if "dinov2" in kind else {}))  # 4 x 4 patches of 14 px
    plain = copy.deepcopy(backbone)
    model = create_method(method, backbone, num_classes=3, **tiny_options(method))
    images, labels = images_for(backbone), torch.tensor([0, 2])
    if get_method_class(method).identity_at_init:  # the pretrained function, read where its checkpoint expects
        plain.reset_classifier(3)
        plain.head = copy.deepcopy(model.backbone.get_classifier())
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(images), plain.eval()(images), rtol=0, atol=1e-5)
    model.train()
    loss, _, _ = model.model_step((images, labels))
    loss.backward()
    tuned = [p for p in model.parameters() if p.requires_grad]
    assert tuned and all(p.grad is not None for p in tuned)


def test_a_mocov3_file_runs_through_the_pipeline_and_no_file_exits_2(tmp_path, capsys):
    from benchmark.run import main

    path, _ = moco_checkpoint(tmp_path)
    tiny = "img_size=32 patch_size=8 embed_dim=32 depth=2 num_heads=2"
    common = ["--method", "vpt_deep", "--dataset", "digits", "--backbone", "vit_base_patch16_224.mocov3",
              "--backbone-args", tiny, "--epochs", "1", "--results-dir", str(tmp_path / "results")]
    assert main([*common, "--weights", str(path)]) == 0
    assert main(common) == 2  # pretrained without WEIGHTS: refused before anything is built
    assert "MoCo v3 weights are not on the timm hub" in capsys.readouterr().err
