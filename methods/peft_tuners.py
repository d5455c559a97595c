"""Hugging Face peft's tuners on the timm ViT: DoRA, IA3, LoHa, LoKr, VeRA, BOFT and FourierFT, in one bridge.

peft (https://github.com/huggingface/peft; tested with peft 0.22.0) implements every tuner here; this file only
says which of the backbone's linears each one adapts, with which hyper-parameters, and checks the options. peft
replaces each targeted `nn.Linear` by its own layer that keeps the original as `base_layer`, so those layers'
state-dict keys gain `.base_layer` (`blocks.0.attn.qkv.base_layer.weight`) and the tuner's tensors are named
`<prefix>.default` (e.g. `attn.qkv.lora_A.default.weight`); every other backbone key is unchanged.

Layers (the family row's, backbones/families.py; a ViT block has the fused `attn.qkv`, `attn.proj`, `mlp.fc1`,
`mlp.fc2`), each a `target_modules` regex anchored to the blocks:
- DoRA, LoHa, LoKr, VeRA, FourierFT: `attn.qkv` and `attn.proj` of every block, the layers of this suite's LoRA
  (ours, so that the low-rank family compares on the same layers; the VeRA and FourierFT papers adapt the query
  and value projections of their ViTs, which timm fuses with the key into `qkv`).
- IA3: the fused `attn.qkv` output and the input of `mlp.fc2` (see `IA3Tuning`).
- BOFT: all four linears of every block (see `BOFTTuning`).

On a Swin (ours: peft knows nothing of timm's models, and no reference runs these tuners on a Swin) the same layers
of every block of every stage (`layers.i.blocks.j.attn.qkv`, ...), each at its block's width C; VeRA's shared A and
B are sized for the widest adapted layer and sliced for each (peft's). Swin-B, 200 classes (head 205,000; the sums
run over the 24 blocks, sum of C = 12,032): DoRA 52 C per block -> 830,664; IA3 7 C -> 289,224; LoHa 96 C ->
1,360,072; LoKr its per-shape factors -> 251,336; VeRA 4 C + 2 * 256 -> 265,416; BOFT 37 C -> 650,184; FourierFT
2 * 1000 -> 253,000 (formulas in tests/methods/test_swin_zoo.py).

Training: the backbone arrives frozen (TuningModule); peft adds its tensors trainable and freezes everything
else it sees; the base class re-enables the new head afterwards. The wrapped `base_layer`s are the pretrained
Linear objects themselves, so TuningModule's rule (pretrained modules stay in eval mode) covers them.

Evaluation runs unmerged: peft's `merge()` adds the delta into W in place and `unmerge()` subtracts it, which drifts
W by rounding at every evaluation; unmerged, W is never written (tests/methods/test_peft_tuners.py checks).

LoRA stays hand-written (methods/lora.py): peft's LoRA computes the same function from the same layers, counts
and init (tests/methods/test_peft_tuners.py pins that), but renames the tensors and the wrapped layers' keys, which
the `lora` name's tests, results and checkpoints rely on (docs/methods.md, "peft's LoRA").
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

import peft
import torch
from peft.tuners.boft import layer as boft_layer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from methods.base import TuningModule
from methods.options import Options, option
from methods.peft_table import LAYERS, TUNERS, Tuner, target_names
from methods.registry import register_method


class PeftTuning(TuningModule):
    """A peft tuner injected into the backbone's modules its row names (methods/peft_table.py: `tuner`): a regex over
    backbone module names, from the family row (backbones.FAMILIES), anchored to the blocks."""

    tuner: ClassVar[Tuner]  # the row: layers, families, whether it merges (set by `peft_method`)
    # Trained scale vectors that peft stores as (n, 1) or (1, n): timm's rule exempts 1-d tensors (norm weights)
    # from weight decay by their shape, so these are named here to get the same exemption (decay would pull a
    # unit scale towards 0, not towards its start).
    scale_names: ClassVar[tuple[str, ...]] = ()

    @property
    def targets(self) -> str:
        r"""peft's `target_modules` regex: the row's layers of every block, `(?:blocks\.\d+)\.(?:attn\.qkv|...)`, or on
        the convnet family the block modules it adapts, by name."""
        if self.family.name == "convnet":
            return "|".join(re.escape(name) for name in self.target_names())
        return self.family.targets(*LAYERS[self.tuner.layers](self.family))

    def peft_config(self) -> peft.PeftConfig:
        """The tuner's peft config for `self.options`, targeting `self.targets`; each subclass builds its own."""
        raise NotImplementedError(f"{type(self).__name__} must say which peft config it injects.")

    def adapt(self) -> None:
        norms = self.tuner.layers == "norms"
        adaptable = (nn.LayerNorm,) if norms else (nn.Linear, nn.Conv2d) if self.family.name == "convnet" else (
            nn.Linear,)
        for name in self.target_names():
            layer = self.backbone.get_submodule(name)
            if not (isinstance(layer, adaptable) if norms else type(layer) in adaptable):
                kinds = " / ".join(f"nn.{kind.__name__}" for kind in adaptable)
                raise ValueError(f"{self.label} adapts {kinds} layers; this backbone's {name} is "
                                 f"{type(layer).__name__}.")
        with warnings.catch_warnings():
            if norms:  # peft's LN-tuning layer asks any norm for Linear-style in/out features it never uses
                warnings.filterwarnings("ignore", r"Unsupported layer type .*LayerNorm", UserWarning, "peft")
            self.inject(self.peft_config())
        self.backbone.__dict__.pop("peft_config", None)  # peft's record of the config; ours lives in self.options

    def inject(self, config: peft.PeftConfig) -> None:
        peft.inject_adapter_in_model(config, self.backbone)

    def target_names(self) -> list[str]:
        """The adapted modules, found once before peft wraps them: afterwards each wrapped layer's `base_layer` and
        peft's own convolutions (a LoRA's `lora_A` on a Conv2d) would match the convnet rule too."""
        if "_target_names" not in self.__dict__:
            self.__dict__["_target_names"] = target_names(self.backbone, self.family, self.tuner.layers)
        return self.__dict__["_target_names"]

    def peft_layers(self) -> dict[str, BaseTunerLayer]:
        return {name: m for name, m in self.backbone.named_modules() if isinstance(m, BaseTunerLayer)}

    def no_weight_decay(self) -> set[str]:
        scales = {name for name, _ in self.named_parameters() if any(f".{s}." in name for s in self.scale_names)}
        return super().no_weight_decay() | scales


