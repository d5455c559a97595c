"""VPT-shallow and VPT-deep on a timm SwinTransformer (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119,
its Swin results in Table 4 / Table 13), following the official code: KMnP/vpt src/models/vit_prompt/swin_transformer.py
(PromptedSwinTransformer, PromptedSwinTransformerBlock, PromptedWindowAttention, PromptedPatchMerging) and the deep
prompt loop of BasicLayer in src/models/vit_backbones/swin_transformer.py. methods/vpt.py calls this for the swin
family; the ViT path there is untouched.

What the official code does, and this file with it (timm blocks work on (B, H, W, C) maps; the p prompts of width C
travel beside the map as a (B, p, C) sequence):
- window attention: every window's tokens get the same p (normed) prompts prepended, so each window attends over
  p + window-area keys; the prompt rows and columns get zero relative-position bias and zero shift-mask entries.
  The p prompt outputs of the windows are averaged over the windows of the image.
- the prompts share the block's norm1, residual, norm2 and MLP with the tokens (one sequence [prompts, tokens]).
- patch merging: the prompts are concatenated 4x along channels (`upsample_prompt` with prompt_upsampling None) and
  pass the merge's norm and reduction, so they come out with the next stage's width.
- VPT-deep: stage 0's first block reads the shallow prompt and its other depths[0] - 1 blocks a fresh set each;
  every block of the later stages reads a fresh set of that stage's width (depths[i] of them), which replaces the
  previous block's prompt outputs (so the merged prompts of a deep run are replaced at once and are not computed).
- init uniform(-v, v), v = sqrt(6 / (in_chans * patch_h * patch_w + embed_dim)) with the stage-0 embed_dim for every
  stage, as the official code computes `val` once (it hard-codes in_chans = 3: the same value on RGB).
- the head: the final norm runs over prompts and tokens and the official `avgpool` averages all p + H*W rows: the
  prompts are NOT stripped before the pool (unlike the ViT path, where the head reads CLS). Here forward_features
  returns the normed [prompts, tokens] as a (B, 1, p + H*W, C) map, so timm's own head (average pool over the map,
  dropout, fc) reads exactly that mean.
Ours, not the official code's:
- the window prompt outputs are averaged per image. The official code expands the prompts window-major
  (nW, B, p, C) -> (nW * B, p, C) while window_partition orders the windows batch-major (b * nW + w), and averages
  with `.view(-1, B, p, C).mean(0)`: with a batch of more than one image and more than one window, prompts whose
  values differ per image (every shallow block after the first, or under prompt dropout) meet the windows of other
  images, so an image's logits depend on the rest of its batch. With one image (or one window) the two agree;
  tests/methods/test_swin.py checks this file against a per-image reference and that images do not interact.
- prompt dropout as in the ViT path (methods/vpt.py): per-image masks, 0.1 for deep and 0 for shallow by default;
  the official deep loop drops out each stage's prompt tensor once before expanding it over the batch.
- timm pads a map whose side is not a multiple of the window (the official code asserts divisibility); the padded
  windows get the prompts like any other and count in the average.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import nn
from torch.utils.checkpoint import checkpoint


def stage_depths(backbone: SwinTransformer) -> list[int]:
    return [len(stage.blocks) for stage in backbone.layers]


def stage_widths(backbone: SwinTransformer) -> list[int]:
    return [stage.blocks[0].dim for stage in backbone.layers]


def prompt_bound(backbone: SwinTransformer) -> float:
    """The official code's `val`: Xavier-uniform for the patch projection, computed once with the stage-0 width."""
    patch_h, patch_w = backbone.patch_embed.patch_size
    in_chans = backbone.patch_embed.proj.in_channels
    return math.sqrt(6.0 / float(in_chans * patch_h * patch_w + backbone.embed_dim))


def make_prompts(backbone: SwinTransformer, prompt_length: int, deep: bool) -> nn.ParameterList:
    """One (blocks, p, C_stage) tensor per stage: deep, a set per block of every stage (stage 0's first is the
    official `prompt_embeddings`, its others `deep_prompt_embeddings_0`); shallow, one (1, p, C0) set."""
    stages = zip(stage_depths(backbone), stage_widths(backbone), strict=True)
    shapes = ([(depth, prompt_length, width) for depth, width in stages] if deep
              else [(1, prompt_length, backbone.embed_dim)])
    bound = prompt_bound(backbone)
    prompts = nn.ParameterList(nn.Parameter(torch.empty(shape)) for shape in shapes)
    for tensor in prompts:
        nn.init.uniform_(tensor, -bound, bound)
    return prompts


def window_attention(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, p: int,
                     key_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """timm's WindowAttention forward on windows whose first p rows are prompts (B*nW, p + area, C): the relative
    position bias and the shift mask get zero rows and columns for the prompts (PromptedWindowAttention).
    `key_values` (keys, values), each (heads, T, head_dim), are T more rows before every window's keys and values
    (E²VPT's key-value prompts, prefix tuning's prefixes), with zero bias and mask columns: each query also attends
    to them, and they ask nothing (PromptedWindowAttention of E²VPT's swin_transformer_prompt_VK.py)."""
    windows, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(windows, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B*nW, heads, p + area, head_dim)
    extra = 0
    if key_values is not None:
        keys, values = (t.unsqueeze(0).expand(windows, -1, -1, -1).to(k.dtype) for t in key_values)
        k, v = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)  # (B*nW, heads, T + p + area, head_dim)
        extra = keys.shape[2]
    bias = F.pad(attn._get_rel_pos_bias(), (extra + p, 0, p, 0))  # (1, heads, p + area, T + p + area)
    if mask is not None:  # (nW, area, area), windows batch-major: window w of image b is row b * nW + w
        num_win = mask.shape[0]
        mask = F.pad(mask, (extra + p, 0, p, 0)).view(1, num_win, 1, tokens, extra + tokens)
        bias = (bias.unsqueeze(1) + mask).expand(windows // num_win, -1, -1, -1, -1).reshape(windows, -1, tokens,
                                                                                              extra + tokens)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(windows, tokens, -1)))


