"""Side-tuning (Zhang et al., 2020, https://arxiv.org/abs/1912.13503) as VPT's Table 1 runs it (the SIDETUNE row of
Jia et al., 2022, https://arxiv.org/abs/2203.12119; github.com/KMnP/vpt, src/models/vit_models.py `setup_side` and
`forward`, TRANSFER_TYPE "side").

    f    = the frozen backbone's pooled feature, the one the head would read     (B, D)
    s    = side_projection(flatten(avgpool(alexnet_features(image))))           (B, D), 9216 -> D, no bias
    a    = sigmoid(side_alpha)
    logits = head(a * f + (1 - a) * s)

What trains: the side network (torchvision AlexNet's `features`, conv layers with biases, and its `avgpool`, which has
no parameters), the projection, the scalar alpha and the head; the backbone is frozen (the VPT code groups "side" with
"linear" when it freezes the encoder). Each choice is the VPT code's unless noted:
- alpha starts at 0, so the blend starts at one half each: the method does NOT start from the pretrained function.
- the side network reads the same normalised images as the backbone.
- side weights: the VPT code loads torchvision's ImageNet AlexNet (`pretrained=True`). Offline nothing can be fetched,
  so ours start from torchvision's own random init unless `side_pretrained=true` (torchvision's hub weights; where
  they cannot be fetched the run stops and names `side_weights`) or `side_weights=<file>` (a local torchvision AlexNet
  state dict, its `features.*` entries) says otherwise. The embedded default therefore trains a random-init side
  network: ours, for want of weights, not the paper's.
- the side network's input: AlexNet needs 3 channels and at least 63 px (below that its last max-pool has nothing to
  pool). Ours resizes the images (bilinear) to `side_input_size` (default 224, AlexNet's and the VPT code's input on
  its 224 px ViTs, where nothing is resized) and repeats a grey image's channel 3 times. Both are ours; the VPT code
  has only RGB 224 px inputs. The quick recipe uses 64 px on the embedded 28 px images (recipe comment).
- the frozen backbone runs without autograd (nothing in it or before it trains), as the linear probe's does; but the
  side path depends on the image and trains, so no feature cache of backbone features may stand in for the input
  (`trains_on_frozen_features = False`: benchmark/core/features.py `can_cache`, benchmark/sweeps/heads.py).
- on a Swin, the VPT code's too: its `Swin` model class inherits the ViT's `setup_side` and freezes the encoder for
  "side", so f is the Swin's pooled final-norm feature (width 1024 on Swin-B) and the projection maps 9216 to it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import TuningModule
from methods.linear import no_autograd
from methods.options import Options, option
from methods.registry import register_method

SIDE_MIN_SIZE = 63  # AlexNet features: 63 px -> 15 -> 7 -> 3 -> 1; 62 px leaves the last max-pool an empty map
SIDE_MAX_SIZE = 1024
SIDE_CHANNELS = 256 * 6 * 6  # AlexNet features' 256 maps, adaptive-average-pooled to 6 x 6: the VPT code's 9216


@dataclass
class SidetuneOptions(Options):
    method = "sidetune"
    side_input_size: int = option(224, f"images are resized (bilinear) to this square size for the side network, "
                                  f"{SIDE_MIN_SIZE}..{SIDE_MAX_SIZE} (AlexNet's 224; ours: the VPT code feeds its 224 "
                                  f"px input unresized)", kind=int, low=SIDE_MIN_SIZE, high=SIDE_MAX_SIZE,
                                  hint=f"AlexNet needs at least {SIDE_MIN_SIZE} px")
    side_pretrained: bool = option(False, "start the side network from torchvision's ImageNet AlexNet (the VPT code's; "
                                   "needs the download or torch's hub cache)", kind=bool)
    side_weights: str | Path | None = option(None, "a local torchvision AlexNet state-dict file (.pth) whose "
                                             "features.* start the side network", kind=Path,
                                             hint="a torchvision AlexNet state dict, .pth")

    def __post_init__(self):
        super().__post_init__()
        if self.side_pretrained and self.side_weights is not None:  # a rule joining two fields
            raise ValueError("sidetune takes side_pretrained=true or side_weights=<file>, not both.")


def alexnet_side() -> nn.Sequential:
    """The VPT code's side network: torchvision AlexNet's `features` and `avgpool`, under the same names."""
    from torchvision.models import alexnet

    model = alexnet()
    return nn.Sequential(OrderedDict([("features", model.features), ("avgpool", model.avgpool)]))


def load_side_weights(side: nn.Sequential, path: str | Path) -> None:
    """Load the `features.*` entries of a torchvision AlexNet state dict (a whole model's or the features' only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sidetune side_weights {str(path)!r} does not exist; pass a torchvision AlexNet "
                                "state-dict file (torch.save(torchvision.models.alexnet(...).state_dict(), path)).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any unreadable file (pickle, zip, truncation) gets the same one line
        raise ValueError(f"sidetune side_weights {str(path)!r} is not a readable torch state dict: "
                         f"{type(err).__name__}: {str(err)[:200]}") from err
    if not isinstance(state, dict):
        raise ValueError(f"sidetune side_weights {str(path)!r} holds a {type(state).__name__}, not a state dict.")
    features = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    try:
        side.load_state_dict(features, strict=True)
    except RuntimeError as err:  # missing / unexpected keys or wrong shapes
        raise ValueError(f"sidetune side_weights {str(path)!r} is not a torchvision AlexNet state dict (its "
                         f"features.* entries do not fit): {' '.join(str(err).split())[:300]}") from err


def load_side_pretrained(side: nn.Sequential) -> None:
    """torchvision's ImageNet AlexNet weights (the VPT code's `models.alexnet(pretrained=True)`)."""
    from torchvision.models import AlexNet_Weights

    try:
        state = AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 — offline: URLError, socket or HTTP errors, whatever the hub raises
        raise OSError(f"sidetune side_pretrained: torchvision's AlexNet weights could not be fetched "
                      f"({type(err).__name__}: {str(err)[:120]}); pass a local file with side_weights=<path>.") from err
    side.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")}, strict=True)


@register_method("sidetune")
class Sidetune(TuningModule):
    label, color, paper_row = "Sidetune", "#aec7e8", 4
    options_cls = SidetuneOptions
    identity_at_init = False  # the VPT code's alpha = 0 blends half backbone, half side network from the start
    # The side path reads the image and trains: cached backbone features alone cannot stand in for the input.
    trains_on_frozen_features: ClassVar[bool] = False
    families = ("vit", "swin")

    def adapt(self) -> None:
        backbone = self.backbone
        in_chans = backbone.patch_embed.proj.in_channels
        if in_chans not in (1, 3):
            raise ValueError(f"sidetune's AlexNet side network reads RGB (or grey, repeated) images; this backbone "
                             f"takes {in_chans} channels.")
        self.side_alpha = nn.Parameter(torch.tensor(0.0))
        self.side = alexnet_side()
        if self.options.side_weights is not None:
            load_side_weights(self.side, self.options.side_weights)
        elif self.options.side_pretrained:
            load_side_pretrained(self.side)
        self.side_projection = nn.Linear(SIDE_CHANNELS, backbone.num_features, bias=False)

    def side_input(self, x: torch.Tensor) -> torch.Tensor:
        """The images as the side network takes them: `side_input_size` px square, 3 channels."""
        size = self.options.side_input_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey: the same map in every channel

    def side_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.side_projection(self.side(self.side_input(x)).flatten(1))  # (B, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with no_autograd():  # the frozen backbone: nothing in it or before it trains
            features = self.backbone.forward_features(x)
        return features.clone()  # leaves inference mode, so the blend can be saved for backward

    def blended(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: sigmoid(alpha) * backbone feature + (1 - sigmoid(alpha)) * side feature, (B, D)."""
        pooled = self.backbone.forward_head(self.forward_features(x), pre_logits=True)
        alpha = torch.sigmoid(self.side_alpha)
        return alpha * pooled + (1 - alpha) * self.side_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_classifier()(self.blended(x))  # (B, C)
