"""Local weights: a .npz (Google/JAX ViTs, through timm's converter), .pth/.pt or .safetensors file loaded into a
built backbone, the classifier skipped; a checkpoint that does not fit is a ValueError naming what differs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import timm
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from backbones import ssl_vits


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model`; the classifier head is skipped (every method trains a new one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WEIGHTS file {str(path)!r} does not exist; pass the path of a .npz, .pth/.pt "
                                "or .safetensors checkpoint.")
    if path.suffix == ".npz" and isinstance(model, VisionTransformer):  # Google/JAX ViT checkpoints: timm's converter
        geometry = check_npz_layout(model, path)
        try:
            model.load_pretrained(str(path))
        except (KeyError, RuntimeError, ValueError) as err:  # a missing array or a wrong shape
            raise ValueError(f"WEIGHTS {str(path)!r} do not match backbone {type(model).__name__} "
                             f"({geometry_of(model)}; the checkpoint has {geometry}): {type(err).__name__}: "
                             f"{str(err)[:300]}") from err
        return
    if ssl_vits.pretraining(model) == "mocov3":  # its own nesting and prefixes, with a MoCo-specific error
        state = ssl_vits.read_moco_state(path)
    else:
        state = read_state(path)
    state = timm_filter(model)(state, model)  # timm's key/shape conversions (e.g. position-embedding resize)
    state = ssl_vits.checkpoint_state(model, state)  # MAE: fc_norm for the average pool instead of norm
    load_state(model, path, state)


def read_state(path: Path) -> dict:
    try:
        return timm.models.load_state_dict(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 — any decoding failure means "not a checkpoint"
        raise ValueError(f"WEIGHTS file {str(path)!r} is not a readable checkpoint "
                         f"({type(err).__name__}: {err}); pass a .npz, .pth/.pt or .safetensors file holding a "
                         "ViT state dict (e.g. saved by timm or torch.save(model.state_dict())).") from err


def load_state(model: nn.Module, path: Path, state: dict) -> None:
    """Load a converted state dict, the classifier skipped; a shape or key mismatch is a ValueError naming them."""
    prefix = classifier_prefix(model)
    head = {k for k in model.state_dict() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    own = model.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
                   if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong_shape:  # load_state_dict would raise a RuntimeError listing every tensor; name a few instead
        raise ValueError(f"WEIGHTS {str(path)!r} do not match backbone {type(model).__name__} "
                         f"({geometry_of(model)}): {len(wrong_shape)} tensors have "
                         f"another shape (checkpoint != model), e.g. {wrong_shape[:4]}. Pick the BACKBONE these "
                         "weights were trained with.")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise ValueError(f"WEIGHTS {str(path)!r} do not match backbone {type(model).__name__} "
                         f"({geometry_of(model)}): missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {result.unexpected_keys[:8]}"
                         f"{' ...' if len(result.unexpected_keys) > 8 else ''}.")


def timm_filter(model: nn.Module):
    """The `checkpoint_filter_fn` of the timm module defining `model`'s class (ViT, Swin, ConvNeXt ... each have
    their own key/shape conversions), or the identity where that module has none."""
    own = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if isinstance(model, VisionTransformer):
        return checkpoint_filter_fn
    return own or (lambda state, _model: state)


def classifier_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier timm names in the model's config ("head." for a ViT, "head.fc." for Swin
    and ConvNeXt, "fc." for ResNet): the head a checkpoint brings is never loaded."""
    return f"{getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')}."


def geometry_of(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        return f"embed_dim={model.embed_dim}, depth={len(model.blocks)}"
    return f"num_features={model.num_features}"


NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # the layouts timm's npz loader reads


def check_npz_layout(model: VisionTransformer, path: Path) -> str:
    """Compare a Google-format .npz with `model` before loading; returns the checkpoint's geometry as text.

    timm's loader reads `Transformer/encoderblock_{i}` for i < depth and silently ignores the rest, so a 12-block
    checkpoint would load into a 2-block model without a word; here extra blocks are unexpected keys and absent
    ones missing keys, both named in the error.
    """
    try:
        arrays = np.load(path)
        names = set(arrays.files)
    except Exception as err:  # noqa: BLE001 — not a zip of arrays
        raise ValueError(f"WEIGHTS file {str(path)!r} is not a readable .npz checkpoint "
                         f"({type(err).__name__}: {err}).") from err
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in names), None)
    if prefix is None:
        raise ValueError(f"WEIGHTS {str(path)!r} is not a ViT .npz checkpoint: it has no 'embedding/kernel' array "
                         f"(arrays: {sorted(names)[:6]} ...). Use the original Google ViT .npz, e.g. ViT-B_16.npz.")
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"  # big_vision: blocks stacked on axis 0
    if stacked in names:
        blocks = set(range(arrays[stacked].shape[0]))
    else:
        pattern = re.compile(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/")
        blocks = {int(m.group(1)) for name in names if (m := pattern.match(name))}
    width = arrays[f"{prefix}embedding/kernel"].shape[-1]
    geometry = f"embed_dim={width}, depth={len(blocks)}"
    depth = len(model.blocks)
    missing = [f"{prefix}Transformer/encoderblock_{i}/..." for i in range(depth) if i not in blocks]
    unexpected = [f"{prefix}Transformer/encoderblock_{i}/..." for i in sorted(blocks) if i >= depth]
    if missing or unexpected:
        raise ValueError(f"WEIGHTS {str(path)!r} do not match backbone {type(model).__name__} "
                         f"({geometry_of(model)}; the checkpoint has {geometry}): "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
                         "Pick the BACKBONE these weights were trained with.")
    return geometry
