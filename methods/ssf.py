"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS'22, https://arxiv.org/abs/2210.08823).

A per-channel affine map y = gamma * x + beta follows every operation the official code
(github:dongzelian/SSF, models/vision_transformer.py, `ssf_ada`) follows with one: the patch embedding's
projection, and in every block norm1, attn.qkv, attn.proj, norm2, mlp.fc1 and mlp.fc2, then the final norm (and
the patch embedding's norm where a backbone has one, as that code does). Only gamma, beta and the new head train
(the code's TUNE filter: `ssf_scale*`, `ssf_shift*`, head). For ViT-B/16: 2 * (D + 12 * 11 * D + D) = 205,824.

On a Swin, the official code's own Swin (models/swin_transformer.py, tuning_mode "ssf"): the patch projection and
its norm, the same six sites in every block of every stage (each of its block's width: 3C after qkv, 4C after fc1),
each patch merge's norm (4C, before its reduction: PatchMerging's `ssf_scale_1`) and the final norm. The sites that
sit inside window attention (qkv, proj) act per token, so timm's zero padding of a map the window does not divide
meets the same affine map merged or not.

Initialisation, the official `init_ssf_scale_shift`: gamma ~ N(1, 0.02), beta ~ N(0, 0.02), per channel. So SSF
does NOT start exactly as the pretrained function (every feature is perturbed by ~2% before any step):
`identity_at_init = False`. `init_std=0` (ours, not the code's) gives the exact identity start.

Re-parameterisation (the paper's, for inference): each gamma, beta folds into the layer before it,
W' = diag(gamma) W, b' = gamma * b + beta (for a LayerNorm: its weight and bias alike; for the patch convolution
per output channel). `merge_for_eval` evaluates with such folded copies: separate tensors, never written into the
pretrained W and b, which stay bit-identical (the discipline of methods/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backbones import Family
from methods.base import MergeForEvalTuning
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class SSFOptions(Options):
    init_std: float = option(0.02, "std of the init gamma ~ N(1, s), beta ~ N(0, s) (official code: 0.02; 0 starts "
                             "exactly as the pretrained function)", kind=float, low=0, high=1, hint="official: 0.02")
    merge_for_eval: bool = option(True, "evaluate with gamma, beta folded into copies of the preceding weights (same "
                                  "outputs, faster); the pretrained weights themselves are never changed", kind=bool)


class ScaleShift(nn.Module):
    """A frozen Linear, LayerNorm or Conv2d followed by a trainable per-channel gamma * y + beta (on the last dim;
    on dim 1 for the convolution's NCHW output). It holds the wrapped layer's `weight` and `bias` Parameters under
    their own names, so the backbone's state-dict keys are unchanged (SSF adds `ssf_scale`, `ssf_shift`)."""

    def __init__(self, base: nn.Module, init_std: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.kind, channels = "linear", base.out_features
        elif isinstance(base, nn.LayerNorm):
            self.kind, channels = "layernorm", base.normalized_shape[-1]
            if len(base.normalized_shape) != 1:
                raise ValueError(f"SSF folds into a LayerNorm over one dim, got shape {base.normalized_shape}.")
            self.normalized_shape, self.eps = tuple(base.normalized_shape), base.eps
        elif isinstance(base, nn.Conv2d):
            if base.padding_mode != "zeros":
                raise ValueError(f"SSF wraps zero-padded convolutions, got padding_mode={base.padding_mode!r}.")
            self.kind, channels = "conv", base.out_channels
            self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        else:
            raise ValueError(f"SSF scales the output of a Linear, LayerNorm or Conv2d, got {type(base).__name__}.")
        if base.weight is None:
            raise ValueError(f"SSF folds into the {type(base).__name__}'s weight; this one has none.")
        self.weight = base.weight  # the same Parameter objects: frozen, never written to
        self.bias = base.bias
        device = base.weight.device
        self.ssf_scale = nn.Parameter(torch.ones(channels, device=device))
        self.ssf_shift = nn.Parameter(torch.zeros(channels, device=device))
        nn.init.normal_(self.ssf_scale, mean=1.0, std=init_std)  # official init_ssf_scale_shift
        nn.init.normal_(self.ssf_shift, mean=0.0, std=init_std)
        self.merged: tuple[torch.Tensor, torch.Tensor] | None = None

    def layer(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "layernorm":
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.conv2d(x, weight, bias, **self.conv_args)

    def channel_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1, 1) if self.kind == "conv" else t  # NCHW: channels on dim 1

    def merge(self) -> None:
        """gamma * (W x + b) + beta = (diag(gamma) W) x + (gamma * b + beta), in copies of W and b."""
        with torch.no_grad():
            scale = self.ssf_scale.to(self.weight.dtype)
            shift = self.ssf_shift.to(self.weight.dtype)
            weight = self.weight * (scale.view(-1, *[1] * (self.weight.dim() - 1)))  # row o of W times gamma_o
            bias = shift if self.bias is None else self.bias * scale + shift
            self.merged = (weight, bias)

    def unmerge(self) -> None:
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return self.layer(x, *self.merged)
        y = self.layer(x, self.weight, self.bias)
        return y * self.channel_view(self.ssf_scale) + self.channel_view(self.ssf_shift)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, channels={self.ssf_scale.numel()}, merged={self.merged is not None}"


def ssf_sites(backbone: nn.Module, family: Family) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every layer SSF follows, in forward order (the official code's placement)."""
    sites = [(backbone.patch_embed, "proj")]
    if isinstance(backbone.patch_embed.norm, nn.LayerNorm):  # the code's PatchEmbed ssf_2, only with a norm
        sites.append((backbone.patch_embed, "norm"))
    pre_attention, pre_mlp = family.norms
    for kind, module in family.blocks_and_merges(backbone):  # a ViT has no merges; a Swin's stage 0 has Identity
        if kind == "merge":
            if isinstance(getattr(module, "norm", None), nn.LayerNorm):
                sites.append((module, "norm"))  # the official PatchMerging's ssf after its norm, over 4C
            continue
        attention, mlp = module.get_submodule(family.attention), module.get_submodule(family.mlp)
        sites += [(module, pre_attention), *((attention, name) for name in family.attention_linears),
                  (module, pre_mlp), *((mlp, name) for name in family.mlp_linears)]
    # after the final norm, as the SSF code; a mean-pooled ViT (MAE) has that norm as `fc_norm` after the pool
    pooled_norm = isinstance(backbone.norm, nn.Identity) and isinstance(backbone.fc_norm, nn.LayerNorm)
    final = "fc_norm" if pooled_norm else "norm"
    sites.append((backbone, final))
    return sites


@register_method("ssf")
class SSFTuning(MergeForEvalTuning):
    label, color = "SSF", "#2ca02c"
    options_cls = SSFOptions
    identity_at_init = False  # gamma ~ N(1, 0.02), beta ~ N(0, 0.02): near, not at, the pretrained function
    families = ("vit", "swin")

    def adapt(self) -> None:
        for parent, name in ssf_sites(self.backbone, self.family):
            base = getattr(parent, name)
            if isinstance(base, nn.Identity):
                raise ValueError(f"SSF follows {type(parent).__name__}.{name}, which this backbone leaves as "
                                 f"Identity ); SSF needs a final LayerNorm (norm, or fc_norm after a mean pool).")
            setattr(parent, name, ScaleShift(base, float(self.options.init_std)))  # ssf_* are trainable

    def ssf_layers(self) -> list[ScaleShift]:
        return [m for m in self.modules() if isinstance(m, ScaleShift)]

    mergeable_layers = ssf_layers
