"""Backbone creation: a timm model of a supported family (plain ViTs, Swin, ResNet/ConvNeXt) by name, optionally
with local weights, plus the suite's embedded architecture (registered with timm so it is created like any other
ViT)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import timm
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer, checkpoint_filter_fn
from torch import nn

from methods import ssl_vits
from methods.registry import closest_name

# Fashion-MNIST statistics: the embedded backbone is pretrained on it, so its data config normalises with them.
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)

default_cfgs = generate_default_cfgs({
    "vit_embedded_p7_28": {
        "input_size": (1, 28, 28), "mean": FMNIST_MEAN, "std": FMNIST_STD, "crop_pct": 1.0,
        "interpolation": "bilinear", "num_classes": 10, "first_conv": "patch_embed.proj", "classifier": "head",
    },
})


@register_model
def vit_embedded_p7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The embedded default: 28 px grey images, 7 px patches (16 tokens + CLS), width 128, depth 6, 4 heads.

    1.2M parameters: big enough for pretraining on Fashion-MNIST to give features that transfer, small
    enough that every protocol trains in seconds on two CPU cores (see MEASUREMENTS).
    """
    args = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=6, num_heads=4)
    return _create_vision_transformer("vit_embedded_p7_28", pretrained=pretrained, **dict(args, **kwargs))


# The backbone families a method can declare (TuningModule.families), with what each covers.
FAMILIES = {
    "vit": "plain ViTs: timm VisionTransformer (vit_*, deit_*, the embedded vit_embedded_p7_28)",
    "swin": "Swin Transformers: timm SwinTransformer (swin_*)",
    "convnet": "ConvNets: timm ResNet and ConvNeXt (resnet*, convnext*)",
}


def backbone_family(model) -> str | None:
    """The family of a built timm model ("vit", "swin", "convnet"), or None when the suite has no methods for it."""
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, (ResNet, ConvNeXt)):
        return "convnet"
    return None


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in forward order: a ViT's `blocks`; a Swin's blocks of every stage, stage by stage."""
    if backbone_family(model) == "swin":
        return [block for stage in model.layers for block in stage.blocks]
    return list(model.blocks)


def plain_blocks(model: nn.Module, method: str) -> list[nn.Module]:
    """`transformer_blocks(model)`, each checked to be timm's plain block of its family (a ViT's `Block`, a Swin's
    `SwinTransformerBlock`): the class whose forward a block-modifying method mirrors; any other is a ValueError."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    plain = SwinTransformerBlock if backbone_family(model) == "swin" else Block
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        if type(block) is not plain:
            raise ValueError(f"{method} needs timm's plain {plain.__name__}; blocks[{i}] is {type(block).__name__}.")
    return blocks


def block_width(block: nn.Module) -> int:
    """A transformer block's width: a ViT's embed_dim, a Swin block's stage width (what its MLP reads)."""
    return block.mlp.fc1.in_features


def is_vit_name(name: str) -> bool:
    return name.split(".")[0] in timm.list_models() and "vit" in name.split(".")[0]


def create_backbone(name: str, *, pretrained: bool = False, weights: str | Path | None = None,
                    **kwargs) -> nn.Module:
    """A timm model of a supported family by name; `weights` loads a local file (.npz, .pth/.pt, .safetensors)
    instead of the hub."""
    architecture = name.split(".")[0]
    if architecture not in timm.list_models():
        vits = timm.list_models("*vit*")
        raise ValueError(f"Unknown backbone {name!r}.{closest_name(architecture, timm.list_models())} Use a timm "
                         f"ViT, Swin, ResNet or ConvNeXt name (`timm.list_models('*vit*')` lists {len(vits)} ViTs), "
                         "e.g. vit_base_patch16_224.orig_in21k.")
    from_hub = pretrained and weights is None
    if from_hub and (why := ssl_vits.not_on_hub(name)):
        raise ValueError(why)
    # MAE's average pool + fc_norm, MoCo's tag as its timm architecture and data config (methods/ssl_vits.py)
    timm_name, kwargs = ssl_vits.creation_args(name, kwargs)
    own_filter = from_hub and ssl_vits.pretraining(name) == "mae"  # the hub's MAE norm is not the avg pool's fc_norm
    try:
        model = timm.create_model(timm_name, pretrained=from_hub and not own_filter, **kwargs)
        if own_filter:
            timm.models.load_pretrained(model, num_classes=model.num_classes,
                                        in_chans=model.patch_embed.proj.in_channels,
                                        filter_fn=lambda s, m: ssl_vits.checkpoint_state(m, checkpoint_filter_fn(s, m)))
    except OSError as err:  # huggingface_hub's errors (offline, no cached copy, HTTP) are OSErrors
        if not from_hub:
            raise
        raise OSError(f"Pretrained weights of {name!r} could not be fetched from the Hugging Face hub ({err}). "
                      "Fetch them once where the hub is reachable (timm caches them; HF_HUB_OFFLINE=1 then uses the "
                      "cache), or pass local WEIGHTS=<.npz, .pth/.pt or .safetensors file>.") from err
    if backbone_family(model) is None:
        raise ValueError(f"Backbone {name!r} is a timm {type(model).__name__}, which no tuning method supports; "
                         f"the backbone families are: {'; '.join(FAMILIES.values())}.")
    ssl_vits.after_creation(model)
    if weights is not None:
        load_weights(model, weights)
    return model


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


def data_config(model: nn.Module) -> dict:
    """timm's data config (input_size, mean, std, interpolation, crop_pct) as plain values for a datamodule."""
    config = timm.data.resolve_model_data_config(model)
    # timm takes input_size from the pretrained config; a model built with another img_size / in_chans
    # (e.g. create_backbone("vit_tiny_patch16_224", img_size=32)) takes the size it was built for.
    if getattr(getattr(model, "patch_embed", None), "img_size", None):
        config["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items()}


