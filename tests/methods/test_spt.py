"""SPT against computations written out here: the squared gradients summed over the first batches (autograd on a
plain copy of the tiny ViT), the budget's allocation (the candidates' sites and module sizes listed by hand, the
code's alpha / beta rule, the largest tau that fits), the branches' formulas, training that moves only the chosen
entries, a real Trainer's selection, a checkpoint's round trip, and the ViT-B/16 count."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmark.core.artifacts import trained_tensors
from methods import create_method
from methods.spt import SPTLayerNorm, SPTLinear
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import HEAD, vit_b_tuned

D, HIDDEN, RANK, BUDGET = 32, 128, 8, 2000  # the tiny ViT: width 32, MLP 128, 2 blocks; class token 32
SLOTS = BUDGET - D
# Candidate tensors in forward order (the official grad_dict less head, cls_token, patch_embed, pos_embed)
NAMES = [f"blocks.{b}.{n}" for b in (0, 1) for n in (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
NAMES += ["norm.weight", "norm.bias"]
# What tuning a matrix whole costs: LoRA r (in + out); adapter 2 out r + r + out (proj's reads its input: D -> D)
LORA = {"qkv": RANK * (D + D), "proj": RANK * (D + D), "fc1": RANK * (D + HIDDEN), "fc2": RANK * (HIDDEN + D)}
ADAPTER = {"qkv": 2 * D * RANK + RANK + D, "proj": 2 * D * RANK + RANK + D, "fc1": 2 * HIDDEN * RANK + RANK + HIDDEN,
           "fc2": 2 * D * RANK + RANK + D}


def test_vit_b_count():
    # the budget (class token 768 included) plus the head, whatever the data choose, for either variant
    assert vit_b_tuned("spt_lora") == 400_000 + HEAD == 553_800
    assert vit_b_tuned("spt_adapter") == 400_000 + HEAD
    assert vit_b_tuned("spt_lora", budget=1_000_000) == 1_000_000 + HEAD


def sites(variant: str) -> list[tuple[str, int, int, bool, int]]:
    """(tensor name, first flat position, size, is a matrix, whole cost) of every site, in NAMES order: the fused
    qkv's weight and bias as three row blocks (q, k, v)."""
    sizes = LORA if variant == "spt_lora" else ADAPTER
    found = []
    for name in NAMES:
        layer = name.split(".")[-2]
        if name.endswith("qkv.weight"):
            found += [(name, p * D * D, D * D, True, sizes["qkv"]) for p in range(3)]
        elif name.endswith("qkv.bias"):
            found += [(name, p * D, D, False, D) for p in range(3)]
        elif name.endswith(".weight") and layer in sizes:
            rows, cols = {"proj": (D, D), "fc1": (HIDDEN, D), "fc2": (D, HIDDEN)}[layer]
            found.append((name, 0, rows * cols, True, sizes[layer]))
        else:
            size = HIDDEN if name.endswith("fc1.bias") else D
            found.append((name, 0, size, False, size))
    return found


