"""Gradient checkpointing (CHECKPOINTING=1) changes memory, never results: outputs and gradients are equal with
and without it for every method, VPT-deep's per-layer prompt replacement included, and it really recomputes."""

from __future__ import annotations

import pytest
import torch

from benchmark.core.pipeline import apply_speed_options
from methods import create_method, list_methods
from tests.helpers.models import make_tiny_vit, tiny_options

# drop_path > 0 and the prompts' dropout make the check strict: recomputation must replay the same random masks.
STOCHASTIC = dict(drop_path_rate=0.2)


def outputs_and_grads(method: str, checkpointing: bool, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(**STOCHASTIC), num_classes=3, **tiny_options(method))
    apply_speed_options(model, compile=False, checkpointing=checkpointing)
    model.train()
    torch.manual_seed(1)
    logits = model(batch[0])
    torch.nn.functional.cross_entropy(logits, batch[1]).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("method", list_methods())
def test_checkpointing_keeps_outputs_and_gradients(method, tiny_batch):
    plain_out, plain_grads = outputs_and_grads(method, False, tiny_batch)
    ckpt_out, ckpt_grads = outputs_and_grads(method, True, tiny_batch)
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "full", "adapter"])
def test_checkpointing_recomputes_blocks_in_backward(method, tiny_batch):
    """Each block runs twice per step with checkpointing (forward, then again in backward), once without."""
    calls = {False: 0, True: 0}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_method(method, make_tiny_vit(), num_classes=3)
        apply_speed_options(model, compile=False, checkpointing=checkpointing)
        # a pre-hook: the non-reentrant recomputation may stop early, before any post-forward hook would run
        model.backbone.blocks[0].register_forward_pre_hook(
            lambda *_, key=checkpointing: calls.__setitem__(key, calls[key] + 1))
        model.train()
        torch.nn.functional.cross_entropy(model(tiny_batch[0]), tiny_batch[1]).backward()
    assert calls == {False: 1, True: 2}


def test_vpt_deep_prompts_replaced_per_layer_under_checkpointing(tiny_batch):
    """Every layer's prompts get their own gradient, and it matches the uncheckpointed one."""
    _, plain = outputs_and_grads("vpt_deep", False, tiny_batch)
    _, ckpt = outputs_and_grads("vpt_deep", True, tiny_batch)
    per_layer = ckpt["vpt_prompts"].abs().sum(dim=(1, 2))  # (L,)
    assert (per_layer > 0).all()
    torch.testing.assert_close(ckpt["vpt_prompts"], plain["vpt_prompts"], rtol=1e-5, atol=1e-7)


def test_checkpointing_off_in_evaluation(tiny_batch):
    """No autograd, nothing to save: evaluation runs the blocks once even with checkpointing on."""
    model = create_method("vpt_deep", make_tiny_vit(), num_classes=3)
    apply_speed_options(model, compile=False, checkpointing=True)
    count = [0]
    model.backbone.blocks[0].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    with torch.inference_mode():
        model.eval()(tiny_batch[0])
    assert count[0] == 1
