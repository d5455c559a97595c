"""Tuning protocols for timm Vision Transformers, one file each; `list_methods()` names them."""

# Import order is registration order: the paper's table order.
from methods import full, linear, bias, adapter, vpt  # noqa: F401, I001
from methods import partial, mlp, lora  # noqa: F401, I001 — beyond the paper's six, after them
from methods import adaptformer, houlsby, convpass, repadapter  # noqa: F401, I001
from methods import ln_tune, ssf, difffit, fact  # noqa: F401, I001 — issue 16's scale/shift and factor methods
from methods import sidetune, vqt  # noqa: F401, I001 — the zoo (issue 16)
from methods import adapter_plus, mona, vfpt, prefix, dtl  # noqa: F401, I001 — issue 29's vision methods
from methods import e2vpt, sct, selective, gps  # noqa: F401, I001 — issue 29's vision methods (2)
from methods import spt  # noqa: F401, I001 — SPT-LoRA and SPT-Adapter (sensitivity-chosen budget)
from methods import peft_tuners  # noqa: F401, I001 — peft's tuners, after the hand-written ones
from methods import peft_zoo  # noqa: F401, I001 — every other peft tuner (a table's rows) and METHOD=peft:<type>
from methods.base import OptimConfig, TuningModule
from methods.registry import get_method_class, list_methods, register_method


def create_method(name: str, backbone, num_classes: int, optim: OptimConfig | None = None, *,
                  head_init: str = "pytorch", **options) -> TuningModule:
    """Wrap `backbone` with tuning method `name`; `options` are the method's own (e.g. prompt_length=10);
    `head_init` is "pytorch" (nn.Linear's init) or "vpt" (the VPT code's head)."""
    return get_method_class(name).from_options(backbone, num_classes, optim, head_init=head_init, **options)


__all__ = ["OptimConfig", "TuningModule", "create_method", "get_method_class", "list_methods", "register_method"]
