"""GPS against computations written out here: the gradient of each pretrained weight summed over the training data
(SupCon on two views, written as a loop over anchors; or cross-entropy through the head), each row's K entries of
largest |gradient| (numpy's argsort, as the official pruning.py), training that moves only those entries, the name
rule (biases whole, norms and embeddings frozen), a real Trainer's selection, and the ViT-B/16 count."""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from methods import create_method
from methods.gps import supcon_loss
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import DEPTH, HEAD, D, vit_b_tuned

ROWS = D + DEPTH * (3 * D + D + 4 * D + D)  # patch projection's rows, then qkv, proj, fc1, fc2 per block
WEIGHTS = ["patch_embed.proj"] + [f"blocks.{b}.{layer}" for b in (0, 1)
                                  for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_vit_b_count():
    assert vit_b_tuned("gps") == ROWS + ROWS + HEAD == 321_224  # K = 1 per row, every bias but the norms'
    assert vit_b_tuned("gps", per_neuron=2) == 2 * ROWS + ROWS + HEAD


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))


def reference_supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Khosla et al.'s L_sup-out, anchor by anchor."""
    z, total = F.normalize(features, dim=-1), 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / temperature for a in others]), dim=0)
        positives = [p for p in others if labels[p] == labels[i]]
        total = total - sum(z[i] @ z[p] / temperature - denominator for p in positives) / len(positives)
    return total / len(z)


def reference_rows(plain, loss_of, k: int) -> dict[str, list]:
    plain.requires_grad_(True)
    loss_of(plain).backward()
    chosen = {}
    for name in WEIGHTS:
        grad = plain.get_submodule(name).weight.grad.reshape(plain.get_submodule(name).weight.shape[0], -1).numpy()
        chosen[name] = np.sort(np.abs(grad).argsort(axis=1)[:, -k:], axis=1).tolist()
    return chosen


def built(k: int = 2, **options):
    torch.manual_seed(0)
    plain = make_tiny_vit().eval()
    model = create_method("gps", copy.deepcopy(plain), num_classes=3, per_neuron=k, **options)
    plain.reset_classifier(3)
    plain.head.load_state_dict(model.backbone.head.state_dict())
    return model, plain


def selected(model) -> dict[str, list]:
    return {name: model.backbone.get_submodule(name).parametrizations.weight[0].gps_index.tolist()
            for name in WEIGHTS}


def supcon_of(plain):
    images, labels = data().tensors
    features = plain.forward_features(torch.cat([images, images]))[:, 0]  # CLS after the norm, two equal views
    return reference_supcon(features, labels.repeat(2))


def ce_of(plain):
    images, labels = data().tensors
    return F.cross_entropy(plain(images), labels)


@pytest.mark.parametrize(("loss", "loss_of"), [("supcon", supcon_of), ("ce", ce_of)])
def test_selection_is_each_rows_largest_gradients(loss, loss_of):
    model, plain = built(selection_loss=loss)
    model.select_from_data(DataLoader(data(), batch_size=6))
    assert selected(model) == reference_rows(plain, loss_of, 2)
    assert all(p.grad is None for p in model.parameters())  # the pass leaves no gradient for the first step
    assert {n for n, p in model.named_parameters() if p.requires_grad and "gps_delta" not in n} == {
        f"backbone.{name}.bias" for name in WEIGHTS} | {"backbone.head.weight", "backbone.head.bias"}


def test_ce_gradients_sum_over_batches():
    model, plain = built(selection_loss="ce")
    model.select_from_data(DataLoader(data(), batch_size=4))  # 4 + 2 images: two losses, two backward passes
    images, labels = data().tensors
    expected = reference_rows(plain, lambda m: F.cross_entropy(m(images[:4]), labels[:4])
                              + F.cross_entropy(m(images[4:]), labels[4:]), 2)
    assert selected(model) == expected


def test_training_moves_only_the_selected_entries(tiny_batch):
    model, _ = built(k=3, selection_loss="ce")
    model.select_from_data(DataLoader(data(), batch_size=6))
    qkv = model.backbone.blocks[0].attn.qkv
    pretrained = qkv.parametrizations.weight.original.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model.model_step(tiny_batch)[0].backward()
        optimizer.step()
    moved = (qkv.weight != pretrained).nonzero()
    rows_and_columns = {(r, c) for r, row in enumerate(selected(model)["blocks.0.attn.qkv"]) for c in row}
    assert {tuple(i) for i in moved.tolist()} == rows_and_columns
    assert torch.equal(qkv.parametrizations.weight.original, pretrained)


def test_a_trainer_selects_before_the_first_step():
    model, plain = built(selection_loss="supcon")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(data(), batch_size=6, shuffle=True))
    assert bool(model.selected)
    assert selected(model) == reference_rows(plain, supcon_of, 2)


def test_supcon_matches_the_anchor_loop():
    g = torch.Generator().manual_seed(3)
    features, labels = torch.randn(4, 2, 5, generator=g), torch.tensor([0, 1, 0, 2])
    views = torch.cat(features.unbind(1))  # view-major, as the official code stacks them
    assert math.isclose(supcon_loss(features, labels).item(), reference_supcon(views, labels.repeat(2)).item(),
                        rel_tol=1e-5)


def test_more_per_neuron_than_a_row_holds_is_refused():
    with pytest.raises(ValueError, match="per_neuron=193 exceeds the 192 inputs"):
        create_method("gps", make_tiny_vit(), num_classes=3, per_neuron=193)  # 3 * 8 * 8 patch inputs
