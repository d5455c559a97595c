"""WiSE-FT (benchmark/analysis/interpolation.py): the interpolation rule on hand tensors; on tiny models, alpha 0 is
the pretrained function, 1 the tuned one and 0.5 the mean of the weights, for Full and each merging method, with
the head tuned throughout; and (slow) one real run rebuilt and scored from its checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmark.analysis import interpolation
from methods import create_method
from tests.helpers.models import make_tiny_vit


def test_interpolate_by_hand():
    pretrained = {"w": torch.tensor([0.0, 2.0]), "steps": torch.tensor(3)}
    tuned = {"w": torch.tensor([4.0, 6.0]), "steps": torch.tensor(7)}
    assert interpolation.interpolate(pretrained, tuned, 0.0)["w"].tolist() == [0.0, 2.0]
    assert interpolation.interpolate(pretrained, tuned, 1.0)["w"].tolist() == [4.0, 6.0]
    assert interpolation.interpolate(pretrained, tuned, 0.5)["w"].tolist() == [2.0, 4.0]
    assert interpolation.interpolate(pretrained, tuned, 0.25)["w"].tolist() == [1.0, 3.0]
    assert int(interpolation.interpolate(pretrained, tuned, 0.5)["steps"]) == 7  # a counter is the tuned one
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        interpolation.interpolate(pretrained, tuned, 1.5)
    with pytest.raises(ValueError, match="same tensors"):
        interpolation.interpolate({"w": pretrained["w"]}, tuned, 0.5)


def set_tensors(model, rule) -> None:
    """`rule(name, tensor)` -> the new value (or None: unchanged) of each trainable tensor."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = rule(name, p)
            if value is not None:
                p.copy_(value)


def perturbed(name, p):
    return p + 0.3 * torch.randn_like(p)


# Per merging method: the tensors that make its update vanish (its pretrained function) and a rule giving half its
# update, where the update is linear in one tensor (LoRA's B: W + s B A; SSF's (gamma - 1, beta))
NO_UPDATE = {
    "lora": lambda name, p: torch.zeros_like(p) if "lora_B" in name else None,
    "ssf": lambda name, p: torch.ones_like(p) if "ssf_scale" in name else torch.zeros_like(p) if "ssf_shift" in name
    else None,
    "repadapter": lambda name, p: torch.zeros_like(p) if ".up." in name else None,
}
HALF_UPDATE = {
    "lora": lambda name, p: p / 2 if "lora_B" in name else None,
    "ssf": lambda name, p: (1 + p) / 2 if "ssf_scale" in name else p / 2 if "ssf_shift" in name else None,
}


def logits(model, images, merged: bool = False):
    model.eval()
    if not merged and hasattr(model, "unmerge_layers"):
        model.unmerge_layers()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("method", sorted(NO_UPDATE))
def test_merged_weights_go_from_pretrained_to_tuned(method):
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(), num_classes=3)
    set_tensors(model, lambda name, p: perturbed(name, p) if p.requires_grad else None)
    images = torch.randn(4, 3, 32, 32)
    pretrained, tuned = copy.deepcopy(model), logits(model, images)
    set_tensors(pretrained, NO_UPDATE[method])
    path = interpolation.weight_path(model, None)
    assert len(path.tuned) >= 2 and path.tuned.keys() == path.pretrained.keys()
    for alpha, expected in ((0.0, logits(pretrained, images)), (1.0, tuned)):
        path.set_alpha(alpha)
        torch.testing.assert_close(logits(model, images, merged=True), expected, rtol=1e-4, atol=1e-5)
    if method in HALF_UPDATE:
        half = copy.deepcopy(model)
        set_tensors(half, HALF_UPDATE[method])
        path.set_alpha(0.5)
        torch.testing.assert_close(logits(model, images, merged=True), logits(half, images), rtol=1e-4, atol=1e-5)


def test_lora_ends_are_the_frozen_weight_and_w_plus_its_update():
    torch.manual_seed(0)
    model = create_method("lora", make_tiny_vit(), num_classes=3)
    set_tensors(model, lambda name, p: perturbed(name, p) if "lora_B" in name else None)
    path = interpolation.weight_path(model, None)
    layer = model.backbone.blocks[1].attn.qkv
    name = "backbone.blocks.1.attn.qkv.weight"
    assert torch.equal(path.pretrained[name], layer.weight)
    update = layer.delta_weight().detach()  # LoRA's own s B A (q and v rows of the fused qkv)
    assert update.abs().sum() > 0
    torch.testing.assert_close(path.tuned[name], layer.weight + update)
    path.set_alpha(0.5)
    torch.testing.assert_close(layer.merged_weight, layer.weight + 0.5 * update)


def test_full_interpolates_every_backbone_weight_but_keeps_the_tuned_head():
    torch.manual_seed(0)
    pretrained = create_method("full", make_tiny_vit(), num_classes=3)
    model = copy.deepcopy(pretrained)
    set_tensors(model, perturbed)
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    path = interpolation.weight_path(model, pretrained)
    assert not any(name.startswith("head.") for name in path.tuned)  # the head stays out of the path
    assert len(path.tuned) == sum(1 for k in model.backbone.state_dict() if not k.startswith("head."))
    path.set_alpha(0.5)
    now, before = model.state_dict(), pretrained.state_dict()
    for name in now:
        expected = tuned[name] if name.startswith("backbone.head.") else (before[name] + tuned[name]) / 2
        torch.testing.assert_close(now[name], expected, msg=name)
    path.set_alpha(0.0)
    torch.testing.assert_close(model.state_dict()["backbone.blocks.0.attn.qkv.weight"],
                               before["backbone.blocks.0.attn.qkv.weight"])


def test_only_full_and_the_merging_methods_have_a_path():
    assert [m for m in ("full", "lora", "ssf", "repadapter", "linear", "vpt_deep", "adapter", "bias")
            if interpolation.has_weight_path(m)] == ["full", "lora", "ssf", "repadapter"]
    assert interpolation.weight_path(create_method("vpt_deep", make_tiny_vit(), num_classes=3), None) is None


@pytest.mark.slow
def test_wise_ft_from_a_checkpoint_scores_the_run_at_alpha_1_and_draws_the_figure(tmp_path):
    from benchmark import report
    from benchmark.core.config import RunConfig
    from benchmark.core.pipeline import run

    result = run(RunConfig(method="lora", dataset="digits", epochs=1, results_dir=str(tmp_path)))
    rows = interpolation.wise_ft_run(tmp_path / result["checkpoint"], alphas=(0.0, 1.0))
    assert [(r["set"], r["alpha"]) for r in rows] == [("test", 0.0), ("test", 1.0)]
    assert rows[1]["top1"] == pytest.approx(result["test_top1"], abs=1e-4)
    assert report.main(["--results-dir", str(tmp_path), "--wise-ft"]) == 0
    assert (tmp_path / "figures" / "wise_ft.png").stat().st_size > 0