def peft_method(name: str):
    """Register a PeftTuning class as its row of TUNERS: name, label, colour, families and identity from the row."""

    def decorate(cls: type[PeftTuning]) -> type[PeftTuning]:
        row = TUNERS[name]
        cls.tuner, cls.label, cls.color, cls.families, cls.identity_at_init = (
            row, row.label, row.color, row.families, row.identity)
        return register_method(name)(cls)

    return decorate


@dataclass
class DoRAOptions(Options):
    rank: int = option(8, "rank r of the direction update B A (DoRA paper: as LoRA, 8)", kind=int, positive=True,
                       hint="e.g. rank=8")
    alpha: float = option(16.0, "the direction update is scaled by alpha / rank (as LoRA)", kind=float, positive=True,
                          hint="the scale is alpha / rank")


@peft_method("dora")
class DoRATuning(PeftTuning):
    """DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024, https://arxiv.org/abs/2402.09353), as
    peft implements it (`LoraConfig(use_dora=True)`).

    W' = m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||_c, the column norm taken per output row of the
    (out, in) weight; m (one value per output feature) starts at ||W||_c and B at zero, so DoRA starts as the
    pretrained function. A Kaiming-uniform, B zero, rank 8, alpha 16 on qkv and proj: the LoRA setup of this suite
    (the DoRA paper trains LoRA's setup with the magnitude added). ViT-B/16, 200 classes:
    12 * (8 * (768 + 2304) + 8 * (768 + 768) + 2304 + 768) + 768 * 200 + 200 = 633,032.
    """

    options_cls = DoRAOptions

    def peft_config(self) -> peft.PeftConfig:
        return peft.LoraConfig(r=self.options.rank, lora_alpha=float(self.options.alpha), target_modules=self.targets,
                               use_dora=True)


