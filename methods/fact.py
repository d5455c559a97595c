"""FacT: Factor-Tuning (Jie & Deng, AAAI'23, https://arxiv.org/abs/2212.03145), both of its tensorisations, as the
official code computes them (github:JieShibo/PETL-ViT, FacT/fact_tt.py and FacT/fact_tk.py).

The updates of every block's q, k, v, o (the qkv and proj projections) and fc1, fc2 weights form one tensor and are
factorised with two factors U (D -> d) and V (d -> D) shared by all layers and weights:
    delta W x = s * V dropout(core(U x))
- `fact_tt` (tensor-train): a d x d core per weight and layer (q, k, v, o), d x 4d for fc1 and 4d x d for fc2
  (their 4D-wide side split into 4 chunks of D, each through U or V): 12 L d^2 + 2 D d parameters.
- `fact_tk` (Tucker): one shared core C (d, d, d) and factor P (d, 12 L); weight j's core is C x_3 P[:, j] (the code's
  `FacTc @ FacTp[:, idx:idx + n]`, 4 columns per attention, 8 per MLP, in forward order): d^3 + 12 L d + 2 D d.
Init as the code: U and the TT cores nn.Linear's default, V zero (so it starts as the pretrained function), C and P
Xavier-uniform. Dropout 0.1 on the core's output (the code's `dp`), trained modules only.

Defaults (the code has none: fact_tt.py / fact_tk.py read rank and scale per VTAB task from configs/tt|tk/*.yaml):
TT d = 8, s = 1 (cifar's config and PETL_Vision's default_vtab `fact_dim: 8, fact_scaler: 1.0`; 9 of the 19 TT
configs use rank 8, most with scale 1); TK d = 32, s = 10 (13 of the 19 TK configs use rank 32, 6 of them scale 10,
the most common). Ours: the updates are added to the outputs of the wrapped nn.Linear layers, so timm's attention
(fused) runs unchanged; the code replaces the Attention and Mlp forwards with the same sums.

ViT only: U and V are shared by every layer of the network, so all its weights must have one width D; a Swin's width
doubles at every stage (and neither the official code nor PETL_Vision / V-PETL Bench factorises a Swin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import TuningModule
from methods.options import Options, drop_path_option, option
from methods.registry import register_method

SITES_PER_BLOCK = 12  # q, k, v, o, then fc1 and fc2 as 4 chunks each: the code's 4 + 8 columns of P per block


@dataclass
class FacTTTOptions(Options):
    method = "FacT"
    dim: int = option(8, "factor rank d (official VTAB configs: 4-16; cifar 8)", kind=int, positive=True,
                      hint="the factor rank d, e.g. 8")
    scale: float = option(1.0, "s, the update's scale (official configs: 0.01-100)", kind=float, positive=True,
                          hint="the code's s: 0.01-100")
    dropout: float = option(0.1, "dropout on the core's output (official: 0.1)", kind=float, low=0, high=1,
                            high_open=True)
    drop_path: float = drop_path_option()


@dataclass
class FacTTKOptions(FacTTTOptions):
    """FacT-TT's options with FacT-TK's official defaults (the rank and the scale); the dropout and drop-path too."""

    dim: int = option(32, "factor rank d (official VTAB configs: 16 or 32)", kind=int, positive=True,
                      hint="the factor rank d, e.g. 8")
    scale: float = option(10.0, "s, the update's scale (official configs: 0.01-100)", kind=float, positive=True,
                          hint="the code's s: 0.01-100")


class FacTFactors(nn.Module):
    """What all layers share: U, V and, for Tucker, the core C and factor P (the code's FacTu/v/c/p on the ViT)."""

    def __init__(self, embed_dim: int, dim: int, depth: int, tucker: bool, device=None):
        super().__init__()
        self.u = nn.Linear(embed_dim, dim, bias=False, device=device)
        self.v = nn.Linear(dim, embed_dim, bias=False, device=device)
        nn.init.zeros_(self.v.weight)
        if tucker:
            self.core = nn.Parameter(torch.empty(dim, dim, dim, device=device))
            self.p = nn.Parameter(torch.empty(dim, SITES_PER_BLOCK * depth, device=device))
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.p)

    def tucker_cores(self, start: int, count: int) -> torch.Tensor:
        return self.core @ self.p[:, start:start + count]  # (d, d, count)


