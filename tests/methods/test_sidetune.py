"""sidetune: the VPT code's side network (github.com/KMnP/vpt, src/models/vit_models.py `setup_side` / `forward`):
count, what trains, a hand-written forward, the feature cache kept off, side weights and bad options."""

from __future__ import annotations

import copy
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.core.config import RunConfig
from benchmark.core.features import can_cache
from benchmark.core.pipeline import run, with_feature_cache
from benchmark.params import count_params
from benchmark.sweeps.heads import can_share_a_pass
from methods import create_method, get_method_class
from tests.helpers.data import DeterministicData
from tests.helpers.models import make_tiny_vit
from tests.helpers.sidetune import ALEXNET_FEATURES, SIDE_OUT, sidetune_count
from tests.helpers.training import train_steps

D, C = 768, 200  # ViT-B/16 width; CUB-200's classes


def alexnet_side_by_hand(model, images: torch.Tensor) -> torch.Tensor:
    """torchvision's AlexNet features + avgpool written out (strides, paddings, pools), then the projection."""
    convs = [model.side.features[i] for i in (0, 3, 6, 8, 10)]
    x = F.max_pool2d(F.relu(F.conv2d(images, convs[0].weight, convs[0].bias, stride=4, padding=2)), 3, 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, convs[1].weight, convs[1].bias, padding=2)), 3, 2)
    for conv in convs[2:]:
        x = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    x = F.adaptive_avg_pool2d(F.max_pool2d(x, 3, 2), (6, 6))
    return x.flatten(1) @ model.side_projection.weight.T


def test_vit_b_count_is_the_vpt_codes_side_network():
    assert ALEXNET_FEATURES == 2_469_696
    assert sidetune_count(D, C) == 9_701_385  # issue 16
    table = count_params("vit_base_patch16_224", C, methods=["sidetune", "full"]).set_index("method")
    assert table.loc["sidetune", "tuned_params"] == sidetune_count(D, C)
    added = ALEXNET_FEATURES + SIDE_OUT * D + 1
    assert table.loc["sidetune", "total_params"] == table.loc["full", "total_params"] + added


def test_class_facts_and_alpha_starts_at_zero():
    cls = get_method_class("sidetune")
    assert (cls.label, cls.color, cls.paper_row) == ("Sidetune", "#aec7e8", 4)
    assert cls.identity_at_init is False  # sigmoid(0) = 1/2: half side network from the first step
    model = create_method("sidetune", make_tiny_vit(), num_classes=3)
    assert model.side_alpha.shape == () and model.side_alpha.item() == 0.0
    assert model.side_projection.bias is None and model.side_projection.weight.shape == (32, SIDE_OUT)


def test_head_reads_the_blend_of_backbone_and_side_features(tiny_batch):
    """RGB 32 px images, resized to 96 px for the side net; alpha moved off 0 so the two weights differ."""
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    plain = copy.deepcopy(backbone).eval()
    model = create_method("sidetune", backbone, num_classes=3, side_input_size=96).eval()
    with torch.no_grad():
        model.side_alpha.fill_(0.7)
        images = tiny_batch[0]
        f = plain.forward_head(plain.forward_features(images), pre_logits=True)
        resized = F.interpolate(images, size=(96, 96), mode="bilinear", align_corners=False)
        side = alexnet_side_by_hand(model, resized)
        a = 1 / (1 + torch.exp(torch.tensor(-0.7)))
        expected = (a * f + (1 - a) * side) @ model.backbone.head.weight.T + model.backbone.head.bias
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def test_grey_images_are_resized_then_repeated_to_three_channels():
    """The embedded backbone's case: 1 x 28 x 28 images, side net at 64 px."""
    torch.manual_seed(0)
    backbone = make_tiny_vit(img_size=28, patch_size=7, in_chans=1)
    plain = copy.deepcopy(backbone).eval()
    model = create_method("sidetune", backbone, num_classes=3, side_input_size=64).eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        grey = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
        side = alexnet_side_by_hand(model, torch.cat([grey, grey, grey], dim=1))
        f = plain.forward_head(plain.forward_features(images), pre_logits=True)
        expected = (0.5 * f + 0.5 * side) @ model.backbone.head.weight.T + model.backbone.head.bias
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def test_224_px_rgb_images_reach_the_side_network_unresized():
    model = create_method("sidetune", make_tiny_vit(), num_classes=3)
    images = torch.randn(1, 3, 224, 224)
    assert model.side_input(images) is images  # the VPT code's input on its 224 px ViTs


