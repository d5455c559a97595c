"""Every registered method, one epoch through `benchmark.core.pipeline.run` (the path of `make bench`): on the
embedded default (its pretrained backbone, the digits task) and on a tiny random-init ViT over each image-file
dataset family (FGVC JSON, VTAB-1k lists, a class-folder tree), each from a fixture written here; every method that
supports Swin on a tiny Swin, and every method of the convnet family on a tiny ResNet and ConvNeXt, each from a
local weights file, over FGVC and over the embedded digits (grey 28 px)."""

from __future__ import annotations

import pytest
import torch

from backbones import create_backbone, data_config
from benchmark.core.config import EMBEDDED_BACKBONE, RunConfig
from benchmark.core.pipeline import run
from datamodules import create_datamodule
from methods import list_methods
from methods.registry import methods_for_family
from tests.helpers.data import make_fgvc, make_folder, make_vtab
from tests.helpers.models import TINY_BACKBONES, TINY_CONVNETS, TINY_METHOD_OPTIONS, TINY_VIT, tiny_options

pytestmark = pytest.mark.filterwarnings("ignore:DATASET=.*train.json has 3 classes:UserWarning")

# The fast suite runs the paper's six and one method of each other code path a run takes (a merge-for-eval method,
# a peft-table tuner, a method that selects from the training data) end to end; every other method, whose own
# contract (tests/methods/test_zoo_contract.py, tests/benchmark/core/test_evaluate.py) runs in the fast suite, runs
# end to end in `make test-slow`: a run is seconds, and the zoo has 60+ methods.
PAPER_SIX = ("full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep")
FAST = (*PAPER_SIX, "lora", "hra", "gps")


def fast_or_slow(cases, method_of=lambda case: case):
    """Each case as is when its method is in FAST, else marked slow."""
    return [case if method_of(case) in FAST else pytest.param(*(case if isinstance(case, tuple) else (case,)),
                                                              marks=pytest.mark.slow) for case in cases]


def check(result: dict, n_test: int) -> None:
    assert result["status"] == "ok", result.get("error")
    assert 0 < result["tuned_params"] < result["total_params"] or result["method"] == "full"
    # top-1 is a count of right answers over the test split: a multiple of 100 / n_test
    hits = result["test_top1"] * n_test / 100
    assert abs(hits - round(hits)) < 1e-3 and 0 <= round(hits) <= n_test


@pytest.fixture(scope="module")
def digits_test_size():
    dm = create_datamodule("digits", data_config=data_config(create_backbone(EMBEDDED_BACKBONE)), train_fraction=0.1)
    dm.setup()
    return len(dm.splits["test"].labels)


@pytest.mark.parametrize("method", fast_or_slow(list_methods()))
def test_on_the_embedded_default(method, digits_test_size, tmp_path):
    cfg = RunConfig(method=method, dataset="digits", train_fraction=0.1, epochs=1, results_dir=str(tmp_path))
    check(run(cfg), digits_test_size)


@pytest.fixture(scope="module")
def family_roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # test images: cub 3 per class x 3 classes, vtab 2 x 4, folder 2 x 3
    return {"cub": make_fgvc(root / "cub", "cub"), "vtab/kitti": make_vtab(root / "vtab-1k"),
            "folder": make_folder(root / "folder", {"train": 4, "val": 1, "test": 2})}


# On the file families the paper's six in the fast suite, every method in `make test-slow`.


@pytest.mark.parametrize("family", ["cub", pytest.param("vtab/kitti", marks=pytest.mark.slow),
                                    pytest.param("folder", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", [m if m in PAPER_SIX else pytest.param(m, marks=pytest.mark.slow)
                                    for m in list_methods()])
def test_on_each_dataset_family_with_a_tiny_vit(method, family, family_roots, tmp_path):
    cfg = RunConfig(method=method, dataset=family, data_root=str(family_roots[family]), train_fraction=1.0,
                    backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT, epochs=1,
                    warmup_epochs=0, batch_size=4, method_options=tiny_options(method),
                    results_dir=str(tmp_path / "results"))
    check(run(cfg), {"cub": 9, "vtab/kitti": 8, "folder": 6}[family])


# The three non-ViT families' tiny stand-ins, each saved as a local WEIGHTS file (random init; no hub).
NON_VIT = {"swin": TINY_BACKBONES["swin"], **TINY_CONVNETS}


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("local-weights")
    paths = {}
    for kind, (name, kwargs) in NON_VIT.items():
        torch.manual_seed(0)
        paths[kind] = root / f"{kind}.pth"
        torch.save(create_backbone(name, pretrained=False, **kwargs).state_dict(), paths[kind])
    return paths


def non_vit_run(kind: str, method: str, options: dict, weights, **data) -> dict:
    name, kwargs = NON_VIT[kind]
    if kind == "swin" and method.startswith("vpt"):
        options = {"prompt_length": 5, **options}
    options = {**TINY_METHOD_OPTIONS.get((method, "swin" if kind == "swin" else "convnet"), {}), **options}
    result = run(RunConfig(method=method, backbone=name, weights=str(weights), backbone_kwargs=kwargs, epochs=1,
                           warmup_epochs=0, batch_size=4, method_options=options, **data))
    assert result["config"]["weights"] == str(weights) and result["config"]["backbone"] == name
    return result


@pytest.mark.parametrize("method", fast_or_slow(methods_for_family("swin")))
def test_every_swin_method_on_fgvc_with_local_weights(method, family_roots, local_weights, tmp_path):
    check(non_vit_run("swin", method, {}, local_weights["swin"], dataset="cub", data_root=str(family_roots["cub"]),
                      train_fraction=1.0, results_dir=str(tmp_path / "results")), 9)


CONVNET_RUNS = [(m, {}) for m in methods_for_family("convnet")] + [("vpt_shallow", {"location": "below"})]


@pytest.mark.parametrize("kind", list(TINY_CONVNETS))
@pytest.mark.parametrize(("method", "options"), fast_or_slow(CONVNET_RUNS, lambda case: case[0]))
def test_every_convnet_method_on_fgvc_with_local_weights(method, options, kind, family_roots, local_weights,
                                                         tmp_path):
    check(non_vit_run(kind, method, options, local_weights[kind], dataset="cub", data_root=str(family_roots["cub"]),
                      train_fraction=1.0, results_dir=str(tmp_path / "results")), 9)


# The embedded tasks are grey 28 px: each backbone's data config (3 x 32 x 32 here) decides how they are resized and
# replicated to its channels, as the embedded ViT's own 1 x 28 x 28 does.
EMBEDDED_RUNS = ([("swin", m, {}) for m in methods_for_family("swin")]
                 + [(kind, m, options) for kind in TINY_CONVNETS for m, options in CONVNET_RUNS])


@pytest.mark.parametrize(("kind", "method", "options"), fast_or_slow(EMBEDDED_RUNS, lambda case: case[1]))
def test_every_non_vit_method_on_the_embedded_digits_with_local_weights(kind, method, options, digits_test_size,
                                                                          local_weights, tmp_path):
    check(non_vit_run(kind, method, options, local_weights[kind], dataset="digits", train_fraction=0.1,
                      results_dir=str(tmp_path / "results")), digits_test_size)
