"""A trained model as a plain timm state dict (`python -m benchmark.evaluate --export merged`, issue 28): what
`timm.create_model(backbone, num_classes=C, **backbone_kwargs).load_state_dict(...)` loads with strict=True and
whose logits are the trained model's.

A method qualifies when its update folds into the backbone's own weights, or when it only changes them:
- the merge-for-eval methods (methods.base.MergeForEvalTuning: LoRA, SSF, RepAdapter) fold their update into copies
  of the layers they wrap; those copies become the layers' `weight` and `bias` (`FOLDS` says where each wrapper
  keeps them and which modules it absorbs);
- peft's tuners fold with peft's own `merge()` (in place, on a copy of the model), each wrapped layer then replaced
  by its base layer;
- Full, linear, bias, partial-k, LN-tune, ... change tensors of the plain model, which is exported as is.
Anything else (prompts, adapters that stay beside the backbone, a deeper head) leaves tensors a plain timm model has
no place for, and is refused in one line. The export is checked before it is written: the plain model with the
exported tensors must give the trained model's logits on a random batch.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save as save_safetensors
from torch import nn

from backbones import create_backbone, data_config
from benchmark.core.errors import ConfigError
from benchmark.core.store import atomic_write
from methods.base import MergeForEvalTuning, TuningModule
from methods.lora import LoRALinear
from methods.repadapter import FoldableLinear
from methods.ssf import ScaleShift

# wrapper class -> (its folded (weight, bias) once merged, the modules folded into it). A merge-for-eval method whose
# layers are not listed here is refused by the key check below (tests/benchmark/core/test_evaluate.py runs every one).
FOLDS: dict[type[nn.Module], Callable[[nn.Module], tuple[tuple, list[nn.Module]]]] = {
    LoRALinear: lambda m: ((m.merged_weight, m.bias), []),
    ScaleShift: lambda m: (m.merged, []),
    FoldableLinear: lambda m: (m.folded, list(m.adapter)),
}
EXPORT_FORMAT = "vpt-bench-merged/1"


def merged_state_dict(model: TuningModule, method: str) -> dict[str, torch.Tensor]:
    """The backbone's state dict with every trained update folded into the weights it wraps (on a copy: `model` is
    left as it is); tensors a plain timm model does not have stay in, for `plain_state_dict` to refuse."""
    merged = copy.deepcopy(model).cpu().eval()
    if isinstance(merged, MergeForEvalTuning):
        merged.merge_layers()
    backbone = merged.backbone
    for name, layer in [(n, m) for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)]:
        try:
            layer.merge(safe_merge=True)  # peft's own fold, in place on the copy; refuses NaN
        except NotImplementedError:
            raise ConfigError(f"--export merged: peft does not merge {type(layer).__name__} layers ({method} at "
                              f"{name}); its adapter is kept in peft's format beside the checkpoint.") from None
        backbone.set_submodule(name, layer.get_base_layer())
    names = {id(m): n for n, m in backbone.named_modules()}
    state = backbone.state_dict()
    for name, layer in list(backbone.named_modules()):
        fold = next((f for cls, f in FOLDS.items() if isinstance(layer, cls)), None)
        if fold is None:
            continue
        (weight, bias), absorbed = fold(layer)
        for dropped in [name, *(names[id(m)] for m in absorbed)]:  # the wrapper's own and absorbed tensors
            state = {k: v for k, v in state.items() if not k.startswith(f"{dropped}.")}
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def plain_backbone(backbone: str, backbone_kwargs: dict, num_classes: int) -> nn.Module:
    plain = create_backbone(backbone, pretrained=False, **backbone_kwargs)
    plain.reset_classifier(num_classes)
    return plain.eval()


def plain_state_dict(model: TuningModule, method: str, backbone: str, backbone_kwargs: dict) -> dict:
    """`merged_state_dict`, checked against a fresh `backbone`: the same keys and shapes (else ConfigError naming what
    does not fold) and, loaded into it, the trained model's logits on a random batch (else ConfigError)."""
    state = merged_state_dict(model, method)
    plain = plain_backbone(backbone, backbone_kwargs, model.num_classes)
    expected = plain.state_dict()
    extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if extra or missing or shapes:
        raise ConfigError(f"--export merged: {method} keeps tensors a plain {backbone} has no place for (extra "
                          f"{extra[:3]}, missing {missing[:3]}, other shapes {shapes[:3]}): only methods whose "
                          "update folds into the backbone's weights export merged (docs/reliability.md lists them).")
    plain.load_state_dict(state, strict=True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, *data_config(plain)["input_size"], generator=generator)
    trained = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        want, got = trained(images), plain(images)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + float(want.abs().max()))):
        raise ConfigError(f"--export merged: the plain {backbone} with {method}'s trained tensors does not give the "
                          f"trained model's logits (max difference {float((got - want).abs().max()):.3g}); this "
                          "method does not export merged.")
    return state


def save_export(path: str | Path, state: dict, meta: dict) -> int:
    """The plain state dict as safetensors with `meta` (timm name, its arguments, the class count, the run) in the
    metadata entry `vpt_bench`, atomically; returns the file's size."""
    blob = save_safetensors(state, metadata={"vpt_bench": json.dumps(meta | {"format": EXPORT_FORMAT})})
    atomic_write(path, lambda f: f.write(blob))
    return len(blob)
