"""Self-supervised and CLIP ViTs: what each checkpoint needs to be built and loaded as it was trained.

All are timm VisionTransformers (family "vit"), so every ViT method applies; what differs is the head input and
how the weights map. backbones/create.py and backbones/weights.py call the hooks here (`creation_args`,
`after_creation`, `checkpoint_state`, `read_moco_state`) while they build and load a backbone.

- MAE (`vit_*_224.mae`, He et al. 2022, https://arxiv.org/abs/2111.06377): built with global average pooling over
  the patch tokens (CLS excluded) and `fc_norm`, the pooling MAE's fine-tuning and the VPT code
  (src/models/vit_backbones/vit_mae.py, `global_pool=True` for every MAE model) use. timm's own `.mae` config reads
  CLS after `norm`; we follow the VPT code. As in the VPT code (and MAE's fine-tuning, whose loader expects
  `fc_norm` missing), the checkpoint's final `norm` is not used: `fc_norm` starts at LayerNorm's init (weight 1,
  bias 0). `BACKBONE_ARGS="global_pool=token"` gives timm's CLS + pretrained `norm` instead.
- MoCo v3 (`vit_base_patch16_224.mocov3`, `vit_small_patch16_224.mocov3`, Chen et al. 2021,
  https://arxiv.org/abs/2104.02057): a tag of ours (timm has no MoCo weights), so WEIGHTS=<file> is required. The
  official checkpoints nest the model under `state_dict`, with the encoder under `module.base_encoder.` (pretraining,
  `vit-b-300ep.pth.tar`; the momentum encoder and predictor are dropped) or `module.` (linear probe,
  `linear-vit-b-300ep.pth.tar`, what the VPT code's build_mocov3_model loads); the projection MLP / linear classifier
  under `head.` is dropped, as MoCo v3's main_lincls.py does. The MoCo ViT (moco-v3 vits.py, the VPT code's
  vit_moco.py) uses a fixed 2D sin-cos position embedding (a Parameter with requires_grad=False): here it is a
  buffer under timm's name `pos_embed`, set to that sin-cos at creation and overwritten by the checkpoint's (equal)
  values, so no method (not even full fine-tuning) trains it. CLS after `norm` feeds the head (both codes); mean/std
  are ImageNet's (MoCo v3's transforms), ViT-S uses MoCo's 12 heads (timm's vit_small has 6).
- DINOv2 (`vit_*_patch14_dinov2*`, `vit_*_patch14_reg4_dinov2*`, https://arxiv.org/abs/2304.07193): nothing to
  change; CLS (+ 4 registers for reg4, after CLS, no position embedding on either) after `norm`, CLS to the head
  (timm's default, PETL_Vision's). timm builds them for 518 px; `BACKBONE_ARGS="img_size=224"` gives the paper-style
  224 input (PETL_Vision's `img_size=224`), the position embedding resampled by timm's checkpoint filter.
- CLIP (`vit_*_clip_*`, https://arxiv.org/abs/2103.00020): `norm_pre` (CLIP's ln_pre) after the position embedding,
  CLS after `norm` (ln_post) to the head, CLIP's mean/std from timm's pretrained config; all timm's own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

MOCO_TAG = "mocov3"
# The architectures MoCo v3 released ViTs for, with what differs from timm's model of that name.
MOCO_ARCHITECTURES = {"vit_base_patch16_224": {}, "vit_small_patch16_224": {"num_heads": 12}}
# MoCo v3's evaluation transform: Resize(256) + CenterCrop(224), bilinear (torchvision's default), ImageNet mean/std.
MOCO_DATA = {"tag": MOCO_TAG, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875,
             "interpolation": "bilinear", "num_classes": 0}


def pretraining(model_or_name) -> str | None:
    """"mae", "mocov3", "dinov2", "clip" or None (any other ViT), from a name or a built model's config."""
    if isinstance(model_or_name, str):
        architecture, _, tag = model_or_name.partition(".")
    else:
        cfg = getattr(model_or_name, "pretrained_cfg", None) or {}
        architecture, tag = cfg.get("architecture", ""), cfg.get("tag", "") or ""
    if tag == MOCO_TAG:
        return "mocov3"
    if tag.startswith("mae"):
        return "mae"
    if "dinov2" in architecture:
        return "dinov2"
    if "_clip_" in architecture:
        return "clip"
    return None


