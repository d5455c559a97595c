"""The contract every registered method keeps, checked for each one with its default options on a tiny backbone of
every family it supports (tests/helpers/models.py: the tiny ViT and Swin, and for the convnet family both the tiny
ResNet and ConvNeXt):

- (default options, except where one does not fit a tiny backbone: tests/helpers/models.py TINY_METHOD_OPTIONS)
- where its paper says it starts from the pretrained function (`identity_at_init`), its logits before any step equal
  the plain backbone's with the same head;
- after a few optimizer steps every tuned tensor has moved and every other tensor (and buffer) is bit-identical;
- the new head always trains, and `tuned_params` counts exactly the tensors that train.
"""

from __future__ import annotations

import copy

import pytest
import torch

from methods import create_method, get_method_class, list_methods
from tests.helpers.models import TINY_CONVNETS, TINY_METHOD_OPTIONS, make_tiny, make_tiny_convnet

BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# (method, backbone kind) pairs: each family a method declares; "convnet" as each tiny ConvNet
PAIRS = [(method, kind) for method in list_methods() for family in get_method_class(method).families
         for kind in (TINY_CONVNETS if family == "convnet" else (family,))]
# The peft table's rows beyond the first seven (methods/peft_zoo.py, ~30 tuners): their ViT cases run in the default
# suite, their Swin and ConvNet cases (~60 more, ~4 s each on 2 CPU cores) only in the slow one, to keep `make test`
# within its 5 minutes.
PEFT_ZOO = {name for name in list_methods() if get_method_class(name).__module__ == "methods.peft_zoo"}
PAIRS = [pytest.param(m, k, marks=pytest.mark.slow) if m in PEFT_ZOO and k != "vit" else (m, k) for m, k in PAIRS]
# GLoRA's scalar D (peft's init) gets no gradient in the contract's three steps: the rest of GLoRA moves.
STILL = {"glora": "glora_D."}


def build(method: str, kind: str = "vit"):
    torch.manual_seed(0)
    backbone = make_tiny_convnet(kind) if kind in TINY_CONVNETS else make_tiny(kind)
    plain = copy.deepcopy(backbone)
    return create_method(method, backbone, num_classes=3, **TINY_METHOD_OPTIONS.get((method, kind), {})), plain


@pytest.mark.parametrize(("method", "kind"), [p for p in PAIRS if get_method_class(
    p.values[0] if hasattr(p, "values") else p[0]).identity_at_init])
def test_starts_as_the_pretrained_function(method, kind, tiny_batch):
    model, plain = build(method, kind)
    head = model.backbone.get_classifier()
    plain.reset_classifier(3)
    # the same new head on the untouched backbone, where timm names its classifier (ViT head, ResNet fc, ...)
    plain.set_submodule(plain.pretrained_cfg["classifier"], copy.deepcopy(head))
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tiny_batch[0]), plain(tiny_batch[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("method", "kind"), PAIRS)
def test_every_tuned_tensor_moves_and_nothing_else_does(method, kind, tiny_batch):
    model, _ = build(method, kind)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    head = f"backbone.{model.backbone.pretrained_cfg['classifier']}"
    assert any(n.startswith(head) for n in tuned), "every protocol trains a new head"
    assert model.tuned_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # zero-init branches: an up-projection moves at step 1, the layer feeding it from step 2
        optimizer.zero_grad()
        loss, _, _ = model.model_step(tiny_batch)
        loss.backward()
        optimizer.step()
    after = dict([*model.named_parameters(), *model.named_buffers()])
    moved = {n for n, t in after.items() if n in before and not torch.equal(t.detach(), before[n])}
    if method in STILL:
        tuned = {n for n in tuned if STILL[method] not in n}
    if not model.frozen_backbone:  # full fine-tuning trains in train mode: BatchNorm statistics update (ResNet)
        statistics = {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in BATCHNORM_STATISTICS}
        assert kind != "resnet" or statistics <= moved
        moved -= statistics
    assert moved == tuned, (f"tuned but never moved: {sorted(tuned - moved)}; "
                            f"moved but not tuned: {sorted(moved - tuned)}")
