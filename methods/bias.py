"""Bias tuning, BitFit (Ben Zaken et al., 2022, https://arxiv.org/abs/2106.10199).

Every bias term of the backbone trains — attention qkv/proj, MLP fc1/fc2, patch embedding and the
LayerNorm biases (the paper's BIAS row counts those too) — plus the new head.

On a Swin the same bias terms train (qkv/proj/fc1/fc2, norms, patch embedding, the merges' norms) and the
relative-position bias tables stay frozen: they are a learned position encoding, not bias terms. The VPT code's
Swin BIAS tunes every parameter whose name contains "bias" (`'bias' not in k`), which takes those tables in too
(169 x heads per block on a 7x7 window; 63,544 on Swin-B); ours, so BitFit means the same on every family.

On a ConvNet the same rule (the VPT code's "tinytl-bias" on ResNet/ConvNeXt: every parameter named bias): ResNet's
BatchNorm biases (its convs have none), ConvNeXt's conv, LayerNorm and MLP biases.
"""

from methods.base import TuningModule
from methods.registry import register_method


@register_method("bias")
class BiasTuning(TuningModule):
    label, color, paper_row, in_fig3 = "Bias", "#ff7f0e", 5, True
    families = ("vit", "swin", "convnet")  # ConvNets: norm biases, and conv biases where they have them

    def adapt(self) -> None:
        for name, param in self.backbone.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
