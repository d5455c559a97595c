"""Linear probe: only the new head trains (the paper's LINEAR baseline).

The frozen backbone runs in eval mode under `torch.inference_mode`: no autograd graph and no saved
activations for it, so a linear-probe step costs one inference forward plus a matmul.

Everything before the head is a fixed function of the image, so its output (the pooled, normed
"pre-logits") can be computed once and cached (benchmark/core/features.py): `read_features(True)` makes the
module take those (B, D) features as input instead of images, and the head sees exactly the same values.
The head then trains with the ordinary Trainer on those tensors.
"""

from typing import ClassVar

import torch

from methods.base import TuningModule
from methods.registry import register_method


def no_autograd():
    """inference_mode, or no_grad inside torch.compile (which cannot trace inference mode): either way no graph
    and no saved activations for the frozen backbone."""
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()


@register_method("linear")
class LinearProbe(TuningModule):
    label, color, paper_row, in_fig3 = "Linear", "#1f77b4", 1, True
    families = ("vit", "swin", "convnet")
    trains_on_frozen_features: ClassVar[bool] = True  # a feature cache may stand in for the backbone
    inputs_are_features: bool = False

    def read_features(self, enabled: bool = True) -> None:
        """Take cached pre-logit features (B, D) as input instead of images (B, C, H, W)."""
        self.inputs_are_features = enabled

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: pooled, normed backbone features (B, D), without autograd."""
        with no_autograd():
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with no_autograd():
            features = self.backbone.forward_features(x)
        # An inference tensor cannot be saved for the head's backward; a clone outside the mode can.
        return features.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inputs_are_features:
            x = self.frozen_features(x).clone()  # clone: leaves inference mode so the head can save it
        elif x.ndim != 2 or x.shape[1] != self.backbone.num_features:
            raise ValueError(f"With read_features(True) the linear probe takes (batch, {self.backbone.num_features}) "
                             f"features, got shape {tuple(x.shape)}; pass images after read_features(False).")
        return self.backbone.get_classifier()(x)  # (B, C): ViT head, Swin/ConvNeXt head.fc, ResNet fc (after pooling)