@dataclass
class IA3Options(Options):
    """IA3 has no hyper-parameter beyond where its vectors go (its paper fixes that)."""


@peft_method("ia3")
class IA3Tuning(PeftTuning):
    """(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., NeurIPS 2022,
    https://arxiv.org/abs/2205.05638), as peft implements it (`IA3Config`).

    The paper rescales keys and values of every attention and the FFN's intermediate activation by learned
    vectors that start at one (so IA3 starts as the pretrained function). The FFN vector is peft's feed-forward
    mode on `mlp.fc2`: fc2(l_ff * gelu(fc1(x))), exactly the paper's. timm fuses q, k and v into one `qkv` Linear,
    and peft can only scale a Linear's whole output, so IA3 here scales all of qkv: the paper's l_k and l_v plus a
    query vector l_q. That is peft's own mapping for fused attention (its IA3 defaults for GPT-2 `c_attn`, Bloom and
    Falcon `query_key_value`). Each attention logit is sum_i (l_q,i q_i)(l_k,i k_i), so l_q only multiplies l_k:
    the same functions as the paper's, with 768 redundant values per block. ViT-B/16, 200 classes:
    12 * (2304 + 3072) + 768 * 200 + 200 = 218,312 (the paper's k, v and FFN vectors alone: 12 * 4608 + head).
    """

    options_cls = IA3Options
    scale_names = ("ia3_l",)

    def peft_config(self) -> peft.PeftConfig:
        feedforward = self.family.targets(self.family.mlp_layers[-1])
        return peft.IA3Config(target_modules=self.targets, feedforward_modules=feedforward)


@dataclass
class LyCORISOptions(Options):
    rank: int = option(8, "rank r of each factor (peft's default: 8)", kind=int, positive=True, hint="e.g. rank=8")
    alpha: float = option(8.0, "the update is scaled by alpha / rank (peft's default: 8)", kind=float, positive=True,
                          hint="the scale is alpha / rank")


@dataclass
class LoHaOptions(LyCORISOptions):
    pass


@peft_method("loha")
class LoHaTuning(PeftTuning):
    """LoHa: low-rank Hadamard product updates (FedPara, Hyeon-Woo et al., ICLR 2022, https://arxiv.org/abs/2108.06098;
    as the LyCORIS library runs it, Yeh et al., ICLR 2024, https://arxiv.org/abs/2309.14859), as peft implements it
    (`LoHaConfig`).

    dW = (alpha / r) (W1a W1b) * (W2a W2b), * elementwise, each pair of rank r: rank up to r^2 at 2 r (out + in)
    values per layer. peft's init: W1a, W1b, W2a Kaiming-uniform and W2b zero (so dW = 0 at the start; FedPara's He
    init, peft's choice of the zero factor). peft's defaults r = 8, alpha = 8 on qkv and proj. ViT-B/16, 200 classes:
    12 * 2 * 8 * ((2304 + 768) + (768 + 768)) + 768 * 200 + 200 = 1,038,536.
    """

    options_cls = LoHaOptions

    def peft_config(self) -> peft.PeftConfig:
        return peft.LoHaConfig(r=self.options.rank, alpha=float(self.options.alpha), target_modules=self.targets)


@dataclass
class LoKrOptions(LyCORISOptions):
    pass


