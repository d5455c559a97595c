"""The suite's embedded backbone, registered with timm so it is created like any other ViT."""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

# Fashion-MNIST statistics: the embedded backbone is pretrained on it, so its data config normalises with them.
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)

default_cfgs = generate_default_cfgs({  # timm's register_model reads this module's default_cfgs
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
