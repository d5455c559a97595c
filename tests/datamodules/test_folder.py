"""DATASET=folder: class folders under train/ (optional val/, test/), a seeded val carve when val/ is missing,
clear errors, and one end-to-end run with a tiny ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmark.core.config import RunConfig
from benchmark.core.pipeline import run
from datamodules import create_datamodule
from datamodules.checks import DataError
from tests.helpers.data import DATA_CONFIG, make_folder
from tests.helpers.models import TINY_VIT


def datamodule(root: Path, **kwargs):
    dm = create_datamodule("folder", data_config=DATA_CONFIG, data_root=str(root), **kwargs)
    dm.setup()
    return dm


def test_train_val_test_folders(tmp_path):
    dm = datamodule(make_folder(tmp_path, {"train": 4, "val": 2, "test": 3}), train_fraction=0.5)
    assert dm.classes == ["ant", "mole", "zebra"] and dm.num_classes == 3
    assert {s: len(d.labels) for s, d in dm.splits.items()} == {"train": 12, "val": 6, "test": 9}
    train = dm.splits["train"]
    assert train.ids == sorted(train.ids) and train.ids[0] == "train/ant/0.jpg"
    assert [dm.classes[label] for label in train.labels] == [i.split("/")[1] for i in train.ids]
    assert dm.n_train == 6 and np.bincount(dm.train_labels).tolist() == [2, 2, 2]
    assert dm.splits["test"].dataset[0][0].shape == (3, 32, 32)


def test_val_is_carved_from_train_when_missing(tmp_path):
    root = make_folder(tmp_path, {"train": 10, "test": 1})
    first, again = datamodule(root, seed=0), datamodule(root, seed=7)
    val = first.splits["val"]
    assert np.bincount(val.labels).tolist() == [1, 1, 1]  # 10% of each class
    assert len(first.splits["train"].labels) == 27 and not set(val.ids) & set(first.splits["train"].ids)
    assert val.ids == again.splits["val"].ids  # the carve does not move with the run seed


def test_test_falls_back_to_val_with_a_warning(tmp_path):
    root = make_folder(tmp_path, {"train": 3, "val": 1})
    with pytest.warns(UserWarning, match="no test/ folder: test accuracy is measured on the val split"):
        dm = datamodule(root)
    assert dm.splits["test"].ids == dm.splits["val"].ids


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="has no train/ folder"):
        datamodule(tmp_path)
    root = make_folder(tmp_path / "a", {"train": 2, "val": 1, "test": 1})
    (root / "val" / "yak").mkdir()
    with pytest.raises(DataError, match=r"has class folder\(s\) \['yak'\] that train/ lacks"):
        datamodule(root)
    root = make_folder(tmp_path / "b", {"train": 2, "val": 1, "test": 1})
    (root / "train" / "yak").mkdir()
    with pytest.raises(DataError, match="yak"):
        datamodule(root)


def test_run_end_to_end_with_a_tiny_vit(tmp_path):
    root = make_folder(tmp_path / "data", {"train": 4, "val": 1, "test": 2})
    cfg = RunConfig(method="adapter", dataset="folder", data_root=str(root), train_fraction=1.0,
                    backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT, epochs=1,
                    warmup_epochs=0, batch_size=4, results_dir=str(tmp_path / "results"))
    result = run(cfg)
    assert result["status"] == "ok" and result["num_classes"] == 3 and result["n_train"] == 12
    assert result["optimizer"] == "adamw" and result["lr"] == pytest.approx(0.001 * 4 / 256)
