"""Every other peft tuner as a registered method, one row of methods/peft_table.py each, and `METHOD=peft:<type>`.

peft (https://github.com/huggingface/peft, 0.22.0) implements each tuner; a row says which layers it adapts and
where its defaults differ from peft's (methods/peft_table.py). Each is built through its tuner's model class
(`PEFT_TYPE_TO_TUNER_MAPPING[type](backbone, config, "default")`, peft's model path), which injects in place and,
for the tuners whose state is shared across layers (VeRA, FRoD, PVeRA, VB-LoRA, UniLoRA, TinyLoRA: one random
projection or vector bank for every layer), creates that state once; `inject_adapter_in_model` refuses those.

Options are the tuner's peft config fields (METHOD_ARGS="r=16 init_weights=false"), checked by type, then by peft.
Two tuners need more than a config:
- AdaLoRA (Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512) reallocates its rank budget during training:
  its schedule's length (`total_step`) is the trainer's number of optimizer steps, set when fitting starts, and
  `update_and_allocate` runs after every optimizer step (before the next zero_grad, as peft's docs ask; it reads the
  gradients). The paper's orthogonality penalty on P and Q, which peft adds only to a transformers model's loss,
  is added to the training loss here (`orth_reg_weight`, peft's 0.5).
- C3A (circular convolution; Chen et al., 2024, https://arxiv.org/abs/2407.19342) needs a block size that divides
  every adapted layer's input and output width: by default the largest such divisor up to peft's 256 (ours).
  VB-LoRA's vector length must divide them too: the same rule, from peft's 256 (ViT-B/16's 768 and 2304 keep it).

`METHOD=peft:<type>` names the registered method of that peft type (`peft:hra` is `hra`); a type without a row (a
newer peft's) is built with the default row: the attention linears of a ViT or Swin, peft's defaults, named
`peft:<type>`. Prompt-learning and language-model-only types are refused with the reason (peft_table.UNSUPPORTED).
Evaluation runs unmerged, as the other peft tuners (methods/peft_tuners.py says why).
"""

from __future__ import annotations

import math
from functools import cache, reduce
from typing import ClassVar

import peft
import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

from backbones import closest_name
from methods.peft_table import PEFT_TYPES, TUNERS, UNSUPPORTED, Tuner, options_class, row_for
from methods.peft_tuners import PeftTuning
from methods.registry import register_method, register_prefix


class PeftConfigTuning(PeftTuning):
    """A peft tuner from its row alone: the config from the options, built through the tuner's model class."""

    def peft_config(self) -> peft.PeftConfig:
        targets = self.target_names() if self.family.name == "convnet" else self.targets
        return self.options.config(targets, **self.decided())

    def decided(self) -> dict:
        """Config values this suite decides from the backbone (none unless a tuner needs one)."""
        return {}

    def inject(self, config: peft.PeftConfig) -> None:
        model_cls = PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPES[self.tuner.peft_type]]
        on_meta = any(p.is_meta for p in self.backbone.parameters())
        try:
            if on_meta and self.tuner.reads_weights:
                tuner = self.inject_from_zeros(model_cls, config)
            else:
                tuner = model_cls(self.backbone, config, "default")
        except (TypeError, ValueError, KeyError, NotImplementedError) as err:  # a layer the tuner cannot take
            raise ValueError(f"{self.label} (peft {self.tuner.peft_type}) cannot adapt this backbone: "
                             f"{' '.join(str(err).split())}") from None
        self.__dict__["peft_model"] = tuner  # not a submodule: it holds the backbone, whose tensors we own


    def inject_from_zeros(self, model_cls, config: peft.PeftConfig):
        """On the meta device (validation, `make params`) a tuner whose init reads W gets random CPU weights in the
        layers it adapts, then everything goes back to meta: only shapes count there, and no weights are loaded."""
        for name in self.target_names():
            for tensor in self.backbone.get_submodule(name).to_empty(device="cpu").parameters():
                tensor.detach().normal_()
        with torch.device("cpu"):
            tuner = model_cls(self.backbone, config, "default")
        self.backbone.to("meta")
        return tuner


