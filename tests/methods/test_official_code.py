"""Where the suite follows the official VPT code (github.com/KMnP/vpt) on what trains in which mode, full
fine-tuning's dropout and the head's init; and that a run checks its data before it reads any weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import benchmark.core.pipeline as pipeline
from backbones import create_backbone, data_config
from benchmark.core.config import RunConfig
from benchmark.core.validate import planned_data_config
from benchmark.run import main
from methods import create_method, list_methods
from methods.base import TuningModule
from tests.helpers.models import make_tiny_vit, tiny_options

FROZEN_BACKBONE_METHODS = [m for m in list_methods() if m != "full"]
DROPPY = dict(drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3, pos_drop_rate=0.3, drop_path_rate=0.3)
OPTIONS = {"vpt_shallow": {"prompt_length": 3, "prompt_dropout": 0.0},
           "vpt_deep": {"prompt_length": 3, "prompt_dropout": 0.0}, "mlp_k": {"dropout": 0.0},
           "fact_tt": {"dropout": 0.0}, "fact_tk": {"dropout": 0.0},  # FacT's own dropout is on its added update
           "vqt": {"query_dropout": 0.0},
           # their own branches' drop-path / dropout (Adapter+'s 0.1, Mona's 0.1, VFPT's prompt dropout)
           "adapter_plus": {"adapter_drop_path": 0.0}, "mona": {"dropout": 0.0},
           "vfpt": {"prompt_length": 3, "prompt_dropout": 0.0}}


def droppy_model(method: str, **options) -> TuningModule:
    torch.manual_seed(0)
    return create_method(method, make_tiny_vit(**DROPPY), num_classes=3,
                         **{**tiny_options(method), **OPTIONS.get(method, {}), **options})


@pytest.mark.parametrize("method", FROZEN_BACKBONE_METHODS)
def test_frozen_backbone_never_applies_its_dropout_or_drop_path_in_training(method, tiny_batch):
    """The official code's froze_enc / prompt train(): a frozen backbone built with dropout 0.3 and drop-path 0.3
    gives in train mode exactly its eval-mode outputs (dropout at 0.3 would change them on every call)."""
    model = droppy_model(method)
    images, _ = tiny_batch
    model.eval()
    with torch.no_grad():
        expected = model(images)
    model.train()
    with torch.no_grad():
        first, second = model(images), model(images)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-6)
    # the pretrained backbone's own dropouts; those a method adds (adaptformer's, convpass's) follow train()
    dropouts = [m for m in model.pretrained_modules if isinstance(m, nn.Dropout) and m.p > 0]
    assert dropouts and not any(m.training for m in dropouts)


def test_modules_a_method_adds_follow_train_mode():
    """Prompt dropout (VPT-deep's default 0.1) and mlp_k's head dropout live outside the pretrained backbone."""
    vpt = droppy_model("vpt_deep", prompt_dropout=0.1).train()
    assert vpt.prompt_dropout.training and vpt.prompt_dropout.p == 0.1
    mlp = droppy_model("mlp_k", dropout=0.1).train()
    head_dropouts = [m for m in mlp.backbone.head.modules() if isinstance(m, nn.Dropout)]
    assert len(head_dropouts) == 2 and all(m.training for m in head_dropouts)  # k=3: two hidden layers
    adapter = droppy_model("adapter").train()
    assert all(block.mlp.adapter.training for block in adapter.backbone.blocks)
    assert not any(block.mlp.mlp.training for block in adapter.backbone.blocks)  # the wrapped pretrained MLP


def test_full_fine_tuning_trains_the_backbone_in_train_mode(tiny_batch):
    model = droppy_model("full").train()
    assert all(m.training for m in model.modules())
    images, _ = tiny_batch
    with torch.no_grad():
        assert not torch.allclose(model(images), model(images))  # dropout 0.3 active


def test_full_dropout_option_sets_the_official_configs_dropout_sites():
    """dropout_rate of the VPT code's ViT config: MLP after the activation and after fc2, after the position
    embedding; attention dropout stays 0."""
    model = create_method("full", make_tiny_vit(), num_classes=3, dropout=0.1)
    depth = len(model.backbone.blocks)
    rates = {name: m.p for name, m in model.backbone.named_modules() if isinstance(m, nn.Dropout)}
    expected = {"pos_drop": 0.1} | {f"blocks.{i}.mlp.{d}": 0.1 for i in range(depth) for d in ("drop1", "drop2")}
    assert {name: p for name, p in rates.items() if p > 0} == expected
    assert all(rates[f"blocks.{i}.attn.{d}"] == 0 for i in range(depth) for d in ("attn_drop", "proj_drop"))


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.1", True])
def test_full_dropout_option_rejects_values_outside_0_1(dropout):
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        create_method("full", make_tiny_vit(), num_classes=3, dropout=dropout)


def test_vpt_head_init_is_kaiming_normal_over_fan_out_with_the_constant_bias():
    """src/models/mlp.py: kaiming_normal_(a=0, mode='fan_out') -> std sqrt(2 / num_classes); special_bias
    -log((1 - 0.01) / 0.01)."""
    torch.manual_seed(0)
    classes = 400
    model = create_method("linear", make_tiny_vit(embed_dim=256, num_heads=2), num_classes=classes, head_init="vpt")
    head = model.backbone.head
    assert abs(head.weight.std().item() / math.sqrt(2 / classes) - 1) < 0.03  # 102,400 samples: ~0.2% noise
    assert abs(head.weight.mean().item()) < 0.002
    torch.testing.assert_close(head.bias, torch.full((classes,), -math.log(99.0)))


def test_pytorch_head_init_is_nn_linears_uniform_bound():
    torch.manual_seed(0)
    model = create_method("linear", make_tiny_vit(), num_classes=50)
    bound = 1 / math.sqrt(32)  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = width 32
    for tensor in (model.backbone.head.weight, model.backbone.head.bias):
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.9 * bound


def test_vpt_head_init_reaches_the_last_layer_of_an_mlp_head():
    model = create_method("mlp_k", make_tiny_vit(), num_classes=7, head_init="vpt", k=2)
    torch.testing.assert_close(model.backbone.head[-1].bias, torch.full((7,), -math.log(99.0)))
    with pytest.raises(ValueError, match="head_init must be one of pytorch, vpt"):
        create_method("linear", make_tiny_vit(), num_classes=7, head_init="xavier")


def test_paper_recipe_uses_the_official_head_and_full_dropout_quick_recipe_does_not():
    paper_full = RunConfig(method="full", dataset="cub").resolved()
    assert (paper_full.recipe, paper_full.head_init, paper_full.method_options) == ("paper", "vpt", {"dropout": 0.1})
    paper_vpt = RunConfig(method="vpt_deep", dataset="cub").resolved()
    assert paper_vpt.head_init == "vpt" and "dropout" not in paper_vpt.method_options
    quick = RunConfig(method="full", dataset="digits").resolved()
    assert (quick.recipe, quick.head_init, quick.method_options) == ("quick", "pytorch", {})
    assert RunConfig(method="full", dataset="cub", head_init="pytorch").resolved().head_init == "pytorch"


# --- checks before costs -------------------------------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a run builds its real backbone (the step that reads or fetches weights)."""
    built = []

    def refuse(*args, **kwargs):
        built.append(args)
        raise AssertionError("the backbone was built before the data was checked")

    monkeypatch.setattr(pipeline, "create_backbone", refuse)
    return built


def test_missing_data_root_is_reported_before_any_weights_are_fetched(no_weights, tmp_path, capsys):
    """`make bench DATASET=cub` without DATA_ROOT: the paper backbone's weights would come from the hub."""
    status = main(["--dataset", "cub", "--method", "vpt_deep", "--results-dir", str(tmp_path)])
    assert status == 2 and not no_weights
    assert "no DATA_ROOT was given" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_fraction_too_small_for_the_class_sizes_is_reported_before_weights(no_weights, tmp_path, capsys):
    # digits' smallest training class: fraction * n + 0.5 < 1 keeps none of it for any n < 500
    status = main(["--dataset", "digits", "--method", "linear", "--fraction", "0.001", "--results-dir", str(tmp_path)])
    assert status == 2 and not no_weights
    assert "FRACTION=0.001 is too small for digits" in capsys.readouterr().err


@pytest.mark.parametrize("backbone, kwargs", [("vit_embedded_p7_28", {}), ("vit_tiny_patch16_224", {"img_size": 64})])
def test_planned_data_config_equals_the_built_backbones(backbone, kwargs):
    cfg = RunConfig(method="linear", dataset="digits", backbone=backbone, backbone_kwargs=kwargs).resolved()
    assert planned_data_config(cfg) == data_config(create_backbone(backbone, pretrained=False, **kwargs))
