"""Few-shot splits (SHOTS=k): k examples of every class, the prefix of the per-class seeded permutation the fractions
use, so nested across k; a class with fewer than k examples is an error; every dataset family takes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules import create_datamodule
from datamodules.base import shot_indices
from datamodules.checks import DataError
from tests.helpers.data import DATA_CONFIG, make_fgvc, make_folder, make_vtab

EMBEDDED_CONFIG = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)}


def shots_by_hand(labels: np.ndarray, shots: int, seed: int) -> list[int]:
    """The rule written out: per class (ids ascending), its members' indices shuffled by PCG64 seeded (seed, class
    id), the first `shots` kept; all of them sorted."""
    kept = []
    for class_id in sorted(set(labels.tolist())):
        members = [i for i, label in enumerate(labels.tolist()) if label == class_id]
        order = np.random.Generator(np.random.PCG64([seed, class_id])).permutation(np.array(members))
        kept += order[:shots].tolist()
    return sorted(kept)


def test_known_values_match_the_fractions_prefixes():
    """Classes 0..9, 10..19, 20..29 (tests/datamodules/test_splits.py pins the same stream for the fractions: 10% is
    [4, 19, 28], 20% [4, 6, 11, 19, 22, 28]): 1 shot and 2 shots are those prefixes."""
    labels = np.repeat(np.arange(3), 10)
    assert shot_indices(labels, 1, seed=0).tolist() == [4, 19, 28]
    assert shot_indices(labels, 2, seed=0).tolist() == [4, 6, 11, 19, 22, 28]


@pytest.mark.parametrize("seed", [0, 3])
def test_k_per_class_nested_across_k_and_equal_to_the_rule_by_hand(seed):
    labels = np.random.default_rng(9).permutation(np.repeat(np.arange(4), [16, 20, 17, 30]))
    sets = {}
    for k in (1, 2, 4, 8, 16):
        chosen = shot_indices(labels, k, seed)
        assert chosen.tolist() == shots_by_hand(labels, k, seed)
        assert np.bincount(labels[chosen], minlength=4).tolist() == [k] * 4
        sets[k] = set(chosen.tolist())
    assert sets[1] <= sets[2] <= sets[4] <= sets[8] <= sets[16]
    assert sets[16] != set(shot_indices(labels, 16, seed + 1).tolist())  # the seed draws the set


def test_a_class_with_fewer_than_k_examples_is_refused_with_the_largest_valid_k():
    labels = np.repeat(np.arange(3), [5, 3, 8])
    assert len(shot_indices(labels, 3, 0)) == 9
    with pytest.raises(ValueError, match=r"SHOTS=4 needs 4 .* 1 class\(es\) have fewer \(class 1: 3\); the largest "
                                         r"SHOTS every class allows is 3"):
        shot_indices(labels, 4, 0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="shots must be a whole number >= 1"):
            shot_indices(labels, bad, 0)


def test_digits_takes_k_per_class_whatever_the_fraction():
    sets = {}
    for k in (1, 2, 4):
        dm = create_datamodule("digits", data_config=EMBEDDED_CONFIG, shots=k, train_fraction=0.1, seed=1)
        dm.setup()
        assert dm.n_train == 10 * k and np.bincount(dm.train_labels).tolist() == [k] * 10
        assert dm.split_record()["shots"] == k
        sets[k] = set(dm.train_ids)
    assert sets[1] <= sets[2] <= sets[4]


def test_folder_shots_and_the_too_small_class_error(tmp_path):
    root = make_folder(tmp_path, {"train": 5, "val": 1, "test": 1})
    dm = create_datamodule("folder", data_config=DATA_CONFIG, data_root=str(root), shots=3)
    dm.setup()
    assert np.bincount(dm.train_labels).tolist() == [3, 3, 3]
    too_many = create_datamodule("folder", data_config=DATA_CONFIG, data_root=str(root), shots=6)
    with pytest.raises(DataError, match=r"folder \(train pool\): SHOTS=6 needs 6 .* largest SHOTS every class "
                                        r"allows is 5"):
        too_many.setup()


@pytest.mark.filterwarnings("ignore:DATASET=.*train.json has 3 classes:UserWarning")
def test_fgvc_shots_come_from_the_suite_split_even_with_a_fraction_file(tmp_path):
    root = make_fgvc(tmp_path / "flowers", "flowers", (6, 1, 1))
    train = json.loads((root / "train.json").read_text())
    (root / "train_0.1.json").write_text(json.dumps(dict(sorted(train.items())[:3])))  # the fraction file of 0.1
    dm = create_datamodule("flowers", data_config=DATA_CONFIG, data_root=str(root), shots=2, train_fraction=0.1)
    dm.setup()
    assert np.bincount(dm.train_labels).tolist() == [2, 2, 2] and dm.split_record()["split_source"] == "suite"
    assert dm.train_ids == [dm.splits["train"].ids[i] for i in shots_by_hand(dm.splits["train"].labels, 2, 0)]


def test_vtab_classes_absent_from_train_take_no_shots(tmp_path):
    make_vtab(tmp_path, "kitti", labels=(3, 1))  # kitti has 4 classes; 0 and 2 have no training image
    dm = create_datamodule("vtab/kitti", data_config=DATA_CONFIG, data_root=str(tmp_path), shots=2)
    dm.setup()
    assert np.bincount(dm.train_labels, minlength=4).tolist() == [0, 2, 0, 2]
