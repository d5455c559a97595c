"""ViT-B/16 on CUB-200 by formula, and pieces of a timm ViT's forward written out by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmark.params import count_params

D, C, DEPTH = 768, 200, 12  # ViT-B/16, CUB-200's classes
HEAD = D * C + C


def vit_b_tuned(method: str, **options) -> int:
    """Tuned parameters (head included) of `method` on vit_base_patch16_224 with 200 classes (meta device)."""
    given = [(f"{method}.{k}", v) for k, v in options.items()]
    return int(count_params("vit_base_patch16_224", C, [method], given).loc[0, "tuned_params"])


def embed(backbone, images: torch.Tensor) -> torch.Tensor:
    """Patch projection, then [CLS, registers, patches] with the position embedding (timm's two conventions)."""
    x = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, N, D)
    prefix = [t.expand(len(images), -1, -1) for t in (backbone.cls_token, backbone.reg_token) if t is not None]
    if backbone.no_embed_class:  # position embedding on the patches only
        return torch.cat([*prefix, x + backbone.pos_embed], dim=1)
    return torch.cat([*prefix, x], dim=1) + backbone.pos_embed


def block_inputs(model, images) -> list[torch.Tensor]:
    """Each block's input as [prefix, prompts, patches]; a key/value-only block (VPT-deep) takes its prompts beside
    the sequence, and they are put in the place the paper gives them."""
    prefix, seen = model.backbone.num_prefix_tokens, []

    def capture(_module, args, kwargs):
        x, prompts = args[0], kwargs.get("prompts")
        if prompts is not None:
            x = torch.cat([x[:, :prefix], prompts.expand(len(x), -1, -1), x[:, prefix:]], dim=1)
        seen.append(x.detach().clone())

    handles = [block.register_forward_pre_hook(capture, with_kwargs=True) for block in model.backbone.blocks]
    model(images)
    for handle in handles:
        handle.remove()
    return seen


def rep_adapter(a, h: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """RepAdapter's A(h) = h + s * up(down(h)), `up` group-wise: output group g reads hidden group g only."""
    z = F.linear(h, a.down.weight, a.down.bias)  # (..., hidden)
    hidden_per_group, out_per_group = z.shape[-1] // groups, a.up.weight.shape[0] // groups
    parts = [z[..., g * hidden_per_group:(g + 1) * hidden_per_group]
             @ a.up.weight[g * out_per_group:(g + 1) * out_per_group].T for g in range(groups)]
    return h + scale * (torch.cat(parts, dim=-1) + a.up.bias)