class FacTLinear(nn.Module):
    """A frozen nn.Linear (qkv, proj, fc1 or fc2) plus its FacT update. Keeps the wrapped layer's `weight` and
    `bias` under their own names; the shared factors are referenced, not registered here (they live on the
    backbone as `fact`), so each appears once in the state dict."""

    def __init__(self, base: nn.Linear, site: str, factors: FacTFactors, dim: int, scale: float, dropout: float,
                 column: int | None):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the same frozen Parameter objects
        self.site, self.dim, self.scale = site, dim, scale
        self.shared = (factors,)  # a tuple: not a submodule
        self.dropout = nn.Dropout(dropout)
        self.column = column  # Tucker: this weight's first column of P; None: tensor-train cores of its own
        device = base.weight.device
        if column is None:
            if site == "qkv":
                self.fact_q, self.fact_k, self.fact_v = (nn.Linear(dim, dim, bias=False, device=device)
                                                         for _ in range(3))
            elif site == "proj":
                self.fact_o = nn.Linear(dim, dim, bias=False, device=device)
            elif site == "fc1":
                self.fact_t = nn.Linear(dim, 4 * dim, bias=False, device=device)
            else:
                self.fact_t = nn.Linear(4 * dim, dim, bias=False, device=device)

    def cores(self, count: int) -> torch.Tensor:
        return self.shared[0].tucker_cores(self.column, count)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * V dropout(core(U x)), per the code's fact_forward_attn / fact_forward_mlp."""
        factors, d = self.shared[0], self.dim
        u, v = factors.u, factors.v
        tucker = self.column is not None
        if self.site == "qkv":
            ux = u(x)
            if tucker:
                c = self.cores(3)
                parts = [ux @ c[:, :, j] for j in range(3)]
            else:
                parts = [self.fact_q(ux), self.fact_k(ux), self.fact_v(ux)]
            return torch.cat([v(self.dropout(t)) for t in parts], dim=-1) * self.scale
        if self.site == "proj":
            ux = u(x)
            t = ux @ self.cores(1)[:, :, 0] if tucker else self.fact_o(ux)
            return v(self.dropout(t)) * self.scale
        lead = x.shape[:-1]
        if self.site == "fc1":  # (.., D) -> 4d -> 4 chunks of d, each through V -> (.., 4D)
            ux = u(x)
            t = ux @ self.cores(4).reshape(d, 4 * d) if tucker else self.fact_t(ux)
            return v(self.dropout(t).reshape(*lead, 4, d)).reshape(*lead, -1) * self.scale
        # fc2: (.., 4D) as 4 chunks of D, each through U -> 4d -> d -> V -> (.., D)
        ux = u(x.reshape(*lead, 4, x.shape[-1] // 4)).reshape(*lead, 4 * d)
        t = ux @ self.cores(4).reshape(d, 4 * d).t() if tucker else self.fact_t(ux)
        return v(self.dropout(t)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    def extra_repr(self) -> str:
        return f"site={self.site}, dim={self.dim}, scale={self.scale:g}, tucker={self.column is not None}"


class FacTTuning(TuningModule):
    tucker = False

    def adapt(self) -> None:
        backbone, opts = self.backbone, self.options
        width, depth = backbone.embed_dim, len(backbone.blocks)
        for block in backbone.blocks:
            attn, mlp = block.attn, block.mlp
            shapes = [(getattr(m, "in_features", None), getattr(m, "out_features", None))
                      for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)]
            if shapes != [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)] or not all(
                    isinstance(m, nn.Linear) for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)):
                raise ValueError(f"FacT factorises nn.Linear qkv (D -> 3D), proj (D -> D), fc1 (D -> 4D) and fc2 "
                                 f"(4D -> D) with D = {width}; this backbone's are {shapes}.")
        device = backbone.patch_embed.proj.weight.device
        backbone.fact = FacTFactors(width, opts.dim, depth, self.tucker, device)  # new parameters: trainable
        for i, block in enumerate(backbone.blocks):
            first = SITES_PER_BLOCK * i  # P's columns of block i: q k v o, then fc1 x4, fc2 x4 (Tucker only)

            def wrap(layer, site, column):
                return FacTLinear(layer, site, backbone.fact, opts.dim, float(opts.scale), float(opts.dropout),
                                  column if self.tucker else None)

            block.attn.qkv = wrap(block.attn.qkv, "qkv", first)
            block.attn.proj = wrap(block.attn.proj, "proj", first + 3)
            block.mlp.fc1 = wrap(block.mlp.fc1, "fc1", first + 4)
            block.mlp.fc2 = wrap(block.mlp.fc2, "fc2", first + 8)
        if opts.drop_path:
            self.family.set_drop_path(backbone, opts.drop_path)  # on the whole branch, frozen part and update alike

    def fact_layers(self) -> list[FacTLinear]:
        return [m for m in self.modules() if isinstance(m, FacTLinear)]


@register_method("fact_tt")
class FacTTensorTrain(FacTTuning):
    label, color = "FacT-TT", "#9467bd"
    options_cls = FacTTTOptions


@register_method("fact_tk")
class FacTTucker(FacTTuning):
    label, color = "FacT-TK", "#c5b0d5"
    options_cls = FacTTKOptions
    tucker = True
