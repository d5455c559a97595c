"""Linear probe: only the new head trains (the paper's LINEAR baseline).

The frozen backbone runs in eval mode under `torch.inference_mode`: no autograd graph and no saved
activations for it, so a linear-probe step costs one inference forward plus a matmul.
"""

import torch

from methods.base import TuningModule
from methods.registry import register_method


@register_method("linear")
class LinearProbe(TuningModule):
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen features: dropout / drop-path stay off even while the head trains
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            features = self.backbone.forward_features(x)
        # An inference tensor cannot be saved for the head's backward; a clone outside the mode can.
        return features.clone()
