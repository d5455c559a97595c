"""Pixel-space visual prompts for ConvNets: VPT on timm ResNets and ConvNeXts (Jia et al., ECCV 2022,
https://arxiv.org/abs/2203.12119, Sec. 4.3 / Appendix: "VPT on ConvNets"), as the official code builds them
(KMnP/vpt src/models/resnet.py `_setup_prompt_pad`, `_setup_prompt_below`, `incorporate_prompt`; convnext.py
reuses the ResNet class). `methods.vpt` uses this module for the "convnet" family.

"pad" (the official default for ConvNets, `MODEL.PROMPT.LOCATION: pad`): p learnable pixels around the image.
- Two parameters, as the official code: `prompt_embeddings_tb` (1, 3, 2p, S + 2p) holds the top band (rows :p) and
  the bottom band (rows p:); `prompt_embeddings_lr` (1, 3, S, 2p) the left (columns :p) and right (columns p:).
- The image keeps its size S (the data config's crop, 224 for ImageNet checkpoints) and is padded to S + 2p: the
  official code concatenates left/right first (width S + 2p), then top/bottom across the full width. It never
  resizes the image; its data transform crops S = DATA.CROPSIZE whatever the prompt (src/data/transforms.py).
- Init uniform(0, 1) ("random" INITIATION, the default), i.e. a random image in [0, 1], and every forward passes
  the prompts through the image Normalize, (prompt - mean) / std, like an image. The official code hard-codes the
  ImageNet mean/std; here they are the backbone's data-config mean/std (ours: the same values for ImageNet
  checkpoints, the right ones for others, e.g. a CLIP-normalised ConvNeXt).
- Tuned: the two bands and the head; the backbone stays frozen and in eval mode (the official `frozen_layers.eval()`).
  Count (official): 3 * 2p * (S + 2p) + 3 * S * 2p = 12 p S + 12 p^2, plus the head.

"below" (`location=below`): p extra input channels of S x S pixels concatenated below the image's 3 channels
(1, p, S, S), uniform(0, 1), normalised with the mean/std averaged over the image channels and repeated p times
(official). The first conv grows by p input channels: its pretrained weights are copied into the first ones, the
new ones initialised as the official code does (ResNet: Xavier-uniform; ConvNeXt: trunc-normal std 0.02). What
trains besides the prompt is the official ResNet's `prompt_layers`: the stem, i.e. ResNet's `conv1` and `bn1`,
ConvNeXt's `stem` (conv + norm). Choices that are ours: the official ConvNeXt refuses "below" (its code has the
setup but raises), here ConvNeXt gets the same rule, keeping the stem conv's pretrained bias (the official setup
zeroes it); bn1 stays in eval mode with its running statistics, where the official one normalises with batch
statistics (it is never put in eval mode).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXt
from torch import nn

LOCATIONS = ("pad", "below")
# The official config's default MODEL.PROMPT.NUM_TOKENS (src/configs/config.py); it has no ConvNet-specific value.
DEFAULT_PIXELS = 5


def normalise(prompt: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torchvision's Normalize on a (1, C, H, W) prompt: (prompt - mean) / std per channel."""
    return (prompt - mean) / std


class PadPrompt(nn.Module):
    """Learnable bands of p pixels around an S x S image: (B, 3, S, S) -> (B, 3, S + 2p, S + 2p)."""

    def __init__(self, image_size: int, pixels: int, mean, std):
        super().__init__()
        channels, self.image_size, self.pixels = len(mean), image_size, pixels
        self.prompt_embeddings_tb = nn.Parameter(torch.empty(1, channels, 2 * pixels, image_size + 2 * pixels))
        self.prompt_embeddings_lr = nn.Parameter(torch.empty(1, channels, image_size, 2 * pixels))
        nn.init.uniform_(self.prompt_embeddings_tb, 0.0, 1.0)
        nn.init.uniform_(self.prompt_embeddings_lr, 0.0, 1.0)
        # not in the state dict: the data config's values, restored with the backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_size(x, self.image_size, "pad")
        batch, p = x.shape[0], self.pixels
        lr = normalise(self.prompt_embeddings_lr, self.mean, self.std).expand(batch, -1, -1, -1)
        tb = normalise(self.prompt_embeddings_tb, self.mean, self.std).expand(batch, -1, -1, -1)
        x = torch.cat([lr[..., :p], x, lr[..., p:]], dim=-1)  # (B, 3, S, S + 2p)
        return torch.cat([tb[..., :p, :], x, tb[..., p:, :]], dim=-2)  # (B, 3, S + 2p, S + 2p)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, pixels={self.pixels}"


class BelowPrompt(nn.Module):
    """p learnable S x S channels below the image: (B, 3, S, S) -> (B, 3 + p, S, S)."""

    def __init__(self, image_size: int, pixels: int, mean, std):
        super().__init__()
        self.image_size, self.pixels = image_size, pixels
        self.prompt_embeddings = nn.Parameter(torch.empty(1, pixels, image_size, image_size))
        nn.init.uniform_(self.prompt_embeddings, 0.0, 1.0)
        # the official Normalize: the image channels' mean (and std) averaged, repeated for each prompt channel
        self.register_buffer("mean", torch.full((1, pixels, 1, 1), sum(mean) / len(mean)), persistent=False)
        self.register_buffer("std", torch.full((1, pixels, 1, 1), sum(std) / len(std)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_size(x, self.image_size, "below")
        prompt = normalise(self.prompt_embeddings, self.mean, self.std).expand(x.shape[0], -1, -1, -1)
        return torch.cat([x, prompt], dim=1)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, channels={self.pixels}"


def check_size(x: torch.Tensor, size: int, location: str) -> None:
    if tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"The {location} prompt was built for {size}x{size} images (the backbone's data config), "
                         f"got {tuple(x.shape[-2:])}; feed the data config's input size.")


def extend_first_conv(backbone: nn.Module, extra: int) -> nn.Module:
    """Replace the backbone's first conv by one with `extra` more input channels, the pretrained weights in the first
    ones (official `_setup_prompt_below`); returns the stem modules that train with the prompt."""
    name = backbone.pretrained_cfg.get("first_conv") or ("stem.0" if isinstance(backbone, ConvNeXt) else "conv1")
    old = backbone.get_submodule(name)
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                    padding_mode=old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        if isinstance(backbone, ConvNeXt):
            trunc_normal_(new.weight, std=0.02)
        else:
            nn.init.xavier_uniform_(new.weight)  # over the whole (3 + p)-channel weight, as the official code
        new.weight[:, :old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    backbone.set_submodule(name, new)
    if isinstance(backbone, ConvNeXt):
        return backbone.stem
    return nn.ModuleList([backbone.conv1, backbone.bn1])  # the official ResNet's prompt_layers (conv1, bn1)


def pixel_prompt(backbone: nn.Module, location: str, pixels: int, data_config: dict) -> nn.Module:
    """The prompt module for `location` sized by the data config's input size and normalised with its mean/std;
    for "below" the backbone's stem is extended and unfrozen."""
    _, height, width = data_config["input_size"]
    if height != width:
        raise ValueError(f"VPT pixel prompts need square inputs (the official crop), the data config has "
                         f"{height}x{width}.")
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    device = next(backbone.parameters()).device
    with torch.device(device):
        if location == "pad":
            return PadPrompt(height, pixels, mean, std)
        if location == "below":
            prompt = BelowPrompt(height, pixels, mean, std)
            extend_first_conv(backbone, pixels).requires_grad_(True)
            return prompt
    raise ValueError(f"VPT on a ConvNet takes location 'pad' or 'below', got {location!r}.")
