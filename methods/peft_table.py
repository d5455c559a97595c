"""The peft bridge's one table: per peft tuner (peft 0.22.0), the registered method's name, label and colour, the
layers it adapts by default, the options where ours differ from peft's, whether it adapts convolutions (the convnet
family) and whether peft can fold it into W. methods/peft_tuners.py (the seven hand-tuned wrappers) and
methods/peft_zoo.py (every other row, and `METHOD=peft:<type>`) read it; `make params` and docs/methods.md's support
matrix are generated from it.

Each row's options are its peft config dataclass's fields (`PEFT_TYPE_TO_CONFIG_MAPPING`): every field whose type is
a number, a flag, a string or a choice is an option with peft's default and help; what this suite decides itself
(which modules, `SUITE_FIELDS`) and fields that take dicts, lists or nested configs are not options. A peft release
that adds a tuner gets the same treatment without a row (`peft:<type>`), adapting the attention linears of a ViT or
Swin.

Layers (block-relative, from the family row, backbones/families.py): "attention" is the fused `attn.qkv` and
`attn.proj` of every block, the layers of this suite's LoRA (ours: the low-rank family compares on the same layers;
most of these papers adapt a language model's q and v or all its linears); "all" adds `mlp.fc1` and `mlp.fc2`;
"norms" the two LayerNorms of every block (LN-tuning's). On the convnet family, a row with `conv` adapts every
ungrouped Conv2d and every Linear inside the blocks (a ResNet's convolutions, a ConvNeXt's MLP linears; depthwise
convolutions are left out: BOFT, HRA, HiRA and LoRA refuse grouped ones).
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any, ClassVar, Literal, Union

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from backbones import Family
from methods.options import Options, option

PEFT_TYPES = {peft_type.value.lower(): peft_type for peft_type in PEFT_TYPE_TO_CONFIG_MAPPING}

# Config fields this suite sets itself (the modules a tuner adapts, the AdaLoRA schedule's length), or that do not
# apply to a timm backbone (saving whole modules, transformer-layer selection by name).
SUITE_FIELDS = frozenset({"target_modules", "exclude_modules", "modules_to_save", "layers_to_transform",
                          "layers_pattern", "feedforward_modules", "target_parameters", "total_step", "fan_in_fan_out",
                          "megatron_core", "inference_mode", "task_type", "base_model_name_or_path", "revision",
                          "peft_type", "peft_version", "auto_mapping"})

# The layers a row adapts on a transformer family, block-relative (each anchored to the blocks by Family.targets).
LAYERS = {
    "attention": lambda family: family.attention_layers,
    "all": lambda family: family.attention_layers + family.mlp_layers,
    "qkv+fc2": lambda family: (family.attention_layers[0], family.mlp_layers[-1]),  # IA3: qkv out, the FFN's inner
    "norms": lambda family: family.norms,
}

# peft types that cannot adapt a vision backbone, and why (the refusal of `METHOD=peft:<type>` says it).
PROMPT = "a prompt-learning type: it prepends virtual tokens to a language model's token embeddings, which a timm " \
         "vision backbone does not have (the suite's VPT methods prompt a ViT: METHOD=vpt_deep)"
UNSUPPORTED = {
    "prompt_tuning": PROMPT, "multitask_prompt_tuning": PROMPT, "p_tuning": PROMPT, "prefix_tuning": PROMPT,
    "adaption_prompt": PROMPT, "cpt": PROMPT, "cartridge": PROMPT,
    "trainable_tokens": "it trains rows of a language model's token-embedding table, which a vision backbone lacks",
    "poly": "it mixes LoRA skills by a task id passed with every batch (multi-task language models)",
    "xlora": "it mixes already-trained LoRA adapters of a language model and needs them to exist",
    "shadow": "it builds a shadow copy of a Hugging Face transformers decoder, which a timm model is not",
}


@dataclass(frozen=True)
class Tuner:
    """One row: a peft tuner as a registered method."""

    peft_type: str  # PeftType value, lowercase ("hra")
    name: str  # the registered method (a lowercase identifier)
    label: str
    color: str
    paper: str  # citation: paper and link
    layers: str = "attention"  # a key of LAYERS
    defaults: dict = field(default_factory=dict)  # options that differ from peft's defaults (each says why in `why`)
    why: str = ""  # whose the non-peft defaults are
    conv: bool = False  # also adapts the convnet family's convolutions
    merges: bool = True  # peft folds the trained update into W (merge / merge_and_unload)
    identity: bool = True  # starts as the pretrained function (its update is zero at init)
    variant: bool = False  # a variant of its peft type (DoRA of LoRA): `peft:<type>` names the plain row
    transformers: tuple[str, ...] = ("vit", "swin")  # the transformer families it supports
    reads_weights: bool = False  # its init reads W's values (an SVD, a mask of W's entries): no meta-device init

    @property
    def families(self) -> tuple[str, ...]:
        return (*self.transformers, "convnet") if self.conv else self.transformers


def tuner(peft_type: str, name: str, label: str, color: str, paper: str, **facts) -> Tuner:
    return Tuner(peft_type, name, label, color, paper, **facts)


# The rows, in registration order: the seven hand-tuned wrappers (methods/peft_tuners.py) first.
TUNERS: dict[str, Tuner] = {row.name: row for row in (
    # peft_type, name, label, colour, paper; then what differs from a LoRA-like default
    tuner("lora", "dora", "DoRA", "#637939", "Liu et al., ICML 2024, https://arxiv.org/abs/2402.09353", conv=True),
    tuner("ia3", "ia3", "IA3", "#8c6d31", "Liu et al., NeurIPS 2022, https://arxiv.org/abs/2205.05638",
          layers="qkv+fc2"),
    tuner("loha", "loha", "LoHa", "#843c39", "Hyeon-Woo et al., ICLR 2022, https://arxiv.org/abs/2108.06098",
          conv=True),
    tuner("lokr", "lokr", "LoKr", "#7b4173", "Edalati et al., 2022, https://arxiv.org/abs/2212.10650", conv=True),
    tuner("vera", "vera", "VeRA", "#3182bd", "Kopiczko et al., ICLR 2024, https://arxiv.org/abs/2310.11454"),
    tuner("boft", "boft", "BOFT", "#e6550d", "Liu et al., ICLR 2024, https://arxiv.org/abs/2311.06243", layers="all"),
    tuner("fourierft", "fourierft", "FourierFT", "#31a354", "Gao et al., ICML 2024, https://arxiv.org/abs/2405.03003",
          identity=False),
    # every other tuner at peft's defaults on the attention linears (ours), unless the row says otherwise
    tuner("lora", "peft_lora", "LoRA (peft)", "#1b9e77", "Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685",
          conv=True),
    tuner("adalora", "adalora", "AdaLoRA", "#d95f02", "Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512",
          layers="all"),  # the paper adapts W_q, W_k, W_v, W_o, W_f1 and W_f2 of every layer
    tuner("adamss", "adamss", "AdaMSS", "#7570b3", "peft's AdaMSS (peft.tuners.adamss)", reads_weights=True),
    tuner("beft", "beft", "BEFT", "#e7298a", "arXiv 2025, https://arxiv.org/abs/2509.15974"),
    tuner("c3a", "c3a", "C3A", "#66a61e", "Chen et al., 2024, https://arxiv.org/abs/2407.19342", identity=False,
          defaults={"block_size": None}, why="block_size None: the largest divisor of every adapted width up to "
          "peft's 256 (ours; 256 divides ViT-B's 768 and 2304, so ViT-B runs peft's default)"),
    tuner("deft", "deft", "DEFT", "#e6ab02", "peft's DEFT (peft.tuners.deft)"),
    tuner("delora", "delora", "DeLoRA", "#a6761d", "Bini et al., ICLR 2025, https://arxiv.org/abs/2503.18225"),
    tuner("glora", "glora", "GLoRA", "#666666", "Chavan et al., 2023, https://arxiv.org/abs/2306.07967"),
    tuner("gralora", "gralora", "GraLoRA", "#e41a1c", "Jung et al., 2025, https://arxiv.org/abs/2505.20355"),
    tuner("hira", "hira", "HiRA", "#377eb8", "Huang et al., ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS",
          conv=True),
    tuner("hra", "hra", "HRA", "#4daf4a", "Yuan et al., NeurIPS 2024, https://arxiv.org/abs/2405.17484", conv=True),
    tuner("lily", "lily", "Lily", "#984ea3", "Zhong et al., 2024, https://arxiv.org/abs/2407.09946",
          merges=False),  # its B experts are shared across blocks: peft's merge does not reproduce the forward
    tuner("ln_tuning", "ln_tuning", "LN-tuning (peft)", "#ff7f00", "Qi et al., 2024, https://arxiv.org/abs/2312.11420",
          layers="norms", merges=False),  # trains copies of the norms: nothing to fold
    tuner("miss", "miss", "MiSS", "#a65628", "Kang et al., 2024, https://arxiv.org/abs/2409.15371"),
    tuner("oft", "oft", "OFT", "#f781bf", "Qiu et al., NeurIPS 2023, https://arxiv.org/abs/2306.07280", layers="all"),
    tuner("osf", "osf", "OSF", "#999999", "Nayak et al., 2025, https://arxiv.org/abs/2504.07097"),
    tuner("peanut", "peanut", "PEANuT", "#a6cee3", "Zhong et al., 2024, https://arxiv.org/abs/2410.01870"),
    tuner("psoft", "psoft", "PSOFT", "#1f78b4", "peft's PSOFT (https://openreview.net/forum?id=FSHrinMArK)"),
    tuner("randlora", "randlora", "RandLoRA", "#b2df8a", "Albert et al., ICLR 2025, https://arxiv.org/abs/2502.00987"),
    tuner("road", "road", "RoAd", "#33a02c", "Liao et al., 2024, https://arxiv.org/abs/2409.00119"),
    tuner("shira", "shira", "SHiRA", "#fb9a99", "Bhardwaj et al., 2024, https://arxiv.org/abs/2406.13175",
          reads_weights=True),
    tuner("supertuning", "supertuning", "SuperTuning", "#e31a1c", "https://arxiv.org/abs/2607.09287 (peft's docs)"),
    tuner("waveft", "waveft", "WaveFT", "#fdbf6f", "Bilican et al., 2025, https://arxiv.org/abs/2505.12532"),
    # shared state across layers: built through peft's model path (methods/peft_zoo.py)
    tuner("frod", "frod", "FRoD", "#cab2d6", "AAAI 2026, https://doi.org/10.1609/aaai.v40i31.39813",
          defaults={"progressbar": False}, why="progressbar False: no progress bar inside a run's log (ours)",
          transformers=("vit",), reads_weights=True),  # one decomposition per layer kind: Swin stages differ in width
    tuner("pvera", "pvera", "PVeRA", "#6a3d9a", "arXiv 2025, https://arxiv.org/abs/2512.07703"),
    tuner("vblora", "vblora", "VB-LoRA", "#b15928", "Li et al., NeurIPS 2024, https://arxiv.org/abs/2405.15179",
          identity=False, defaults={"vector_length": None}, why="vector_length None: the largest divisor of every "
          "adapted width up to peft's 256 (ours, as C3A's block size; ViT-B runs peft's 256)"),
    tuner("unilora", "unilora", "UniLoRA", "#7fc97f", "https://arxiv.org/abs/2506.00799", identity=False,
          reads_weights=True),
    tuner("tinylora", "tinylora", "TinyLoRA", "#beaed4", "https://arxiv.org/abs/2602.04118"),
    tuner("paca", "paca", "PaCA", "#bc80bd", "Woo et al., ICLR 2025, https://arxiv.org/abs/2503.01905"),  # peft 0.22
)}

# `peft:<type>` -> the registered method of that type (DoRA is LoRA's variant: `peft:lora` is peft_lora)
BY_TYPE = {row.peft_type: row for row in TUNERS.values() if not row.variant}


def row_for(peft_type: str) -> Tuner:
    """A type's row, or the default row for a type with none (a newer peft's): attention linears, vit and swin."""
    return BY_TYPE.get(peft_type) or Tuner(peft_type, f"peft_{peft_type}", peft_type, "#7f7f7f",
                                           f"peft's {peft_type} (peft.tuners)")


# --- where a row's layers are in a backbone ----------------------------------------------------------------
def target_names(model: nn.Module, family: Family, layers: str) -> list[str]:
    """The modules a row adapts in `model`: its LAYERS of every block, or on the convnet family every ungrouped
    Conv2d and every Linear inside a block."""
    if family.name != "convnet":
        pattern = family.targets(*LAYERS[layers](family))
        return [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    inside = re.compile(rf"(?:{family.block})\..+")
    return [name for name, m in model.named_modules() if inside.fullmatch(name)
            and (type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1))]


# --- options from a peft config dataclass --------------------------------------------------------------------
def rule_of_type(hint) -> dict | None:
    """`option()` arguments for a config field's type, or None where METHOD_ARGS cannot pass it (dicts, lists,
    nested configs)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is Union and len(args) < len(typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return {"kind": None, "choices": typing.get_args(hint)}
    if hint in (bool, int, float, str):
        return {"kind": hint}
    if typing.get_origin(hint) is Union:
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals and set(args) - set(literals) <= {bool}:  # True/False or one of the names (init_weights)
            return {"kind": None, "choices": (*((True, False) if bool in args else ()),
                                              *(v for lit in literals for v in typing.get_args(lit)))}
        if set(args) == {int, float}:
            return {"kind": float}
        if optional and len(args) == 1:
            return rule_of_type(args[0])
    return None


# The range of each numeric config field. peft declares none: its __post_init__ checks a few (a rank above zero, a
# fraction in [0, 1]) and the layers assume the rest; these say what each field means, so that METHOD_ARGS refuses a
# value the tuner cannot use before any model is built, in the suite's one-line form (methods/options.py).
PROBABILITY = {"low": 0, "high": 1, "high_open": True}  # a dropout: 1 would drop everything
FRACTION = {"low": 0, "high": 1}
POSITIVE = {"positive": True}  # a count, size or rank (integers from 1), or a scale (above 0: 0 disables the update)
NON_NEGATIVE = {"low": 0}  # a step, warmup, depth, init bound or std, seed (numpy's generators refuse negatives)
# By tuner and field, where the name alone does not say (or a peft check is narrower than the name's rule).
FIELD_RANGES = {
    ("adalora", "tinit"): NON_NEGATIVE, ("adalora", "tfinal"): NON_NEGATIVE,  # warmup steps, 0 = none
    ("adalora", "orth_reg_weight"): NON_NEGATIVE,  # peft refuses below 0; 0 drops the penalty
    ("adamss", "init_warmup"): NON_NEGATIVE, ("adamss", "final_warmup"): NON_NEGATIVE,
    ("adamss", "svd_threshold"): FRACTION,  # a ratio of the singular values kept
    ("deft", "init_scale"): NON_NEGATIVE,  # scales an init std
    ("delora", "delora_lambda"): NON_NEGATIVE,  # a bound on ||delta W||_F (trained); 0 starts at the bound zero
    ("gralora", "hybrid_r"): NON_NEGATIVE,  # 0 = plain GraLoRA, no vanilla-LoRA part
    ("lily", "num_B"): {"low": 2},  # peft refuses fewer than two shared B experts
    ("oft", "r"): NON_NEGATIVE, ("oft", "oft_block_size"): NON_NEGATIVE,  # exactly one above 0 (peft checks)
    ("osf", "effective_rank"): NON_NEGATIVE,  # a number of singular directions, or a fraction of them
    ("peanut", "depth"): NON_NEGATIVE,  # hidden adapter layers, 0 = none
    ("psoft", "psoft_svd_lowrank_niter"): NON_NEGATIVE,  # torch.svd_lowrank's power iterations
    ("psoft", "cayley_neumann_eps"): {"low": 0, "high": 1, "low_open": True, "high_open": True},  # peft: (0, 1)
    ("road", "group_size"): {"low": 2},  # an even number of elements per rotated pair group (peft checks even)
    ("supertuning", "sparsity"): PROBABILITY,  # peft: [0, 1)
    ("frod", "sparse_rate"): FRACTION,  # peft: [0, 1]
    ("tinylora", "weight_tying"): FRACTION,  # peft: [0, 1], 0 none, 1 full
    ("unilora", "init_theta_d_bound"): POSITIVE,  # peft refuses 0
    ("lokr", "decompose_factor"): {"low": -1},  # -1: peft picks the factor
    ("boft", "boft_block_size"): NON_NEGATIVE, ("boft", "boft_block_num"): NON_NEGATIVE,  # one above 0 (peft)
    ("boft", "boft_n_butterfly_factor"): POSITIVE,
}
# By field name, for every tuner (first match): dropouts, seeds, EMA coefficients, init bounds and stds; then sizes
# and counts, and scales (alphas, lambdas, the initial d of VeRA-like tuners: 0 leaves nothing to train).
NAME_RANGES = (
    (r"(.+_)?dropout", PROBABILITY),
    (r".*(seed|prng_key)", NON_NEGATIVE),
    (r"beta\d|.+_beta", PROBABILITY),  # an EMA's coefficient: 1 would never update
    (r"init_.+_(bound|std)|init_v_bound", NON_NEGATIVE),
    (r"(.+_)?r|.+_rank|.+_size|.+_length|num_.+|.+_k|topk|u|stride_.+|deltaT|mask_interval|asa_target_subspaces|"
     r"n_frequency|.+_terms", POSITIVE),
    (r"(.+_)?alpha|.*scal(e|ing).*|.+_exponent|d_initial|eps", POSITIVE),
)


def field_range(peft_type: str, name: str) -> dict | None:
    """`option()`'s range arguments for a numeric config field, or None where neither table knows it."""
    if (peft_type, name) in FIELD_RANGES:
        return FIELD_RANGES[peft_type, name]
    return next((rule for pattern, rule in NAME_RANGES if re.fullmatch(pattern, name)), None)


def numeric_range(peft_type: str, name: str, default) -> dict:
    """A numeric field's range: the tables', else (a newer peft's field) at least 0 unless peft's default is
    negative, which says the field takes negatives: then any finite value."""
    known = field_range(peft_type, name)
    if known is not None:
        return known
    return NON_NEGATIVE if default is None or default >= 0 else {"low": -math.inf}


def string_choices(peft_type: str, name: str, help_text: str) -> tuple | None:
    """The values a string field takes where peft checks them (its config, or its layers when the model is built):
    a bias mode as the field's help lists them ('none', 'all' or '<tuner>_only'), PEANuT's activation (a key of
    transformers' ACT2FN), WaveFT's wavelet family (peft's table); None: any string."""
    if name == "bias":
        return tuple(dict.fromkeys(re.findall(r"'(\w+)'", help_text))) or None
    if (peft_type, name) == ("peanut", "act_fn"):
        from transformers.activations import ACT2FN
        return tuple(sorted(ACT2FN))
    if (peft_type, name) == ("waveft", "wavelet_family"):
        from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
        return tuple(WAVELET_REDUCTIONS)
    return None


# Fields a type inherits but refuses at any value but the default: not options (AdaLoRA is LoRA's config less DoRA).
UNOFFERED_FIELDS = frozenset({("adalora", "use_dora")})
# Choices peft's type offers that need a field this suite does not offer (a dict or a nested config): LoftQ's init
# needs a `loftq_config`.
UNOFFERED_CHOICES = {"init_lora_weights": {"loftq"}}


def first_sentence(text) -> str:
    text = " ".join("".join(text).split())  # some fields' help is a tuple of strings
    return (text.split(". ")[0].rstrip(".") or "peft's config field")[:150]


class PeftOptions(Options):
    """The options of a peft tuner: its config fields (`config_cls`), checked by their types here and by peft's own
    `__post_init__` when the config is built."""

    config_cls: ClassVar[type[PeftConfig]]
    peft_defaults: ClassVar[dict[str, Any]]  # peft's value where the row's default is None (ours: decided later)

    def __post_init__(self):
        super().__post_init__()
        # peft's own checks (e.g. a rank above zero), before any model is built; AdaLoRA's schedule length comes from
        # the trainer at fit time (methods/peft_zoo.py), any length past its warmup passes the check here
        length = {"total_step": self.tinit + self.tfinal + 1} if hasattr(self, "tinit") else {}
        self.config("x", **length)

    def values(self) -> dict[str, Any]:
        """The fields as peft takes them: numbers where peft declares floats, peft's default for an undecided None."""
        chosen = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.peft_defaults:
                value = self.peft_defaults[f.name]
            chosen[f.name] = float(value) if f.metadata["rule"].kind is float and value is not None else value
        return chosen

    def config(self, targets, **suite) -> PeftConfig:
        """peft's config with these options, adapting `targets` (a regex or a list of module names); `suite` holds
        the fields this suite decides (SUITE_FIELDS, a None option's value)."""
        try:
            return self.config_cls(target_modules=targets, **{**self.values(), **suite})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.method}: peft's {self.config_cls.__name__} refuses these options: "
                             f"{' '.join(str(err).split())}") from None