def prompted_attention(block: SwinTransformerBlock, h: torch.Tensor, h_prompts: torch.Tensor,
                       key_values: tuple[torch.Tensor, torch.Tensor] | None = None):
    """timm's SwinTransformerBlock._attn on the normed map h (B, H, W, C) with the normed prompts (B, p, C) prepended
    to every window (and `key_values` before every window's keys and values: window_attention); returns (the map's
    output (B, H, W, C), the prompts' output averaged over each image's windows (B, p, C))."""
    batch, height, width, dim = h.shape
    p = h_prompts.shape[1]
    (win_h, win_w), shift = block.window_size, block.shift_size
    shifted = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else h
    pad_h, pad_w = (win_h - height % win_h) % win_h, (win_w - width % win_w) % win_w
    shifted = F.pad(shifted, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = shifted.shape[1:3]
    windows = window_partition(shifted, block.window_size).view(-1, block.window_area, dim)  # (B*nW, area, C)
    num_win = windows.shape[0] // batch
    prompt_rows = h_prompts.unsqueeze(1).expand(-1, num_win, -1, -1).reshape(batch * num_win, p, dim)  # b*nW + w
    mask = block.get_attn_mask(shifted) if block.dynamic_mask else block.attn_mask
    out = window_attention(block.attn, torch.cat([prompt_rows, windows], dim=1), mask, p, key_values)
    prompts_out = out[:, :p].reshape(batch, num_win, p, dim).mean(dim=1)  # over the image's own windows
    shifted = window_reverse(out[:, p:].reshape(-1, win_h, win_w, dim), block.window_size, padded_h, padded_w)
    shifted = shifted[:, :height, :width, :]
    return (torch.roll(shifted, shifts=shift, dims=(1, 2)) if any(shift) else shifted), prompts_out


def prompted_block(block: SwinTransformerBlock, x: torch.Tensor, prompts: torch.Tensor,
                   key_values: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One Swin block on the map x (B, H, W, C) and the prompts (B, p, C): [prompts, tokens] share the residual
    adds, norm2 and the MLP (PromptedSwinTransformerBlock.forward); `key_values` as in window_attention."""
    batch, height, width, dim = x.shape
    p = prompts.shape[1]
    attn_x, attn_prompts = prompted_attention(block, block.norm1(x), block.norm1(prompts), key_values)
    seq = torch.cat([prompts, x.reshape(batch, -1, dim)], dim=1)
    seq = seq + block.drop_path1(torch.cat([attn_prompts, attn_x.reshape(batch, -1, dim)], dim=1))
    seq = seq + block.drop_path2(block.mlp(block.norm2(seq)))
    return seq[:, p:].reshape(batch, height, width, dim), seq[:, :p]


def merge_prompts(downsample: nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    """PromptedPatchMerging's prompts: four copies side by side along channels, then the merge's norm and reduction
    (B, p, C) -> (B, p, 2C); a stage without a merge (timm's Identity at stage 0) passes them on."""
    if isinstance(downsample, nn.Identity):
        return prompts
    return downsample.reduction(downsample.norm(torch.cat([prompts] * 4, dim=-1)))


def forward_features(model, x: torch.Tensor) -> torch.Tensor:
    """The prompted Swin forward of a VisualPromptTuning `model` (its vpt_prompts from make_prompts, its
    dropped_prompts): the normed [prompts, tokens] as a (B, 1, p + H*W, C) map for timm's average-pool head."""
    return prompted_features(model.backbone, x, model.vpt_prompts, model.deep, model.dropped_prompts)


def prompted_features(backbone: SwinTransformer, x: torch.Tensor, stage_prompts: nn.ParameterList, deep: bool,
                      take: Callable[[torch.Tensor, int], torch.Tensor],
                      run_block: Callable[..., tuple[torch.Tensor, torch.Tensor]] = prompted_block) -> torch.Tensor:
    """The official prompted Swin forward: `stage_prompts` from make_prompts, `take(prompts (p, C), batch)` the set a
    block reads as (B or 1, p, C), `run_block(block, x, prompts)` one block (prompted_block, or a method's block whose
    forward adds to it); returns the normed [prompts, tokens] as a (B, 1, p + H*W, C) map for timm's average pool."""
    x = backbone.patch_embed(x)  # (B, H, W, C0), patch norm included
    batch, prompts = x.shape[0], None
    for stage_index, stage in enumerate(backbone.layers):
        x = stage.downsample(x)
        if prompts is not None and not deep:  # deep: this stage's first block replaces them
            prompts = merge_prompts(stage.downsample, prompts)
        checkpointing = stage.grad_checkpointing and torch.is_grad_enabled()
        for block_index, block in enumerate(stage.blocks):
            if deep or prompts is None:  # a fresh set replaces the previous block's prompt outputs
                prompts = take(stage_prompts[stage_index][block_index], batch).expand(batch, -1, -1)  # (B, p, C)
            if checkpointing:
                x, prompts = checkpoint(run_block, block, x, prompts, use_reentrant=False)
            else:
                x, prompts = run_block(block, x, prompts)
    x, prompts = backbone.norm(x), backbone.norm(prompts)
    return torch.cat([prompts, x.flatten(1, 2)], dim=1).unsqueeze(1)  # (B, 1, p + H*W, C)
