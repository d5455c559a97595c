"""Swin-B (swin_base_patch4_window7_224, 200 classes) by formula, and pieces of a Swin's forward written out."""

from __future__ import annotations

import torch.nn.functional as F


def linear(layer, x):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def region(index: int, size: int, window: int, shift: int) -> int:
    """The shift mask's region of a row (or column) of the padded, rolled map: Swin's three slices."""
    return 0 if index < size - window else (1 if index < size - shift else 2)


# --- Swin-B (swin_base_patch4_window7_224, 200 classes): tuned parameters as the official code counts them -----
# (every tensor with requires_grad, the new head included: its log_model_info "Gradient Parameters")
WIDTHS, DEPTHS, HEADS, TABLE = (128, 256, 512, 1024), (2, 2, 18, 2), (4, 8, 16, 32), (2 * 7 - 1) ** 2
HEAD = 1024 * 200 + 200


def block_params(width: int, heads: int) -> int:
    """norm1 2C, qkv 3C^2 + 3C, proj C^2 + C, relative-position table 169 h, norm2 2C, fc1 4C^2 + 4C, fc2 4C^2 + C."""
    return 12 * width ** 2 + 13 * width + TABLE * heads


def swin_b_total() -> int:
    embed = 3 * 4 * 4 * 128 + 128 + 2 * 128  # patch projection and its norm
    blocks = sum(d * block_params(c, h) for c, d, h in zip(WIDTHS, DEPTHS, HEADS, strict=True))
    merges = sum(2 * 4 * c + 4 * c * 2 * c for c in WIDTHS[:-1])  # norm(4C) and reduction 4C -> 2C, no bias
    return embed + blocks + merges + 2 * 1024 + HEAD
