"""Tiny random-init timm backbones (pretrained=False), one per family, all on 32 px RGB images: offline and fast."""

from __future__ import annotations

from backbones import create_backbone

CONV_32PX = {"input_size": (3, 32, 32)}
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# One tiny random-init timm model per backbone family (backbones.FAMILIES), all on 32 px RGB images.
TINY_BACKBONES = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=24, depths=(2, 2), num_heads=(1, 2),
                                                  window_size=4)),  # 8x8 then 4x4 tokens, 4x4 windows
    "convnet": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), pretrained_cfg_overlay=CONV_32PX)),
}
# Both ConvNets of the convnet family, one stage block each, 32 px; timm ConvNets take no img_size, so their data
# config (input_size) comes from timm's pretrained-config overlay, a create_model kwarg (backbone_kwargs of a run).
TINY_CONVNETS = {
    "convnext": TINY_BACKBONES["convnet"],
    # zero_init_last=False: timm zeroes each block's last BatchNorm scale, which leaves every residual branch dead
    # in a random-init stand-in for a pretrained ResNet (nothing before it would get a gradient under bias tuning)
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), zero_init_last=False,
                                pretrained_cfg_overlay=CONV_32PX)),
}

# Method options a tiny backbone needs where a method's default does not fit it: FourierFT's 1,000 frequencies per
# layer exceed the tiny Swin's smallest adapted weight (stage 0's attn.proj, 24 x 24 = 576 entries).
TINY_METHOD_OPTIONS = {("sct", "vit"): {"channels": 8},  # SCT's 96 salient channels exceed the tiny width 32
                       ("sct", "swin"): {"channels": 8},  # and the tiny Swin's 24 and 48
                       ("fourierft", "swin"): {"n_frequency": 500}}
# SPT's budget of 400,000 exceeds every weight of the tiny backbones (~25,000): 2,000 leaves some matrices structured,
# others with single entries, some vectors whole
TINY_METHOD_OPTIONS |= {(method, kind): {"budget": 2000} for method in ("spt_lora", "spt_adapter")
                        for kind in ("vit", "swin")}
# peft tuners whose defaults are sized for ViT-B's 768 (methods/peft_table.py): a rank or group at most the tiny widths
# (ViT 32; Swin 24 and 48), a vector length and group size dividing them, a frequency count within a 24 x 24 weight.
TINY_METHOD_OPTIONS |= {(method, kind): options for kind in ("vit", "swin") for method, options in {
    "miss": {"r": 8}, "road": {"group_size": 8}, "shira": {"r": 4}, "waveft": {"n_frequency": 100},
    "vblora": {"vector_length": 8}, "psoft": {"r": 8}}.items()}


def tiny_options(method: str, kind: str = "vit") -> dict:
    """The options `method` needs on the tiny backbone of `kind` (a family or a TINY_CONVNETS key), {} for its
    defaults: what a test building every registered method on a tiny backbone passes to create_method."""
    return dict(TINY_METHOD_OPTIONS.get((method, kind), {}))


def make_tiny_vit(**overrides):
    """A 2-block, width-32 ViT on 32 px RGB images (16 patches + CLS): a real timm VisionTransformer."""
    return create_backbone("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, **overrides})


def make_tiny(family: str, **overrides):
    name, kwargs = TINY_BACKBONES[family]
    return create_backbone(name, pretrained=False, **{**kwargs, **overrides})


def make_tiny_convnet(kind: str, **overrides):
    name, kwargs = TINY_CONVNETS[kind]
    return create_backbone(name, pretrained=False, **{**kwargs, **overrides})


def make_vit_b():
    """ViT-B/16 (vit_base_patch16_224), random init: real tensors, ~3 s to build on a CPU (tests/conftest.py builds
    it once per session and hands each test a copy: the `vit_b` fixture)."""
    return create_backbone("vit_base_patch16_224", pretrained=False)
