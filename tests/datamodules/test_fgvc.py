"""FGVC-5 in VPT's JSON layout: image folders per task, class remapping, published fraction files, transforms,
and one end-to-end run on a tiny fixture with a tiny ViT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.core.config import RunConfig
from benchmark.core.pipeline import run
from datamodules import create_datamodule, fraction_indices, get_datamodule_class
from datamodules.checks import DataError
from datamodules.files import ImageFiles
from tests.helpers.data import FGVC_IMAGE_DIRS, make_fgvc
from tests.helpers.models import TINY_VIT
from tests.helpers.runs import record_tested_model, top1_by_hand

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bicubic"}
# The fixtures have 3 classes, not the paper's counts: that warning is asserted once, silenced elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:DATASET=.*train.json has 3 classes:UserWarning")


def datamodule(dataset: str, root: Path, **kwargs):
    dm = create_datamodule(dataset, data_config=DATA_CONFIG, data_root=str(root), **kwargs)
    dm.setup()
    return dm


@pytest.mark.parametrize("dataset", ["cub", "nabirds", "flowers", "dogs", "cars"])
def test_layout_sizes_and_remapped_labels(tmp_path, dataset):
    root = make_fgvc(tmp_path / dataset, dataset)
    with pytest.warns(UserWarning, match=f"train.json has 3 classes, the paper's {dataset} has"):
        dm = datamodule(dataset, root, train_fraction=1.0)
    assert dm.num_classes == 3
    assert {s: len(dm.splits[s].labels) for s in ("train", "val", "test")} == {"train": 18, "val": 6, "test": 9}
    train = dm.splits["train"]
    assert train.ids == sorted(train.ids)
    expected = {"003": 0, "017": 1, "200": 2}
    assert all(label == expected[i.split("/")[1][:3]] for i, label in zip(train.ids, train.labels, strict=True))
    path, label = train.dataset.samples[0]
    assert Path(path) == root / FGVC_IMAGE_DIRS[dataset] / train.ids[0] and label == train.labels[0]
    image, target = train.dataset[0]
    assert image.shape == (3, 32, 32) and target == train.labels[0]


def test_paper_class_counts():
    counts = {name: get_datamodule_class(name).paper_num_classes for name in FGVC_IMAGE_DIRS}
    assert counts == {"cub": 200, "nabirds": 555, "dogs": 120, "cars": 196, "flowers": 102}


def test_transforms_follow_the_paper_scaled_to_the_input_size(tmp_path):
    from torchvision import transforms as T

    dm = datamodule("cub", make_fgvc(tmp_path, "cub", (1, 1, 1)))
    train, evaluation = dm.transform(train=True).transforms, dm.transform(train=False).transforms
    assert [type(t) for t in train[:3]] == [T.Resize, T.RandomCrop, T.RandomHorizontalFlip]
    assert [type(t) for t in evaluation[:2]] == [T.Resize, T.CenterCrop]
    assert train[0].size == evaluation[0].size == 37  # round(32 * 256 / 224)
    assert evaluation[1].size == (32, 32)
    paper = create_datamodule("cub", data_config=DATA_CONFIG | {"input_size": (3, 224, 224)}, data_root=".")
    assert paper.transform(train=False).transforms[0].size == 256  # the paper's Resize(256) -> CenterCrop(224)
    image = dm.splits["test"].dataset
    assert torch.equal(image[0][0], image[0][0])  # evaluation is deterministic


def test_trainval_pool_trains_val_images_with_augmentation(tmp_path):
    dm = datamodule("cub", make_fgvc(tmp_path, "cub"), train_fraction=1.0, train_on="trainval")
    assert dm.n_train == 24
    val_in_pool = dm.training_pool().dataset.datasets[1]
    assert isinstance(val_in_pool, ImageFiles) and val_in_pool.samples == dm.splits["val"].dataset.samples
    assert val_in_pool.transform is not dm.splits["val"].dataset.transform
    assert any(type(t).__name__ == "RandomCrop" for t in val_in_pool.transform.transforms)


def test_without_fraction_file_the_suite_split_is_used(tmp_path):
    dm = datamodule("cub", make_fgvc(tmp_path, "cub"), train_fraction=0.5, seed=3)
    expected = fraction_indices(dm.splits["train"].labels, 0.5, 3)
    assert np.array_equal(dm.train_indices, expected) and dm.n_train == 9
    assert dm.split_record()["split_source"] == "suite"


def test_fraction_file_overrides_the_split(tmp_path):
    root = make_fgvc(tmp_path, "cub")
    train = json.loads((root / "train.json").read_text())
    chosen = dict(sorted(train.items())[:4])  # not what the suite's split would pick: classes 0 and 1 only
    (root / "train_0.2.json").write_text(json.dumps(chosen))
    dm = datamodule("cub", root, train_fraction=0.2, seed=5)
    assert sorted(dm.train_ids) == sorted(chosen) and dm.n_train == 4
    assert dm.train_labels.tolist() == [0, 0, 0, 0]
    assert dm.split_record()["split_source"] == "train_0.2.json"
    other = datamodule("cub", root, train_fraction=0.4, seed=5)  # no train_0.4.json: the suite's split
    assert other.split_record()["split_source"] == "suite" and other.n_train == 6  # 2 of 6 per class


def test_fraction_file_must_be_a_subset_of_train(tmp_path):
    root = make_fgvc(tmp_path, "cub")
    (root / "train_0.1.json").write_text(json.dumps({"test/003.class/img_0.png": 3}))
    with pytest.raises(DataError, match=r"train_0.1.json lists 1 image\(s\) not in train.json.*make splits"):
        datamodule("cub", root, train_fraction=0.1)
    train = json.loads((root / "train.json").read_text())
    first = sorted(train)[0]
    (root / "train_0.1.json").write_text(json.dumps({first: 200}))
    with pytest.raises(DataError, match="another class than in train.json"):
        datamodule("cub", root, train_fraction=0.1)


def test_class_missing_from_train_is_named(tmp_path):
    root = make_fgvc(tmp_path, "cub", (1, 1, 1))
    test = json.loads((root / "test.json").read_text())
    test[next(iter(test))] = 999
    (root / "test.json").write_text(json.dumps(test))
    with pytest.raises(DataError, match=r"test.json has class id\(s\) 999 that train.json does not have"):
        datamodule("cub", root)


def test_missing_split_file_names_prepare(tmp_path):
    root = make_fgvc(tmp_path, "dogs", (1, 1, 1))
    (root / "val.json").unlink()
    with pytest.raises(DataError, match=r"lacks the split file\(s\) val.json.*make prepare DATASET=dogs"):
        datamodule("dogs", root)


@pytest.mark.parametrize("fraction_file", [False, True])
def test_run_end_to_end_with_a_tiny_vit(tmp_path, fraction_file, monkeypatch):
    seen = record_tested_model(monkeypatch)
    root = make_fgvc(tmp_path / "cub", "cub", (4, 1, 2))
    if fraction_file:
        train = json.loads((root / "train.json").read_text())
        (root / "train_0.5.json").write_text(json.dumps(dict(sorted(train.items())[::2])))
    cfg = RunConfig(method="vpt_deep", dataset="cub", data_root=str(root), train_fraction=0.5,
                    backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT,
                    epochs=1, warmup_epochs=0, batch_size=4, method_options={"prompt_length": 2},
                    results_dir=str(tmp_path / "results"))
    with pytest.warns(UserWarning, match="train.json has 3 classes"):
        result = run(cfg)
    assert result["status"] == "ok" and result["num_classes"] == 3 and result["n_train"] == 6
    assert result["recipe"] == "paper" and result["optimizer"] == "sgd" and result["epochs"] == 1
    assert result["lr"] == pytest.approx(0.1 * 4 / 256)  # the paper's base lr scaled by batch / 256
    test_top1, n_test = top1_by_hand(seen["model"], seen["datamodule"].test_dataloader())  # 2 per class
    assert n_test == 6 and result["test_top1"] == pytest.approx(test_top1, abs=1e-4)
    split = json.loads(next((tmp_path / "results" / "splits").rglob("*.json")).read_text())
    assert split["split_source"] == ("train_0.5.json" if fraction_file else "suite")