@peft_method("lokr")
class LoKrTuning(PeftTuning):
    """LoKr: Kronecker-product updates (KronA, Edalati et al., 2022, https://arxiv.org/abs/2212.10650; as the
    LyCORIS library runs it, Yeh et al., ICLR 2024, https://arxiv.org/abs/2309.14859), as peft implements it
    (`LoKrConfig`).

    dW = (alpha / r) W1 (x) W2 for out = a c, in = b d factored as close to square as possible (peft's
    `factorization`, decompose_factor -1): W1 (a, b) full, W2 (c, d) full where r >= max(c, d) / 2, else the rank-r
    product W2a W2b. peft's init: W1 zero (dW = 0 at the start), W2 Kaiming-uniform; peft's defaults r = 8, alpha = 8
    on qkv and proj. ViT-B/16: qkv 2304 = 48 * 48, 768 = 24 * 32: W1 48 * 24 + W2a 48 * 8 + W2b 8 * 32 = 1,792;
    proj 768 = 24 * 32 both ways: 24 * 24 + 32 * 8 + 8 * 32 = 1,088; with 200 classes 12 * 2,880 + 153,800 = 188,360.
    """

    options_cls = LoKrOptions

    def peft_config(self) -> peft.PeftConfig:
        return peft.LoKrConfig(r=self.options.rank, alpha=float(self.options.alpha), target_modules=self.targets)


@dataclass
class VeRAOptions(Options):
    rank: int = option(256, "rank r of the shared frozen random A, B (peft's default: 256)", kind=int, positive=True,
                       hint="e.g. rank=256")
    d_initial: float = option(0.1, "initial value of every entry of d (VeRA paper: 0.1)", kind=float, positive=True,
                              hint="the paper's 0.1")


@peft_method("vera")
class VeRATuning(PeftTuning):
    """VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024, https://arxiv.org/abs/2310.11454),
    as peft implements it (`VeraConfig`).

    dW = Lambda_b B Lambda_d A: A (r, in) and B (out, r) random (Kaiming-uniform from peft's fixed
    projection_prng_key 0), frozen and shared by all adapted layers (sliced to each layer's shape), stored as
    buffers; only the vectors d (r, all d_initial = 0.1) and b (out, zero, so dW = 0 at the start) train. peft's
    default r = 256 on qkv and proj. ViT-B/16, 200 classes: 12 * ((256 + 2304) + (256 + 768)) + 768 * 200 + 200 =
    196,808.
    """

    options_cls = VeRAOptions

    def peft_config(self) -> peft.PeftConfig:
        return peft.VeraConfig(r=self.options.rank, d_initial=float(self.options.d_initial),
                               target_modules=self.targets)

    def inject(self, config: peft.PeftConfig) -> None:
        # inject_adapter_in_model refuses VeRA (its A and B are state shared across layers); the tuner class
        # injects the same layers, and each layer keeps a reference to the shared A and B.
        peft.tuners.VeraModel(self.backbone, config, "default")


@dataclass
class BOFTOptions(Options):
    # that it divides the adapted widths is checked in inject(), which has the backbone
    block_size: int = option(4, "size b of each orthogonal block; must divide every adapted layer's input width "
                             "(peft's default: 4)", kind=int, positive=True, hint="e.g. block_size=4")


