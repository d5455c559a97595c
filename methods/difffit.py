"""DiffFit (Xie et al., ICCV'23, https://arxiv.org/abs/2304.06648) for ViT classification, as PETL_Vision implements it
(github:OSU-MLB/PETL_Vision: model/block.py `difffit_gamma1/2`, experiment/build_model.py's TUNE filter).

Trains every bias and every LayerNorm (weight and bias) of the backbone, the new head, and per block two learnable
per-channel scale factors that multiply the attention and the MLP branch outputs before their residual adds:
    x = x + gamma1 * attn(norm1(x));  x = x + gamma2 * mlp(norm2(x)),   gamma1 = gamma2 = 1 at init
so it starts as the pretrained function. DiffFit's own code targets DiT (diffusion), where it also trains the class
embedding; a classifier ViT has none, and PETL_Vision trains exactly the tensors above. Ours selects norms by type
(nn.LayerNorm) where PETL_Vision matches "norm" in the name: the same tensors on a timm ViT. The scale sits where the
block's LayerScale (ls1 / ls2, Identity on ViT-B) is, which commutes with drop-path (a per-sample multiplier), so it
equals PETL_Vision's gamma * drop_path(ls(branch)).

On a Swin (ours: PETL_Vision and DiffFit's code have none): the same tensors, by the same rules, in every block of
every stage, each gamma of its block's width, on the window-attention and MLP branches before their residual adds
(a Swin block has no LayerScale: the scales are `ls1` / `ls2` of their own). The biases include the patch merges'
norms (their reductions have none); the relative-position bias tables are not biases by name (`..._bias_table`),
so they stay frozen, as for `bias`. Swin-B, 200 classes: sum over blocks of 15 C (9 C biases, 4 C norm values,
2 C gammas) + 384 (patch projection bias, its norm) + 7,168 (merge norms) + 2,048 (final norm) + head = 395,080.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import LayerScale
from torch import nn

from methods.base import TuningModule
from methods.registry import register_method


class BranchScale(nn.Module):
    """A block's LayerScale (or Identity) followed by DiffFit's trainable per-channel gamma. A pretrained LayerScale
    stays frozen, its `gamma` under the same name, so the backbone's state-dict keys are unchanged."""

    def __init__(self, layer_scale: nn.Module, dim: int, device=None):
        super().__init__()
        if isinstance(layer_scale, LayerScale):
            self.gamma = layer_scale.gamma  # the same frozen Parameter
        elif not isinstance(layer_scale, nn.Identity):
            raise ValueError(f"DiffFit scales a block branch after its LayerScale or Identity, got "
                             f"{type(layer_scale).__name__}.")
        self.difffit_gamma = nn.Parameter(torch.ones(dim, device=device))  # PETL_Vision: torch.ones(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gamma"):
            x = x * self.gamma
        return x * self.difffit_gamma


class DiffFitSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock with DiffFit's scales on its two branches: x + gamma1 * attn(norm1(x)), then
    x + gamma2 * mlp(norm2(x)) (a ViT Block's ls1 / ls2 places)."""

    ls1: BranchScale
    ls2: BranchScale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        x = (x + self.drop_path1(self.ls1(self._attn(self.norm1(x))))).reshape(batch, -1, dim)
        return (x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))).reshape(batch, height, width, dim)


@register_method("difffit")
class DiffFitTuning(TuningModule):
    label, color = "DiffFit", "#dbdb8d"
    families = ("vit", "swin")

    def adapt(self) -> None:
        for name, param in self.backbone.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
        for module in self.backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
        family = self.family
        # a ViT block has LayerScale slots (ls1, ls2) for the scales; a Swin block has none and needs a forward of its
        # own: the placement differs per family, so this stays a branch
        if family.name == "swin":
            for block in family.plain_blocks(self.backbone, "difffit"):  # DiffFitSwinBlock mirrors the plain block only
                dim, device = family.width_of(block), block.norm1.weight.device
                block.ls1, block.ls2 = BranchScale(nn.Identity(), dim, device), BranchScale(nn.Identity(), dim, device)
                block.__class__ = DiffFitSwinBlock
            return
        dim = self.backbone.embed_dim
        device = self.backbone.cls_token.device if self.backbone.cls_token is not None else None
        for block in self.backbone.blocks:
            block.ls1 = BranchScale(block.ls1, dim, device)  # new difffit_gamma trainable
            block.ls2 = BranchScale(block.ls2, dim, device)

    def branch_scales(self) -> list[BranchScale]:
        return [m for m in self.modules() if isinstance(m, BranchScale)]