def options_class(row: Tuner) -> type[PeftOptions]:
    """The options dataclass of a row: each offered field of its peft config, at the row's default or peft's."""
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPES[row.peft_type]]
    hints = typing.get_type_hints(config_cls)
    specs, undecided = [], {}
    for f in fields(config_cls):
        offered = f.name not in SUITE_FIELDS and (row.peft_type, f.name) not in UNOFFERED_FIELDS
        rule = rule_of_type(hints[f.name]) if offered and f.default is not MISSING else None
        if rule is None:
            continue
        default = row.defaults.get(f.name, f.default)
        if default is None and f.default is not None:
            undecided[f.name] = f.default
        if isinstance(default, Enum):
            continue
        help_text = " ".join("".join(f.metadata.get("help", "")).split())
        if rule["kind"] in (int, float):
            rule |= numeric_range(row.peft_type, f.name, f.default)
        elif rule["kind"] is str and string_choices(row.peft_type, f.name, help_text):
            rule = {"kind": None, "choices": string_choices(row.peft_type, f.name, help_text)}
        if rule.get("choices"):
            rule["choices"] = tuple(c for c in rule["choices"] if c not in UNOFFERED_CHOICES.get(f.name, ()))
        specs.append((f.name, hints[f.name], option(default, first_sentence(help_text), **rule)))
    cls = make_dataclass(f"{row.label}Options", specs, bases=(PeftOptions,))
    cls.config_cls, cls.peft_defaults, cls.method = config_cls, undecided, row.label
    return cls
