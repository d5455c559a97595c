"""Backbone creation: a timm model of a supported family (plain ViTs, Swin, ResNet/ConvNeXt) by name, optionally
with local weights, and its data config as plain values for a datamodule."""

from __future__ import annotations

from pathlib import Path

import timm
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from backbones import ssl_vits
from backbones.families import FAMILIES, family_of
from backbones.hints import closest_name
from backbones.weights import load_weights


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
    # MAE's average pool + fc_norm, MoCo's tag as its timm architecture and data config (backbones/ssl_vits.py)
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
    if family_of(model) is None:
        raise ValueError(f"Backbone {name!r} is a timm {type(model).__name__}, which no tuning method supports; "
                         f"the backbone families are: {'; '.join(family.covers for family in FAMILIES.values())}.")
    ssl_vits.after_creation(model)
    if weights is not None:
        load_weights(model, weights)
    return model


def data_config(model: nn.Module) -> dict:
    """timm's data config (input_size, mean, std, interpolation, crop_pct) as plain values for a datamodule."""
    config = timm.data.resolve_model_data_config(model)
    # timm takes input_size from the pretrained config; a model built with another img_size / in_chans
    # (e.g. create_backbone("vit_tiny_patch16_224", img_size=32)) takes the size it was built for.
    if getattr(getattr(model, "patch_embed", None), "img_size", None):
        config["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items()}
