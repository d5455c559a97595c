"""LayerNorm tuning: every LayerNorm's weight and bias of the backbone trains, plus the new head.

The LN baseline of PETL_Vision (Mai et al., ICLR'25, https://arxiv.org/abs/2409.16434; github:OSU-MLB/PETL_Vision,
experiment/build_model.py trains every parameter whose name contains "norm") and of V-PETL Bench (Xin et al.,
NeurIPS'24 Datasets & Benchmarks; github:synbol/Parameter-Efficient-Transfer-Learning-Benchmark, "LNTUNE").
Ours selects by type (every nn.LayerNorm, timm's included) instead of by name, which picks the same
tensors on a timm ViT (norm1, norm2 of every block, the final norm, and fc_norm / qk-norms where a backbone has
them). Nothing is added, so it starts as the pretrained function.

On a Swin the same rule picks the patch embedding's norm, norm1 and norm2 of every block of every stage, each patch
merge's norm (over 4C) and the final norm: the tensors V-PETL Bench's "norm"-in-name filter selects on its Swin
(train_model_lntune.py's swin branch); PETL_Vision builds ViTs only.
"""

from torch import nn

from methods.base import TuningModule
from methods.registry import register_method


@register_method("ln_tune")
class LayerNormTuning(TuningModule):
    label, color = "LN-tune", "#98df8a"
    families = ("vit", "swin")

    def adapt(self) -> None:
        norms = [m for m in self.backbone.modules() if isinstance(m, nn.LayerNorm)]
        if not norms:
            raise ValueError("ln_tune trains the backbone's LayerNorms; this backbone has none.")
        for norm in norms:
            norm.requires_grad_(True)
