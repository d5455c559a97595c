"""VPT and the other methods on a timm Swin, against references written here.

The VPT reference follows the official code (KMnP/vpt src/models/vit_prompt/swin_transformer.py and BasicLayer's
deep loop in src/models/vit_backbones/swin_transformer.py) one image and one window at a time: its own window
partition, cyclic shift, padding, relative-position index and shift mask from the coordinates, the prompts
prepended to every window with zero bias and mask entries, their outputs averaged over the image's windows, the
4x channel concatenation at patch merging, and the final norm and average over prompts and tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods import create_method
from tests.conftest import make_tiny

# Tiny Swins: the conftest one (8x8 then 4x4 tokens, 4x4 windows: shifted windows in stage 0 only), three stages
# with shifted windows in two of them, and 3x3 windows on 8x8 / 4x4 maps (timm pads; shifted too).
SWINS = {
    "tiny": {},
    "three stages, two shifted": dict(img_size=64, depths=(2, 2, 2), num_heads=(1, 2, 4)),
    "padded windows": dict(window_size=3),
}


def linear(layer, x):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def region(index: int, size: int, window: int, shift: int) -> int:
    """The shift mask's region of a row (or column) of the padded, rolled map: Swin's three slices."""
    return 0 if index < size - window else (1 if index < size - shift else 2)


def window_attention(attn, seq, coords, window, shift, padded):
    """Attention over one window's [prompts, tokens] (p + area, C): head by head, the relative-position bias
    from the coordinates (zero for prompt rows/columns), -100 between different shift regions."""
    p = seq.shape[0] - len(coords)
    heads, (win_h, win_w) = attn.num_heads, window
    qkv = linear(attn.qkv, seq).reshape(len(seq), 3, heads, -1)
    bias = torch.zeros(heads, len(seq), len(seq))
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            index = (ri - rj + win_h - 1) * (2 * win_w - 1) + (ci - cj + win_w - 1)
            bias[:, p + i, p + j] = attn.relative_position_bias_table[index]
            if any(shift):
                regions_i = (region(ri, padded[0], win_h, shift[0]), region(ci, padded[1], win_w, shift[1]))
                regions_j = (region(rj, padded[0], win_h, shift[0]), region(cj, padded[1], win_w, shift[1]))
                if regions_i != regions_j:
                    bias[:, p + i, p + j] -= 100.0
    outs = []
    for head in range(heads):
        q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
        scores = q @ k.T / math.sqrt(q.shape[-1]) + bias[head]
        outs.append(scores.softmax(dim=-1) @ v)
    return linear(attn.proj, torch.cat(outs, dim=-1))


def block_forward(block, x, prompts):
    """One image: x (H, W, C), prompts (p, C) -> both after the block."""
    height, width, dim = x.shape
    p, (win_h, win_w), shift = prompts.shape[0], block.window_size, block.shift_size
    h, h_prompts = layer_norm(block.norm1, x), layer_norm(block.norm1, prompts)
    h = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    padded = (math.ceil(height / win_h) * win_h, math.ceil(width / win_w) * win_w)
    grid = torch.zeros(*padded, dim)
    grid[:height, :width] = h
    out, prompt_outs = torch.zeros_like(grid), []
    for top in range(0, padded[0], win_h):
        for left in range(0, padded[1], win_w):
            coords = [(r, c) for r in range(top, top + win_h) for c in range(left, left + win_w)]
            tokens = torch.stack([grid[r, c] for r, c in coords])
            result = window_attention(block.attn, torch.cat([h_prompts, tokens]), coords, (win_h, win_w), shift,
                                      padded)
            prompt_outs.append(result[:p])
            for (r, c), row in zip(coords, result[p:], strict=True):
                out[r, c] = row
    attn_x = torch.roll(out[:height, :width], shifts=shift, dims=(0, 1))
    seq = torch.cat([prompts, x.reshape(-1, dim)]) + torch.cat([torch.stack(prompt_outs).mean(0),
                                                                 attn_x.reshape(-1, dim)])
    mlp = block.mlp
    seq = seq + linear(mlp.fc2, F.gelu(linear(mlp.fc1, layer_norm(block.norm2, seq))))
    return seq[p:].reshape(height, width, dim), seq[:p]


def merge(downsample, x, prompts):
    """PatchMerging (x0, x1, x2, x3 of the official code) and PromptedPatchMerging's 4x prompt concatenation."""
    x = torch.cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]], dim=-1)
    reduce = lambda t: linear(downsample.reduction, layer_norm(downsample.norm, t))  # noqa: E731
    return reduce(x), reduce(torch.cat([prompts] * 4, dim=-1))


def reference_logits(model, image: torch.Tensor, deep: bool) -> torch.Tensor:
    """The official PromptedSwinTransformer forward for one image (eval: no dropout)."""
    backbone, params = model.backbone, model.vpt_prompts
    shallow_prompt = params[0][0]  # the official prompt_embeddings; deep_prompt_embeddings_0 = params[0][1:]
    x = backbone.patch_embed.proj(image[None])[0].permute(1, 2, 0)  # (H, W, C0)
    x = layer_norm(backbone.patch_embed.norm, x)
    prompts = shallow_prompt
    for stage_index, stage in enumerate(backbone.layers):
        if stage_index > 0:  # the official code merges at the end of the previous stage: the same sequence
            x, prompts = merge(stage.downsample, x, prompts)
        for block_index, block in enumerate(stage.blocks):
            if deep and stage_index == 0 and block_index > 0:
                prompts = params[0][block_index]  # deep_prompt_embeddings_0[i - 1]
            elif deep and stage_index > 0:
                prompts = params[stage_index][block_index]  # deep_prompt_embeddings_s[i]
            x, prompts = block_forward(block, x, prompts)
    seq = layer_norm(backbone.norm, torch.cat([prompts, x.reshape(-1, x.shape[-1])]))
    return linear(backbone.get_classifier(), seq.mean(dim=0))  # avgpool over prompts and tokens


def build(method: str, **swin):
    torch.manual_seed(0)
    return create_method(method, make_tiny("swin", **swin), num_classes=3, prompt_length=3, prompt_dropout=0.0)


@pytest.mark.parametrize("swin", SWINS.values(), ids=SWINS.keys())
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_swin_vpt_equals_the_official_forward_written_out(deep, swin):
    model = build("vpt_deep" if deep else "vpt_shallow", **swin).eval()
    with torch.no_grad():
        for tensor in model.vpt_prompts:
            tensor.normal_()  # prompts that move the outputs well beyond the tolerance
        torch.nn.init.normal_(model.backbone.get_classifier().weight)
    size = model.backbone.patch_embed.img_size[0]
    # three images: an image's logits must not depend on the others (the official batched code mixes them)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images)
        expected = torch.stack([reference_logits(model, image, deep) for image in images])
        assert logits.abs().max() > 0.5
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        if deep:  # the comparison tells deep from shallow
            assert not torch.allclose(reference_logits(model, images[0], False), expected[0], atol=1e-3)
