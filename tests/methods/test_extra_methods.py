"""partial_k, mlp_k and lora on a tiny ViT: registration, what trains, MLP head shape, LoRA init and merging."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from methods import create_method, list_methods
from methods.lora import LoRALinear
from tests.helpers.models import make_tiny_vit
from tests.helpers.paper import PAPER_METHODS
from tests.helpers.training import train_steps

EXTRA_METHODS = ["partial_k", "mlp_k", "lora"]


def expected_trainable(method: str, options: dict, name: str) -> bool:
    """What each extra protocol tunes, by parameter name, on the 2-block tiny ViT."""
    if name.startswith("backbone.head."):
        return True
    if method == "partial_k":
        first_tuned = 2 - options.get("k", 1)
        tuned_blocks = tuple(f"backbone.blocks.{i}." for i in range(first_tuned, 2))
        return name.startswith((*tuned_blocks, "backbone.norm."))
    if method == "lora":
        return ".lora_" in name
    return False  # mlp_k: the head only


def test_extra_methods_registered_after_the_paper_six():
    assert list_methods()[:9] == PAPER_METHODS + EXTRA_METHODS


CASES = [("partial_k", {}), ("partial_k", {"k": 2}), ("mlp_k", {}), ("mlp_k", {"k": 2}), ("lora", {}),
         ("lora", {"rank": 2, "alpha": 4}), ("lora", {"targets": "qkv_proj", "dropout": 0.1})]


@pytest.mark.parametrize(("method", "options"), CASES)
def test_training_changes_exactly_the_tuned_parameters(method, options, tiny_batch):
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(), num_classes=3, **options)
    for name, param in model.named_parameters():
        assert param.requires_grad == expected_trainable(method, options, name), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_batch)  # two steps: LoRA's A only sees error once B left zero
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_partial_k_tunes_fc_norm_of_a_mean_pooled_backbone():
    model = create_method("partial_k", make_tiny_vit(global_pool="avg", fc_norm=True), num_classes=3)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"backbone.fc_norm.weight", "backbone.fc_norm.bias", "backbone.blocks.1.attn.qkv.weight"} <= tuned
    assert not any(n.startswith(("backbone.blocks.0.", "backbone.norm.", "backbone.patch_embed.")) for n in tuned)


def test_mlp_k_head_layers_and_frozen_backbone_without_autograd(tiny_batch):
    model = create_method("mlp_k", make_tiny_vit(), num_classes=3)
    linears = [m for m in model.backbone.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 32), (32, 32), (32, 3)]  # MLP-3, width D
    assert linears[-1].weight.abs().max() <= 32 ** -0.5  # the linear head's default init, small logits at start
    assert isinstance(create_method("mlp_k", make_tiny_vit(), num_classes=3, k=1).backbone.head[0], torch.nn.Linear)
    model.train()
    assert not model.backbone.blocks[0].training and model.backbone.head.training  # head dropout on, backbone off
    seen = {}
    model.backbone.blocks[-1].register_forward_hook(
        lambda _m, _i, out: seen.update(inference=torch.is_inference_mode_enabled(), grad=out.requires_grad))
    model.model_step(tiny_batch)[0].backward()
    assert seen == {"inference": True, "grad": False}
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if not n.startswith("head."))


def test_mlp_k_reads_cached_features_like_images(tiny_batch):
    model = create_method("mlp_k", make_tiny_vit(), num_classes=3).eval()
    images = tiny_batch[0]
    from_images = model(images)
    features = model.frozen_features(images).clone()
    model.read_features(True)
    assert torch.equal(model(features), from_images)


def test_lora_starts_as_the_pretrained_function_and_keeps_state_dict_keys(tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    plain = copy.deepcopy(backbone)
    model = create_method("lora", backbone, num_classes=3).eval()
    assert set(plain.state_dict()) - {"head.weight", "head.bias"} < set(model.backbone.state_dict())
    layer = model.backbone.blocks[0].attn.qkv
    # the default targets=qv: the q and v thirds of the fused qkv (32 -> 96), each its own rank-8 A and B, stacked
    assert isinstance(layer, LoRALinear) and layer.lora_A.shape == (2 * 8, 32) and layer.lora_B.shape == (2 * 32, 8)
    assert layer.scaling == 1.0 and layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0  # alpha/r = 8/8
    features = model.backbone.forward_features(tiny_batch[0])
    assert torch.allclose(features, plain.eval().forward_features(tiny_batch[0]), atol=1e-6)


def test_lora_merge_for_eval_matches_unmerged_and_never_touches_base_weights(tiny_batch):
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, tiny_batch)  # B leaves zero, so the merged delta is not trivial
    model.eval()
    with torch.no_grad():
        unmerged = model(tiny_batch[0])
        model.merge_layers()
        assert all(layer.merged_weight is not None for layer in model.lora_layers())
        merged = model(tiny_batch[0])
    assert torch.allclose(merged, unmerged, atol=1e-5)
    layer = model.backbone.blocks[0].attn.qkv
    assert not torch.allclose(layer.merged_weight, layer.weight)  # the delta is in the merged copy ...
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # ... never in W
    model.train()
    assert all(layer.merged_weight is None for layer in model.lora_layers())  # training never reads a stale copy


class RecordMerged(L.Callback):
    """Which LoRA state each stage ran in, under a real Trainer."""

    def __init__(self):
        self.states = {"train": set(), "val": set()}

    def merged(self, module) -> bool:
        return all(layer.merged_weight is not None for layer in module.lora_layers())

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.states["train"].add(self.merged(module))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.states["val"].add(self.merged(module))


@pytest.mark.parametrize("merge_for_eval", [True, False])
def test_lora_merges_only_during_lightning_evaluation(merge_for_eval, tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    model = create_method("lora", make_tiny_vit(), num_classes=3, merge_for_eval=merge_for_eval)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    record = RecordMerged()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                        default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert record.states == {"train": {False}, "val": {merge_for_eval}}
    assert all(layer.merged_weight is None for layer in model.lora_layers())  # freed after evaluation
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


@pytest.mark.parametrize(("method", "options", "message"), [
    ("partial_k", {"k": 0}, r"partial_k k must be an integer >= 1 \(blocks to tune; .*\), got 0"),
    ("partial_k", {"k": "two"}, r"partial_k k must be an integer >= 1 .* got 'two'"),
    ("partial_k", {"k": 3}, "exceeds the backbone's 2 blocks; choose k in 1..2"),
    ("mlp_k", {"k": 0}, r"mlp_k k must be an integer >= 1 \(head layers; k=1 is the linear probe\), got 0"),
    ("mlp_k", {"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ("mlp_k", {"dropout": "high"}, r"dropout must be a number in \[0, 1\), got 'high'"),
    ("lora", {"rank": 0}, "rank must be a positive integer"),
    ("lora", {"rank": 2.5}, "rank must be a positive integer"),
    ("lora", {"rank": "eight"}, "rank must be a positive integer"),
    ("lora", {"alpha": 0}, "alpha must be a positive number"),
    ("lora", {"merge_for_eval": "yes"}, "merge_for_eval must be true or false"),
    ("lora", {"k": 1}, "has no option"),
])
def test_bad_options_name_the_problem(method, options, message):
    with pytest.raises(ValueError, match=message):
        create_method(method, make_tiny_vit(), num_classes=3, **options)
