"""Full fine-tuning: every backbone parameter and the new head train (the paper's FULL baseline).

`dropout` is the VPT code's ViT config `dropout_rate` (0.1 in src/configs/vit_configs.py), which its full
fine-tuning ('end2end') trains with: in each MLP after the activation and after fc2, and after the position
embedding; its attention dropout is 0. Here it sets the same timm modules (`mlp.drop1`, `mlp.drop2`, `pos_drop`) and
leaves `attn.proj_drop` alone, which timm's `proj_drop_rate` would also set. The paper recipe uses 0.1.
On a ConvNet it does nothing: the VPT code fine-tunes its ResNets (torchvision) and ConvNeXts without dropout, and
the paper recipe's 0.1 is the ViT config's.
"""

from dataclasses import dataclass

from torch import nn

from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class FullOptions(Options):
    method = "full"
    dropout: float = option(0.0, "dropout in every ViT MLP (after the activation and after fc2) and after the position "
                            "embedding (VPT code: 0.1); none on ConvNets, as the VPT code's",
                            kind=float, low=0, high=1, high_open=True)


@register_method("full")
class FullFineTuning(TuningModule):
    label, color, paper_row, in_fig3 = "Full", "#4d4d4d", 0, True
    options_cls = FullOptions
    frozen_backbone = False
    families = ("vit", "swin", "convnet")

    def adapt(self) -> None:
        self.backbone.requires_grad_(True)
        if self.options.dropout and self.family.mlp:  # transformer MLPs only: a ConvNet's row names none
            self.set_dropout(float(self.options.dropout))

    def set_dropout(self, rate: float) -> None:
        backbone = self.backbone
        mlps = [block.get_submodule(self.family.mlp) for block in self.family.blocks(backbone)]
        if not all(isinstance(getattr(m, name, None), nn.Dropout) for m in mlps for name in ("drop1", "drop2")):
            raise ValueError(f"full dropout={rate} sets timm Mlp's drop1/drop2; this backbone's MLPs are "
                             f"{type(mlps[0]).__name__}. Use dropout=0 or a backbone with timm's Mlp.")
        for mlp in mlps:
            mlp.drop1.p = mlp.drop2.p = rate
        if hasattr(backbone, "pos_drop"):  # a timm Swin has no position embedding and no dropout after it
            backbone.pos_drop.p = rate