class AdaLoRATuning(PeftConfigTuning):
    """AdaLoRA: SVD-form LoRA (P diag(E) Q) whose rank budget moves to the important triplets while training."""

    def decided(self) -> dict:
        # a schedule past the warmup, replaced by the trainer's step count when fitting starts (on_fit_start)
        return {"total_step": self.options.tinit + self.options.tfinal + 1}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        config = self.peft_model.peft_config["default"]
        if config.tinit + config.tfinal >= total:
            raise ValueError(f"AdaLoRA's tinit + tfinal ({config.tinit} + {config.tfinal}) must be below the run's "
                             f"{total} optimizer steps; lower them with METHOD_ARGS, or train longer.")
        self.peft_model.rankallocator.set_total_step(total)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # the step's index (Lightning counts it done after this hook), gradients still in place
        self.peft_model.update_and_allocate(self.trainer.global_step)

    def orthogonality(self) -> torch.Tensor:
        """The paper's R(P, Q) = ||P^T P - I||_F^2-style penalty as peft computes it: the mean over P and Q of
        ||A A^T - I||_F (A: (r, in)) and ||B^T B - I||_F (B: (out, r))."""
        terms = []
        for name, p in self.backbone.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                cov = p @ p.T if ".lora_A." in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=p.device, dtype=p.dtype)))
        return torch.stack(terms).mean()

    def model_step(self, batch):
        loss, preds, labels = super().model_step(batch)
        if self.training:
            loss = loss + self.options.orth_reg_weight * self.orthogonality()
        return loss, preds, labels


class WidthDivisorTuning(PeftConfigTuning):
    """A tuner whose size must divide every adapted layer's input and output width (C3A's block size, VB-LoRA's
    vector length): left at None, the largest such divisor up to peft's default, gcd(peft's, every width)."""

    divisor: ClassVar[str]  # the config field

    def decided(self) -> dict:
        if getattr(self.options, self.divisor) is not None:
            return {}
        layers = [self.backbone.get_submodule(name) for name in self.target_names()]
        widths = [w for layer in layers for w in (layer.in_features, layer.out_features)]
        return {self.divisor: reduce(math.gcd, widths, self.options.peft_defaults[self.divisor])}


class C3ATuning(WidthDivisorTuning):
    divisor = "block_size"


class VBLoRATuning(WidthDivisorTuning):
    divisor = "vector_length"


SPECIAL = {"adalora": AdaLoRATuning, "c3a": C3ATuning, "vblora": VBLoRATuning}


def method_class(row: Tuner) -> type[PeftConfigTuning]:
    """The method class of a row: its options from the peft config, its facts from the row."""
    base = SPECIAL.get(row.peft_type, PeftConfigTuning)
    return type(f"{row.label.replace('-', '').replace(' ', '').replace('(', '').replace(')', '')}Tuning", (base,), {
        "__doc__": f"{row.label} ({row.paper}), as peft implements it ({row.peft_type}); {row.why}".rstrip("; "),
        "tuner": row, "label": row.label, "color": row.color, "families": row.families,
        "identity_at_init": row.identity, "options_cls": options_class(row), "__module__": __name__})


for _row in TUNERS.values():
    if _row.name not in ("dora", "ia3", "loha", "lokr", "vera", "boft", "fourierft"):  # methods/peft_tuners.py's
        register_method(_row.name)(method_class(_row))


@cache
def unregistered(peft_type: str) -> type[PeftConfigTuning]:
    cls = method_class(row_for(peft_type))
    cls.method_name = f"peft:{peft_type}"
    return cls


def resolve(peft_type: str) -> type[PeftTuning]:
    """`peft:<type>`'s method: the registered one of that type, else one built from the default row."""
    from methods.registry import get_method_class  # the registry resolves prefixes through this function

    key = peft_type.lower()
    if key in UNSUPPORTED:
        raise ValueError(f"peft type {peft_type!r} cannot tune a vision backbone: {UNSUPPORTED[key]}.")
    if key not in PEFT_TYPES:
        known = sorted(set(PEFT_TYPES) - set(UNSUPPORTED))
        raise ValueError(f"Unknown peft type {peft_type!r} (peft {peft.__version__}).{closest_name(key, known)} "
                         f"Types that adapt a vision backbone: {', '.join(known)} (METHOD=peft:<type>).")
    row = row_for(key)
    return get_method_class(row.name) if row.name in TUNERS else unregistered(key)


register_prefix("peft", resolve)
