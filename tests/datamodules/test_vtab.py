"""VTAB-1k in the processed list layout: the 19 tasks, list parsing, train800 / train800val200 pools, the plain
resize transform, clear errors, and end-to-end runs with a tiny ViT (linear on cached features, VPT on trainval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmark.core.config import RunConfig
from benchmark.core.pipeline import run
from datamodules import VTAB_DATASETS, create_datamodule, get_datamodule_class
from datamodules.checks import DataError
from datamodules.vtab import VTAB_TASKS
from tests.helpers.data import DATA_CONFIG, make_vtab
from tests.helpers.models import TINY_VIT


def datamodule(root: Path, task: str = "kitti", **kwargs):
    dm = create_datamodule(f"vtab/{task}", data_config=DATA_CONFIG, data_root=str(root), **kwargs)
    dm.setup()
    return dm


def test_all_19_tasks_registered_with_group_and_classes():
    assert len(VTAB_DATASETS) == 19 and all(f"vtab/{t}" in VTAB_DATASETS for t in VTAB_TASKS)
    groups = {g: sorted(t for t, spec in VTAB_TASKS.items() if spec.group == g)
              for g in ("natural", "specialized", "structured")}
    assert groups["natural"] == sorted(["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
                                        "sun397"])
    assert groups["specialized"] == sorted(["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"])
    assert len(groups["structured"]) == 8
    classes = {t: get_datamodule_class(f"vtab/{t}")(data_config=DATA_CONFIG).num_classes for t in VTAB_TASKS}
    assert classes["cifar"] == 100 and classes["sun397"] == 397 and classes["patch_camelyon"] == 2
    assert classes["smallnorb_azi"] == 18 and classes["dsprites_loc"] == 16 and classes["kitti"] == 4


def test_splits_sizes_labels_and_canonical_order(tmp_path):
    dm = datamodule(make_vtab(tmp_path), train_fraction=1.0)
    assert {s: len(d.labels) for s, d in dm.splits.items()} == {"train": 12, "val": 4, "test": 8}
    train = dm.splits["train"]
    assert train.ids == sorted(train.ids)
    assert all(label == int(i.split("class ")[1][0]) for i, label in zip(train.ids, train.labels, strict=True))
    assert dm.num_classes == 4 and dm.n_train == 12
    assert Path(train.dataset.samples[0][0]) == tmp_path / "kitti" / train.ids[0]


def test_transform_is_a_plain_resize(tmp_path):
    dm = datamodule(make_vtab(tmp_path))
    assert dm.deterministic_train_transform
    assert [type(t).__name__ for t in dm.transform(train=True).transforms] == ["Resize", "ToTensor", "Normalize"]
    shapes = {tuple(dm.splits["train"].dataset[i][0].shape) for i in range(len(dm.splits["train"].labels))}
    assert shapes == {(3, 32, 32)}


def test_trainval_reads_train800val200(tmp_path):
    root = make_vtab(tmp_path)
    dm = datamodule(root, train_fraction=1.0, train_on="trainval")
    listed = sorted(line.rsplit(" ", 1)[0] for line in (root / "kitti" / "train800val200.txt").read_text().split("\n")
                    if line)
    assert dm.n_train == 16 and sorted(dm.train_ids) == listed
    dm = datamodule(root, train_fraction=0.5, train_on="trainval", seed=1)
    assert dm.n_train == 8 and np.bincount(dm.train_labels).tolist() == [2, 2, 2, 2]


def test_labels_are_not_remapped_when_classes_are_absent(tmp_path):
    dm = datamodule(make_vtab(tmp_path, "dmlab", labels=(1, 4)), task="dmlab")
    assert dm.num_classes == 6 and set(dm.splits["test"].labels.tolist()) == {1, 4}


def test_errors_name_the_problem(tmp_path):
    root = make_vtab(tmp_path)
    with pytest.raises(DataError, match=r"has no folder 'svhn'.*task folders found: kitti"):
        datamodule(root, task="svhn")
    (root / "kitti" / "test.txt").write_text("images/a.png 7\n")
    with pytest.raises(DataError, match=r"test.txt:1: label 7 is outside 0..3"):
        datamodule(root)
    (root / "kitti" / "test.txt").write_text("images/a.png\n")
    with pytest.raises(DataError, match=r"test.txt:1: expected `<relative image path> <integer label>`"):
        datamodule(root)
    (root / "kitti" / "test.txt").unlink()
    with pytest.raises(DataError, match="lacks test.txt"):
        datamodule(root)


def tiny_run(tmp_path: Path, method: str, **overrides) -> dict:
    overrides.setdefault("dataset", "vtab/kitti")
    cfg = RunConfig(method=method, data_root=str(tmp_path / "vtab-1k"), train_fraction=1.0,
                    backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT, epochs=1,
                    warmup_epochs=0, batch_size=4, results_dir=str(tmp_path / "results"), **overrides)
    return run(cfg)


def test_linear_run_end_to_end_on_cached_features(tmp_path, capsys):
    make_vtab(tmp_path / "vtab-1k")
    result = tiny_run(tmp_path, "linear")
    assert result["status"] == "ok" and result["num_classes"] == 4 and result["n_train"] == 12
    assert result["batch_size"] == 4 and result["lr"] == pytest.approx(0.1 * 4 / 256)
    assert "feature cache: train computed" in capsys.readouterr().out  # deterministic transform: cached


def test_vpt_run_on_train800val200(tmp_path):
    make_vtab(tmp_path / "vtab-1k")
    result = tiny_run(tmp_path, "vpt_shallow", train_on="trainval", method_options={"prompt_length": 2})
    assert result["status"] == "ok" and result["n_train"] == 16 and result["train_on"] == "trainval"
    split = json.loads(next((tmp_path / "results" / "splits").rglob("*.json")).read_text())
    assert len(split["ids"]) == 16


def test_run_with_classes_absent_from_train_warns_and_runs(tmp_path):
    """VTAB-1k's 800 images can miss classes (SUN397 has 397): a warning, not an error as for FGVC."""
    make_vtab(tmp_path / "vtab-1k", task="dmlab", labels=(1, 4))
    with pytest.warns(UserWarning, match=r"class\(es\) \[0, 2, 3, 5\] have no example in the training pool"):
        result = tiny_run(tmp_path, "linear", dataset="vtab/dmlab")
    assert result["status"] == "ok" and result["num_classes"] == 6