def test_training_moves_exactly_the_side_network_projection_alpha_and_head(tiny_batch):
    torch.manual_seed(0)
    model = create_method("sidetune", make_tiny_vit(), num_classes=3, side_input_size=64)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    side_convs = {f"side.features.{i}.{w}" for i in (0, 3, 6, 8, 10) for w in ("weight", "bias")}
    assert tuned == side_convs | {"side_projection.weight", "side_alpha", "backbone.head.weight", "backbone.head.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == tuned  # the backbone stays bit-identical


def test_backbone_runs_without_autograd_in_eval_mode_and_the_side_net_follows_train(tiny_batch):
    model = create_method("sidetune", make_tiny_vit(), num_classes=3, side_input_size=64).train()
    assert not model.backbone.blocks[0].training and model.side.training and model.backbone.head.training
    seen = {}
    model.backbone.blocks[-1].register_forward_hook(
        lambda _m, _i, out: seen.update(inference=torch.is_inference_mode_enabled(), grad=out.requires_grad))
    model.model_step(tiny_batch)[0].backward()
    assert seen == {"inference": True, "grad": False}
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if not n.startswith("head."))
    assert model.side_alpha.grad is not None and model.side.features[0].weight.grad.abs().sum() > 0


def test_never_served_from_cached_backbone_features():
    """The linear probe's cache replaces images with backbone features; the side path needs the images."""
    model = create_method("sidetune", make_tiny_vit(), num_classes=3)
    assert can_cache(create_method("linear", make_tiny_vit(), num_classes=3), DeterministicData())
    assert not can_cache(model, DeterministicData())
    data = DeterministicData()
    assert with_feature_cache(RunConfig(method="sidetune"), model, data, trainer=None) is data
    assert not can_share_a_pass(RunConfig(method="sidetune"))  # the one-pass head search trains on cached features


def test_runs_end_to_end_on_the_embedded_default_without_the_cache(tmp_path, capsys):
    cfg = RunConfig(method="sidetune", dataset="digits", train_fraction=0.1, epochs=1, results_dir=str(tmp_path))
    result = run(cfg)
    assert result["status"] == "ok" and "feature cache" not in capsys.readouterr().out
    assert not (tmp_path / "cache" / "features").exists()


def save_alexnet(path, seed: int = 3) -> dict:
    from torchvision.models import alexnet

    torch.manual_seed(seed)
    state = alexnet().state_dict()
    torch.save(state, path)
    return state


def test_side_weights_load_a_local_torchvision_alexnet_file(tmp_path):
    state = save_alexnet(tmp_path / "alexnet.pth")
    model = create_method("sidetune", make_tiny_vit(), num_classes=3, side_weights=str(tmp_path / "alexnet.pth"))
    loaded = model.side.state_dict()
    assert set(loaded) == {k for k in state if k.startswith("features.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


@pytest.mark.parametrize(("content", "error", "message"), [
    (None, FileNotFoundError, "does not exist"),
    (b"not a state dict", ValueError, "not a readable torch state dict"),
    ({"weight": torch.zeros(2, 2)}, ValueError, "not a torchvision AlexNet state dict"),
    ({"features.0.weight": torch.zeros(64, 3, 5, 5)}, ValueError, "not a torchvision AlexNet state dict"),
    ([1, 2], ValueError, "holds a list, not a state dict"),
])
def test_bad_side_weights_file_gets_one_clear_line(tmp_path, content, error, message):
    path = tmp_path / "side.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=message) as info:
        create_method("sidetune", make_tiny_vit(), num_classes=3, side_weights=str(path))
    assert "\n" not in str(info.value)


def test_side_pretrained_loads_torchvisions_weights_or_names_side_weights(tmp_path, monkeypatch):
    from torchvision.models import AlexNet_Weights

    state = save_alexnet(tmp_path / "alexnet.pth", seed=5)
    monkeypatch.setattr(type(AlexNet_Weights.IMAGENET1K_V1), "get_state_dict", lambda self, **kw: state)
    model = create_method("sidetune", make_tiny_vit(), num_classes=3, side_pretrained=True)
    assert torch.equal(model.side.features[0].weight, state["features.0.weight"])

    def offline(self, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(type(AlexNet_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(OSError, match=r"could not be fetched .* side_weights=<path>") as info:
        create_method("sidetune", make_tiny_vit(), num_classes=3, side_pretrained=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"side_input_size": 62}, r"side_input_size must be an integer in \[63, 1024\].*got 62"),
    ({"side_input_size": 2048}, r"side_input_size must be an integer in \[63, 1024\]"),
    ({"side_input_size": 64.0}, r"side_input_size must be an integer"),
    ({"side_input_size": True}, r"side_input_size must be an integer"),
    ({"side_pretrained": "yes"}, "side_pretrained must be true or false, got 'yes'"),
    ({"side_weights": 3}, "side_weights must be the path"),
    ({"side_pretrained": True, "side_weights": "a.pth"}, "not both"),
    ({"alpha": 0.5}, "has no option"),
])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("sidetune", make_tiny_vit(), num_classes=3, **options)


def test_side_input_size_63_is_the_smallest_alexnet_takes():
    model = create_method("sidetune", make_tiny_vit(), num_classes=3, side_input_size=63).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    side = nn.Sequential(*model.side.features)
    with pytest.raises(RuntimeError):  # one pixel less and the last max-pool has nothing to pool
        side(torch.randn(1, 3, 62, 62))


def test_backbones_of_other_channel_counts_are_refused():
    with pytest.raises(ValueError, match="takes 2 channels"):
        create_method("sidetune", make_tiny_vit(in_chans=2), num_classes=3)