@peft_method("boft")
class BOFTTuning(PeftTuning):
    """BOFT: orthogonal butterfly fine-tuning (Liu et al., ICLR 2024, https://arxiv.org/abs/2311.06243), as peft
    implements it (`BOFTConfig`).

    y = s * (W R^T x) + b: R a block-diagonal orthogonal matrix over the input
    features, each (b, b) block the Cayley transform (I + Q)(I - Q)^-1 of a skew-symmetric Q stored as a free (b, b)
    matrix, and s a per-output scale. Q starts at zero and s at one, so BOFT starts as the pretrained function.
    peft's defaults: block size 4, one butterfly factor (a single block-diagonal R, as OFT); on every linear of each
    block (ours: attention and MLP). The butterfly factor is not an option: peft uses factors above 1 only with
    its JIT-compiled CUDA kernel and silently falls back to 1 without it; this bridge always runs peft's
    PyTorch path, so CPU and GPU build the same model. ViT-B/16, 200 classes, per block:
    (768 / 4) * 16 * 3 (qkv, proj, fc1 read 768) + (3072 / 4) * 16 (fc2) + 2304 + 768 + 3072 + 768 = 28,416;
    12 * 28,416 + 768 * 200 + 200 = 494,792.
    """

    options_cls = BOFTOptions
    scale_names = ("boft_s",)

    def peft_config(self) -> peft.PeftConfig:
        return peft.BOFTConfig(boft_block_size=self.options.block_size, target_modules=self.targets)

    def inject(self, config: peft.PeftConfig) -> None:
        size = self.options.block_size
        widths = sorted({self.backbone.get_submodule(name).in_features for name in self.target_names()})
        if any(width % size for width in widths):
            divisors = [d for d in range(1, min(widths) + 1) if all(w % d == 0 for w in widths) and d <= 64]
            raise ValueError(f"BOFT block_size {size} does not divide the adapted input widths {widths}; "
                             f"choose one of {divisors}.")
        # False (not None) tells peft the CUDA kernel is unavailable without trying to compile it.
        boft_layer._FBD_CUDA = False
        with torch.device("cpu"):  # peft fills its permutation matrices entry by entry, which meta tensors refuse
            peft.inject_adapter_in_model(config, self.backbone)
        for layer in self.peft_layers().values():
            layer.boft_P = layer.boft_P.to(layer.base_layer.weight.device)  # a buffer, outside the state dict


@dataclass
class FourierFTOptions(Options):
    # at most the smallest adapted weight's entries: checked in inject(), which has the backbone
    n_frequency: int = option(1000, "spectral coefficients learned per layer, at random fixed frequencies (peft's "
                              "default: 1000)", kind=int, positive=True, hint="e.g. n_frequency=1000")
    scaling: float = option(150.0, "dW = scaling * Re(IDFT(spectrum)) (peft's default 150)", kind=float, positive=True,
                            hint="peft's default 150")


@peft_method("fourierft")
class FourierFTTuning(PeftTuning):
    """FourierFT: Fourier-transform fine-tuning (Gao et al., ICML 2024, https://arxiv.org/abs/2405.03003), as peft
    implements it (`FourierFTConfig`).

    dW = scaling * Re(IDFT2(F)), F an (out, in) spectrum that is zero except at n fixed random frequencies (peft's
    random_loc_seed 777), where it holds the n trained coefficients. peft's default init (init_weights=False)
    draws the coefficients from N(0, 1): dW is not zero at the start, so FourierFT does not start as the pretrained
    function (identity_at_init False). peft's defaults n = 1000, scaling 150, on qkv and proj (the official ViT
    scripts, github.com/Chaos96/fourierft experiments/ViT, use n = 3000 and scale 300 on query and value).
    ViT-B/16, 200 classes: 12 * 2 * 1000 + 768 * 200 + 200 = 177,800.
    """

    options_cls = FourierFTOptions

    def peft_config(self) -> peft.PeftConfig:
        return peft.FourierFTConfig(n_frequency=self.options.n_frequency, scaling=float(self.options.scaling),
                                    target_modules=self.targets)

    def inject(self, config: peft.PeftConfig) -> None:
        sizes = [self.backbone.get_submodule(name).weight.numel() for name in self.target_names()]
        if self.options.n_frequency > min(sizes):
            raise ValueError(f"FourierFT n_frequency must be at most the smallest adapted weight's {min(sizes):,} "
                             f"entries, got {self.options.n_frequency}.")
        peft.inject_adapter_in_model(config, self.backbone)