def reference_allocation(variant: str, scores: np.ndarray, slots: int):
    """tau (the largest whose total fits), the structured (name, part) set, and per tensor the chosen flat positions
    of its entry-tuned sites (every position of a whole vector), from the code's rule written out."""
    table = sites(variant)
    site_of = np.repeat(np.arange(len(table)), [s[2] for s in table])
    order = np.argsort(-scores, kind="stable")

    def allocation(tau):
        counts = np.bincount(site_of[order[:tau]], minlength=len(table))
        whole = [c >= cost / (10.0 if matrix else 5.0)  # the code's alpha 10 (matrices), beta 5 (vectors)
                 for c, (_, _, _, matrix, cost) in zip(counts, table, strict=True)]
        total = sum(cost if w else c for c, w, (*_, cost) in zip(counts, whole, table, strict=True))
        return total, whole

    low, high = 0, len(scores)  # the total never falls as tau grows
    while low < high:
        low, high = ((low + high + 1) // 2, high) if allocation((low + high + 1) // 2)[0] <= slots else (
            low, (low + high + 1) // 2 - 1)
    tau = low
    assert allocation(tau)[0] <= slots and (tau == len(scores) or allocation(tau + 1)[0] > slots)
    whole = allocation(tau)[1]
    chosen_global = set(order[:tau].tolist())
    starts = np.cumsum([0] + [s[2] for s in table])
    structured, entries = set(), {}
    for i, (name, first, size, matrix, _) in enumerate(table):
        if matrix and whole[i]:
            structured.add((name.rsplit(".", 1)[0], first // size))
            continue
        picked = range(size) if whole[i] else [g - starts[i] for g in range(starts[i], starts[i + 1])
                                                if g in chosen_global]
        entries.setdefault(name, set()).update(first + p for p in picked)
    return tau, structured, {name: positions for name, positions in entries.items() if positions}


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(12, 3, 32, 32, generator=g), torch.tensor([0, 1, 2] * 4))


def built(variant: str = "spt_lora", **options):
    torch.manual_seed(0)
    plain = make_tiny_vit().eval()
    model = create_method(variant, copy.deepcopy(plain), num_classes=3, **{"budget": BUDGET, **options})
    plain.reset_classifier(3)
    plain.head.load_state_dict(model.backbone.head.state_dict())
    return model, plain


def wrapped(model) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("backbone."): m for n, m in model.named_modules()
            if isinstance(m, (SPTLinear, SPTLayerNorm))}


def allocation_of(model) -> tuple[set, dict]:
    """The model's structured (layer, part) set and per tensor the positions its entries add to, read off its
    layout."""
    layout, index = model.spt.layout.tolist(), model.spt.index.tolist()
    structured, entries = set(), {}
    for name, layer in wrapped(model).items():
        w_start, w_end, b_start, b_end, *offsets = layout[layer.row]
        structured |= {(name, p) for p, offset in enumerate(offsets) if offset >= 0}
        entries[f"{name}.weight"] = set(index[w_start:w_end])
        entries[f"{name}.bias"] = set(index[b_start:b_end])
    return structured, {k: v for k, v in entries.items() if v}


def reference_scores(plain, batches: int, batch_size: int = 4) -> np.ndarray:
    images, labels = data().tensors
    tensors = [plain.get_parameter(n) for n in NAMES]
    plain.requires_grad_(True)
    total = [torch.zeros_like(t) for t in tensors]
    for b in range(batches):
        part = slice(b * batch_size, (b + 1) * batch_size)
        grads = torch.autograd.grad(F.cross_entropy(plain(images[part]), labels[part]), tensors)
        total = [s + g.square() for s, g in zip(total, grads, strict=True)]
    return torch.cat([s.flatten() for s in total]).detach().numpy()


@pytest.mark.parametrize("variant", ["spt_lora", "spt_adapter"])
def test_scores_are_squared_gradients_summed_over_the_first_batches(variant):
    model, plain = built(variant, sensitivity_batches=2)
    scores = model.sensitivity(DataLoader(data(), batch_size=4))  # 3 batches, the first 2 count
    np.testing.assert_allclose(scores.numpy(), reference_scores(plain, 2), rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("variant", ["spt_lora", "spt_adapter"])
def test_selection_follows_the_codes_rule(variant):
    model, plain = built(variant, sensitivity_batches=3)
    model.select_from_data(DataLoader(data(), batch_size=4))
    tau, structured, entries = reference_allocation(variant, reference_scores(plain, 3), SLOTS)
    assert model.tau == tau
    assert allocation_of(model) == (structured, entries)
    assert structured and any(n.endswith(".weight") and "norm" not in n for n in entries), "both granularities"


@pytest.mark.parametrize("variant", ["spt_lora", "spt_adapter"])
def test_before_a_selection_the_first_entries_are_chosen(variant):
    model, _ = built(variant)
    ramp = np.arange(sum(s[2] for s in sites(variant)), 0, -1).astype(np.float64)
    tau, structured, entries = reference_allocation(variant, ramp, SLOTS)
    assert (model.tau, allocation_of(model)) == (tau, (structured, entries))


@pytest.mark.parametrize("variant", ["spt_lora", "spt_adapter"])
def test_after_a_selection_it_is_still_the_pretrained_function(variant, tiny_batch):
    model, plain = built(variant)
    model.select_from_data(DataLoader(data(), batch_size=4))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tiny_batch[0]), plain(tiny_batch[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["spt_lora", "spt_adapter"])
def test_training_moves_only_the_chosen_entries(variant, tiny_batch):
    model, _ = built(variant)
    model.select_from_data(DataLoader(data(), batch_size=4))
    layers = wrapped(model)
    before = {n: [t.detach().clone() for t in m.weights() if t is not None] for n, m in layers.items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model.model_step(tiny_batch)[0].backward()
        optimizer.step()
    _, entries = allocation_of(model)
    moved_any = False
    for name, layer in layers.items():
        for kind, old, new in zip(("weight", "bias"), before[name], layer.weights(), strict=False):
            changed = set((old.flatten() != new.detach().flatten()).nonzero().flatten().tolist())
            assert changed <= entries.get(f"{name}.{kind}", set()), f"{name}.{kind}: unchosen entries moved"
            moved_any |= bool(changed)
    assert moved_any
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_branches_compute_the_codes_formulas():
    """LoRA: y_p = W_p x + b_p + B A x; adapter: y_p + up(GELU(down(y_p))), the output projection's reading x."""
    x = torch.randn(2, 5, D)
    for variant in ("spt_lora", "spt_adapter"):
        model, _ = built(variant, budget=9000)
        with torch.no_grad():
            model.spt.values.normal_()
        model.eval()
        values, layout = model.spt.values.detach(), model.spt.layout.tolist()
        checked = 0
        for name, layer in wrapped(model).items():
            if not isinstance(layer, SPTLinear):
                continue
            weight, bias = (t.detach() for t in layer.weights())
            out = layer.out_features // layer.parts
            inputs = x if layer.in_features == D else torch.randn(2, 5, HIDDEN)
            expected = list(F.linear(inputs, weight, bias).split(out, dim=-1))
            for p, offset in enumerate(layout[layer.row][4:4 + layer.parts]):
                if offset < 0:
                    continue
                checked += 1
                if variant == "spt_lora":
                    a = values[offset:offset + RANK * layer.in_features].view(RANK, layer.in_features)
                    b = values[offset + a.numel():offset + a.numel() + out * RANK].view(out, RANK)
                    expected[p] = expected[p] + inputs @ a.T @ b.T
                else:
                    source = inputs if name.endswith("attn.proj") else expected[p]
                    width = source.shape[-1]
                    at = [offset, offset + RANK * width, offset + RANK * width + RANK]
                    down_w = values[at[0]:at[1]].view(RANK, width)
                    down_b = values[at[1]:at[2]]
                    up_w = values[at[2]:at[2] + out * RANK].view(out, RANK)
                    up_b = values[at[2] + out * RANK:at[2] + out * RANK + out]
                    expected[p] = expected[p] + F.gelu(source @ down_w.T + down_b) @ up_w.T + up_b
            with torch.no_grad():
                torch.testing.assert_close(layer(inputs), torch.cat(expected, dim=-1), rtol=1e-5, atol=1e-5)
        assert checked >= 4


def test_a_trainer_selects_before_the_first_step_and_a_rebuilt_model_keeps_it(tiny_batch):
    model, _ = built("spt_adapter")
    loader = DataLoader(data(), batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    assert bool(model.selected)
    reference, _ = built("spt_adapter")
    reference.select_from_data(loader)
    assert allocation_of(model) == allocation_of(reference)

    rebuilt, _ = built("spt_adapter")  # the never-trained allocation, then the checkpoint's tensors
    saved, _ = trained_tensors(model)
    with torch.no_grad():
        for name, target in trained_tensors(rebuilt)[0].items():
            target.copy_(saved[name])
    assert allocation_of(rebuilt) == allocation_of(model)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tiny_batch[0]), model(tiny_batch[0]), rtol=0, atol=0)


def test_a_budget_within_the_class_token_is_refused():
    with pytest.raises(ValueError, match="budget=32 leaves nothing besides the class token's 32"):
        create_method("spt_lora", make_tiny_vit(), num_classes=3, budget=32)
