"""The contract every registered method keeps, checked for each one with its default options on a tiny backbone of
every family it supports (tests/conftest.py make_tiny; convnets where a method declares them):

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
from tests.conftest import make_tiny

PAIRS = [(method, family) for method in list_methods() for family in get_method_class(method).families]


def build(method: str, family: str = "vit"):
    torch.manual_seed(0)
    backbone = make_tiny(family)
    plain = copy.deepcopy(backbone)
    return create_method(method, backbone, num_classes=3), plain


def put_classifier(backbone, classifier) -> None:
    """`classifier` where timm's get_classifier() sits: a ViT's `head`, a Swin's `head.fc` (after its pool)."""
    name = next(n for n, m in backbone.named_modules() if m is backbone.get_classifier())
    parent, _, attribute = name.rpartition(".")
    setattr(backbone.get_submodule(parent), attribute, classifier)


@pytest.mark.parametrize(("method", "family"), [(m, f) for m, f in PAIRS if get_method_class(m).identity_at_init])
def test_starts_as_the_pretrained_function(method, family, tiny_batch):
    model, plain = build(method, family)
    head = model.backbone.get_classifier()
    plain.reset_classifier(3)
    put_classifier(plain, copy.deepcopy(head))  # the same new head on the untouched backbone
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tiny_batch[0]), plain(tiny_batch[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_every_tuned_tensor_moves_and_nothing_else_does(method, family, tiny_batch):
    model, _ = build(method, family)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.head") for n in tuned), "every protocol trains a new head"
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
    assert moved == tuned, (f"tuned but never moved: {sorted(tuned - moved)}; "
                            f"moved but not tuned: {sorted(moved - tuned)}")
