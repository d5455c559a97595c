"""The merge-for-eval contract, once for every method that folds its update into copies of the frozen weights while
it evaluates (methods.base.MergeForEvalTuning: LoRA, SSF, RepAdapter): under a real Trainer the merged evaluation
gives the unmerged logits and metrics, merges only while evaluating, and never writes a pretrained tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from methods import create_method, get_method_class, list_methods
from methods.base import MergeForEvalTuning
from tests.helpers.models import TINY_METHOD_OPTIONS, make_tiny
from tests.helpers.training import evaluate

MERGING = {"lora", "repadapter", "ssf"}  # stated here: a method that stops (or starts) merging must say so


def watch_merges(model) -> None:
    """Record on each mergeable layer whether it holds its merged copy, through the layer's own merge/unmerge: the
    contract needs no method-specific attribute."""
    for layer in model.mergeable_layers():
        merge, unmerge = layer.merge, layer.unmerge

        def merged(merge=merge, layer=layer):
            merge()
            layer.contract_merged = True

        def unmerged(unmerge=unmerge, layer=layer):
            unmerge()
            layer.contract_merged = False

        layer.merge, layer.unmerge, layer.contract_merged = merged, unmerged, False


def holds_merged(model) -> bool:
    return all(layer.contract_merged for layer in model.mergeable_layers())


def test_the_merging_methods_are_the_ones_named():
    assert {m for m in list_methods() if issubclass(get_method_class(m), MergeForEvalTuning)} == MERGING


CASES = [(m, f) for m in sorted(MERGING) for f in ("vit", "swin") if f in get_method_class(m).families]


@pytest.mark.parametrize("method, kind", CASES)
def test_merged_evaluation_equals_unmerged_and_never_writes_the_frozen_weights(method, kind, tmp_path):
    torch.manual_seed(0)
    model = create_method(method, make_tiny(kind), num_classes=3, **TINY_METHOD_OPTIONS.get((method, kind), {}))
    with torch.no_grad():  # a trained model: every tuned tensor away from its init, so every folded site shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    unmerged_model = copy.deepcopy(model)
    unmerged_model.options.merge_for_eval = False
    for m in (model, unmerged_model):
        watch_merges(m)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = TensorDataset(torch.randn(10, 3, 32, 32), torch.randint(0, 3, (10,)))
    merged_metrics, merged_logits, merged_state = evaluate(model, data, tmp_path, holds_merged)
    unmerged_metrics, unmerged_logits, unmerged_state = evaluate(unmerged_model, data, tmp_path, holds_merged)
    assert merged_state == {True} and unmerged_state == {False}  # each evaluated the way its switch says
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    assert merged_metrics.keys() == {"val/loss", "val/acc", "test/loss", "test/acc"} == unmerged_metrics.keys()
    for key, value in merged_metrics.items():
        assert value == pytest.approx(unmerged_metrics[key], abs=1e-5), key
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # W never written
    assert not any(layer.contract_merged for layer in model.mergeable_layers())  # the copies freed afterwards