def creation_args(name: str, kwargs: dict) -> tuple[str, dict]:
    """The timm name and create_model kwargs for `name`: MAE's pooling, MoCo's tag as its timm architecture and
    data config. Explicit kwargs win over these defaults."""
    kind = pretraining(name)
    if kind == "mae":
        return name, {"global_pool": "avg", **kwargs}  # timm puts fc_norm after an average pool, norm -> Identity
    if kind == "mocov3":
        architecture = name.split(".")[0]
        if architecture not in MOCO_ARCHITECTURES:
            raise ValueError(f"MoCo v3 released ViTs for {', '.join(MOCO_ARCHITECTURES)}; got {name!r}. Use "
                             f"BACKBONE=vit_base_patch16_224.{MOCO_TAG} WEIGHTS=vit-b-300ep.pth.tar.")
        overlay = {**MOCO_DATA, **kwargs.pop("pretrained_cfg_overlay", {})}
        return architecture, {**MOCO_ARCHITECTURES[architecture], **kwargs, "pretrained_cfg_overlay": overlay}
    return name, kwargs


def not_on_hub(name: str) -> str | None:
    """Why `name` has no hub weights (MoCo v3), or None."""
    if pretraining(name) == "mocov3":
        return (f"MoCo v3 weights are not on the timm hub; pass the official checkpoint as WEIGHTS=<file> "
                f"(e.g. WEIGHTS=vit-b-300ep.pth.tar with BACKBONE={name}).")
    return None


def after_creation(model: nn.Module) -> None:
    """MoCo v3: its fixed 2D sin-cos position embedding, as a buffer (trained by no method)."""
    if pretraining(model) == "mocov3" and isinstance(getattr(model, "pos_embed", None), nn.Parameter):
        fixed = moco_sincos_pos_embed(model.patch_embed.grid_size, model.embed_dim, model.pos_embed.device)
        del model.pos_embed
        model.register_buffer("pos_embed", fixed.to(dtype=torch.get_default_dtype()))


def moco_sincos_pos_embed(grid_size: tuple[int, int], dim: int, device=None) -> torch.Tensor:
    """MoCo v3's `build_2d_sincos_position_embedding` (temperature 1e4): (1, 1 + h*w, dim), a zero row for CLS.

    Its meshgrid is indexed (w, h) with torch's default "ij", so its "w" coordinate is the token's row and "h" its
    column; each gets dim/4 frequencies, as [sin(row), cos(row), sin(col), cos(col)].
    """
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(1, 1 + grid_size[0] * grid_size[1], dim, device="meta")
    if dim % 4:
        raise ValueError(f"MoCo v3's 2D sin-cos position embedding needs a width divisible by 4, got {dim}.")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                indexing="ij")
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    out_rows, out_cols = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    table = torch.cat([out_rows.sin(), out_rows.cos(), out_cols.sin(), out_cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)[None].to(device)


def read_moco_state(path: Path) -> dict:
    """The encoder of an official MoCo v3 checkpoint under timm's names, its head and the rest dropped."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any decoding failure means "not a checkpoint"
        raise ValueError(f"WEIGHTS {str(path)!r} is not a readable MoCo v3 checkpoint ({type(err).__name__}: "
                         f"{str(err)[:200]}); pass the official vit-b-300ep.pth.tar.") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    keys = [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []
    if any(k.startswith("module.base_encoder.") for k in keys):  # pretraining: base + momentum encoder, predictor
        prefix = "module.base_encoder."
    elif keys and all(k.startswith("module.") for k in keys):  # linear probe (what the VPT code loads)
        prefix = "module."
    else:
        raise ValueError(f"WEIGHTS {str(path)!r} is not a MoCo v3 checkpoint: no 'module.base_encoder.' keys under "
                         f"'state_dict' (found {keys[:3]} ...); pass the official vit-b-300ep.pth.tar.")
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("head.")}


def checkpoint_state(model: nn.Module, state: dict) -> dict:
    """A checkpoint's state dict (after timm's filter) as `model` takes it. MAE: the decoder and mask token (in
    MAE's visualisation checkpoints) are dropped; with the average pool, so is the pretraining's final `norm`, and
    `fc_norm` starts at its init (MAE's fine-tuning, the VPT code)."""
    if pretraining(model) != "mae":
        return state
    state = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    if isinstance(model.norm, nn.Identity) and not isinstance(model.fc_norm, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        for key, value in model.fc_norm.state_dict().items():
            state.setdefault(f"fc_norm.{key}", value.detach().clone())
    return state
