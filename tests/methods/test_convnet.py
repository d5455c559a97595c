"""The other methods on ConvNets (timm ResNet / ConvNeXt): what partial_k's stages are (the VPT code's ResNet
"partial-k"), where mlp_k's head sits (after the pooling and ConvNeXt's head norm), the linear probe's frozen
features and the feature cache's fingerprint of them, full's dropout, and the methods that refuse a ConvNet through
`benchmark.run` (exit status 2, one line)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmark.core.features import backbone_fingerprint
from benchmark.params import main as main_params
from benchmark.run import main
from methods import create_method
from tests.helpers.models import make_tiny_convnet


def tuned_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def params_of(module: nn.Module, prefix: str) -> set[str]:
    return {f"backbone.{prefix}.{n}" for n, _ in module.named_parameters()}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_partial_k_on_a_resnet_tunes_its_last_k_layers_as_the_vpt_code(k):
    model = create_method("partial_k", make_tiny_convnet("resnet"), num_classes=3, k=k)
    backbone = model.backbone
    # VPT code: partial-1 = layer4, partial-2 = layer3 + layer4, partial-3 = layer2..layer4 (+ avgpool, no params)
    layers = [f"layer{i}" for i in range(5 - k, 5)]
    expected = set().union(*(params_of(getattr(backbone, name), name) for name in layers))
    expected |= params_of(backbone.fc, "fc")
    assert tuned_names(model) == expected


@pytest.mark.parametrize("k", [1, 2])
def test_partial_k_on_a_convnext_tunes_its_last_k_stages_and_the_head_norm(k):
    model = create_method("partial_k", make_tiny_convnet("convnext"), num_classes=3, k=k)
    backbone = model.backbone
    expected = set().union(*(params_of(backbone.stages[i], f"stages.{i}") for i in range(4 - k, 4)))
    expected |= params_of(backbone.head.norm, "head.norm") | params_of(backbone.head.fc, "head.fc")
    assert any("downsample" in n for n in expected)  # a timm stage holds its downsampling layer
    assert tuned_names(model) == expected


def test_partial_k_beyond_the_stages_names_the_range():
    with pytest.raises(ValueError, match=r"exceeds the backbone's 4 stages; choose k in 1\.\.4"):
        create_method("partial_k", make_tiny_convnet("resnet"), num_classes=3, k=5)


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_mlp_k_replaces_the_classifier_after_the_pooling(kind):
    torch.manual_seed(0)
    backbone = make_tiny_convnet(kind)
    plain = copy.deepcopy(backbone).eval()
    model = create_method("mlp_k", backbone, num_classes=3, k=3).eval()
    head = model.backbone.get_classifier()
    layers = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(64, 64), (64, 64), (64, 3)]  # pooled width 64
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # written out: features -> average pool -> (ConvNeXt) head norm -> the MLP
        pooled = plain.forward_features(images).mean(dim=(2, 3))
        if kind == "convnext":
            pooled = plain.head.norm(pooled[..., None, None]).flatten(1)
        torch.testing.assert_close(model(images), head(pooled), rtol=0, atol=1e-5)
    assert tuned_names(model) == {f"backbone.{model.backbone.pretrained_cfg['classifier']}.{n}"
                                  for n, _ in head.named_parameters()}


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_linear_probe_reads_the_pooled_features_and_takes_them_cached(kind):
    torch.manual_seed(0)
    model = create_method("linear", make_tiny_convnet(kind), num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    features = model.frozen_features(images).clone()
    assert features.shape == (2, 64)
    from_images = model(images)
    model.read_features(True)
    torch.testing.assert_close(model(features), from_images, rtol=0, atol=0)


def test_the_feature_cache_fingerprint_holds_convnexts_head_norm_not_its_classifier():
    model = create_method("linear", make_tiny_convnet("convnext"), num_classes=3)
    before = backbone_fingerprint(model)
    with torch.no_grad():
        model.backbone.head.fc.weight.add_(1.0)  # the trained classifier: not part of the features
    assert backbone_fingerprint(model) == before
    with torch.no_grad():
        model.backbone.head.norm.weight.add_(1.0)  # frozen, before the classifier: the features change
    assert backbone_fingerprint(model)["weights"] != before["weights"]


def test_full_fine_tuning_trains_everything_and_leaves_dropout_to_vits():
    model = create_method("full", make_tiny_convnet("convnext"), num_classes=3, dropout=0.1)
    assert tuned_names(model) == {n for n, _ in model.named_parameters()}
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("method", ["vpt_deep", "adapter", "lora"])
def test_methods_needing_tokens_refuse_a_convnet_with_exit_status_2(method, tmp_path, capsys):
    assert main(["--method", method, "--backbone", "resnet18", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"Method {method!r} does not support convnet backbones (a timm ResNet); it supports: vit" in err
    assert "vpt_shallow" in err  # the methods that do support it are named
    assert not any(tmp_path.iterdir())


def test_params_cli_counts_every_convnet_method_on_resnet50(capsys):
    from methods.registry import methods_for_family

    assert main_params(["--backbone", "resnet50", "--num-classes", "200", "--csv"]) == 0  # make params BACKBONE=
    rows = [line.split(",") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == methods_for_family("convnet")
    tuned = {row[0]: int(row[1]) for row in rows}
    assert tuned["linear"] == 2048 * 200 + 200 and tuned["full"] == int(rows[0][2])
