"""Visual Fourier Prompt Tuning, VFPT (Zeng et al., NeurIPS 2024, https://arxiv.org/abs/2411.01327): VPT-deep whose
first m = floor(alpha * p) prompts of every layer enter through a 2-D Fourier transform, real part kept:

    P_i = [Re(FFT_seq(FFT_hidden(P_i[:m]))), P_i[m:]]          then VPT-deep (methods/vpt.py) with P_i

Follows the official code (github.com/runtsang/VFPT, src/models/vit_prompt/vit_VFPT.py `PromptedTransformer_Fourier`
and `FNetBlock`, src/configs/config.py's MODEL.PROMPT_FOURIER defaults; src/models/vit_backbones/
swin_transformer_fourier.py for the Swin):
- the transform: `torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real`, over the hidden dimension, then over the
  m Fourier prompts of the layer (FOURIER_DIMENSION "all", FOURIER_TYPE "fft"); it has no parameters.
- alpha, the Fourier share of each layer's prompts: 0.5 (FOURIER_PERCENTAGE's default; the README's example runs 1.0,
  the paper searches it per task). floor(alpha * p) as the code computes it; alpha = 0 is plain VPT-deep.
- the Fourier prompts go first, before the plain ones (FOURIER_LOCATION "prepend"), in every layer, the first
  included (FOURIER_FIRST_LAYER true); attention reads prompts in any order alike, so the order changes nothing.
- the transform runs after prompt dropout (the code's `FT(prompt_dropout(prompt_proj(...)))`).
- everything else is VPT-deep's, on ViTs and Swins (the VFPT code builds on the VPT code): prompt init, dropout (0.1
  for deep), p (None = 50 on a ViT), where the prompts sit, the Swin path (methods/swin_prompts.py).
The transform runs in float32 (torch.fft has no bfloat16 kernels) and is cast back.

Tuned parameters are VPT-deep's: on ViT-B/16 (D = 768, 12 blocks) with 200 classes, 12 * p * 768 + (768*200 + 200);
p = 10: 245,960.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.options import option
from methods.registry import register_method
from methods.vpt import VisualPromptTuning, VPTOptions


@dataclass
class VFPTOptions(VPTOptions):
    method = "vfpt"
    fourier_share: float = option(0.5, "alpha: share of each layer's prompts that enter through the 2-D FFT (the "
                                  "code's FOURIER_PERCENTAGE: 0.5; its README runs 1.0)", kind=float, low=0, high=1)


def fourier(prompts: torch.Tensor) -> torch.Tensor:
    """The code's FNetBlock: the real part of the FFT over the hidden dimension, then over the prompts. (.., m, D)"""
    spectrum = torch.fft.fft(torch.fft.fft(prompts.float(), dim=-1), dim=-2)
    return spectrum.real.to(prompts.dtype)


@register_method("vfpt")
class VFPTTuning(VisualPromptTuning):
    label, color = "VFPT", "#ad494a"
    options_cls = VFPTOptions
    deep = True
    families = ("vit", "swin")

    def fourier_prompts(self) -> int:
        """m: the prompts of each layer that pass the transform, floor(alpha * p) as the code rounds."""
        return math.floor(self.prompt_length * self.options.fourier_share)

    def dropped_prompts(self, prompts: torch.Tensor, batch: int) -> torch.Tensor:
        """VPT-deep's prompts of one layer (1 or B, p, D), the first m through the Fourier transform."""
        prompts = super().dropped_prompts(prompts, batch)
        m = self.fourier_prompts()
        if m == 0:
            return prompts
        return torch.cat([fourier(prompts[:, :m]), prompts[:, m:]], dim=1)
