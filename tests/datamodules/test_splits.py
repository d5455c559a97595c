"""Data-fraction splits: nested, stratified, deterministic, >= 1 per class, val/test untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backbones import create_backbone, data_config
from datamodules import create_datamodule, fraction_indices
from datamodules.base import examples_to_keep

FRACTIONS = [0.01, 0.1, 0.2, 0.4, 0.8, 1.0]


@pytest.fixture
def labels():
    rng = np.random.default_rng(123)
    return rng.integers(0, 7, size=500)  # unbalanced classes


def test_nested_across_fractions(labels):
    subsets = [set(fraction_indices(labels, f, seed=3)) for f in FRACTIONS]
    for smaller, larger in zip(subsets, subsets[1:], strict=False):
        assert smaller <= larger
    assert subsets[-1] == set(range(len(labels)))


def test_stratified_and_at_least_one_per_class(labels):
    for fraction in FRACTIONS:
        chosen = labels[fraction_indices(labels, fraction, seed=0)]
        for class_id in np.unique(labels):
            n_class = int((labels == class_id).sum())
            # the rule written out: round half up, never below one
            assert int((chosen == class_id).sum()) == max(1, math.floor(fraction * n_class + 0.5)) >= 1


# Per-class counts by hand: size x fraction, rounded half up (2.5 -> 3, not Python's round-half-even 2), and at
# least one example. Sizes 5, 15, 25, 10, 1, 2.
HAND_COUNTS = {
    0.1: [1, 2, 3, 1, 1, 1],  # 0.5, 1.5, 2.5, 1.0, 0.1, 0.2
    0.3: [2, 5, 8, 3, 1, 1],  # 1.5, 4.5, 7.5, 3.0, 0.3, 0.6
    0.05: [1, 1, 1, 1, 1, 1],  # 0.25, 0.75, 1.25, 0.5, 0.05, 0.1
    0.5: [3, 8, 13, 5, 1, 1],  # 2.5, 7.5, 12.5, 5.0, 0.5, 1.0
    0.01: [1, 1, 1, 1, 1, 1],
    1.0: [5, 15, 25, 10, 1, 2],
}
CLASS_SIZES = [5, 15, 25, 10, 1, 2]


@pytest.mark.parametrize("fraction", sorted(HAND_COUNTS))
def test_per_class_counts_by_hand(fraction):
    assert [examples_to_keep(n, fraction) for n in CLASS_SIZES] == HAND_COUNTS[fraction]
    # the classes interleaved and shuffled: counts are per class, whatever the order of the labels
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(6), CLASS_SIZES))
    kept = labels[fraction_indices(labels, fraction, seed=2)]
    assert np.bincount(kept, minlength=6).tolist() == HAND_COUNTS[fraction]


def test_nested_per_class_by_hand_sizes():
    labels = np.random.default_rng(6).permutation(np.repeat(np.arange(6), CLASS_SIZES))
    for seed in (0, 4):
        subsets = [set(fraction_indices(labels, f, seed).tolist()) for f in sorted(HAND_COUNTS)]
        assert all(a <= b for a, b in zip(subsets, subsets[1:], strict=False))
        assert subsets[-1] == set(range(len(labels)))


def test_deterministic_and_seed_dependent(labels):
    a, b = fraction_indices(labels, 0.2, seed=0), fraction_indices(labels, 0.2, seed=0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, fraction_indices(labels, 0.2, seed=1))


def test_known_values_pin_the_algorithm():
    """Literal indices of a small case: a change of the stream (PCG64 seeded by (seed, class id)), of the
    per-class shuffle or of the rounding changes them. Classes are 0..9, 10..19, 20..29."""
    labels = np.repeat(np.arange(3), 10)
    assert fraction_indices(labels, 0.1, seed=0).tolist() == [4, 19, 28]
    assert fraction_indices(labels, 0.2, seed=0).tolist() == [4, 6, 11, 19, 22, 28]
    assert fraction_indices(labels, 0.5, seed=0).tolist() == [2, 3, 4, 6, 7, 11, 13, 17, 18, 19, 20, 21, 22, 25,
                                                              28]
    assert fraction_indices(labels, 0.1, seed=1).tolist() == [8, 17, 28]
    assert fraction_indices(labels, 0.2, seed=1).tolist() == [4, 8, 12, 17, 25, 28]
    assert fraction_indices(labels, 1.0, seed=1).tolist() == list(range(30))
    # the class id seeds the stream, not the class's position: relabelling class 2 as 7 moves its pick
    relabelled = np.where(labels == 2, 7, labels)
    assert fraction_indices(relabelled, 0.1, seed=0).tolist() == [4, 19, 23]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_rejected(labels, bad):
    with pytest.raises(ValueError, match="fraction"):
        fraction_indices(labels, bad, seed=0)


def test_datamodule_subsamples_train_only():
    config = data_config(create_backbone("vit_embedded_p7_28"))
    sizes = {}
    for fraction in (0.1, 1.0):
        dm = create_datamodule("digits", data_config=config, train_fraction=fraction, seed=0)
        dm.setup()
        sizes[fraction] = (dm.n_train, len(dm.splits["val"].labels), len(dm.splits["test"].labels))
        assert set(dm.train_labels.tolist()) == set(range(10))
        images, _ = dm.train_set[0]
        assert tuple(images.shape) == config["input_size"]
    assert sizes[0.1][1:] == sizes[1.0][1:] == (200, 600)
    assert sizes[0.1][0] < sizes[1.0][0] == 997


def test_trainval_pool_includes_val():
    config = data_config(create_backbone("vit_embedded_p7_28"))
    dm = create_datamodule("digits", data_config=config, train_fraction=1.0, train_on="trainval")
    dm.setup()
    assert dm.n_train == 997 + 200
    assert sum(i.startswith("val/") for i in dm.split_record()["ids"]) == 200


def test_digits_carving_by_hand():
    """scikit-learn's digits have 178, 182, 177, 183, 181, 182, 181, 179, 174, 180 images per class; 60 per class go
    to test and 20 to val, the rest is the train pool; at 0.1 each class keeps round-half-up(size / 10)."""
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target).tolist()
    assert per_class == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    dm = create_datamodule("digits", data_config={"input_size": (1, 8, 8), "mean": (0.0,), "std": (1.0,)},
                           train_fraction=0.1, seed=0)
    dm.setup()
    assert np.bincount(dm.splits["test"].labels).tolist() == [60] * 10
    assert np.bincount(dm.splits["val"].labels).tolist() == [20] * 10
    assert np.bincount(dm.splits["train"].labels).tolist() == [n - 80 for n in per_class]
    # 9.8, 10.2, 9.7, 10.3, 10.1, 10.2, 10.1, 9.9, 9.4, 10.0 -> 10 each but 9 for the 94-image class
    assert np.bincount(dm.train_labels).tolist() == [10, 10, 10, 10, 10, 10, 10, 10, 9, 10] and dm.n_train == 99
    # no example in two splits: every image of the dataset appears at most once
    images = [dm.splits[s].dataset.tensors[0] for s in ("train", "val", "test")]
    assert sum(len(t) for t in images) == 1797


def test_loader_shuffle_follows_the_run_seed():
    """The training loader's order is seeded by the run seed: the same for the same seed, another for another
    seed (all of the pool trains here, so only the order can differ)."""
    config = {"input_size": (1, 8, 8), "mean": (0.0,), "std": (1.0,)}

    def order(seed: int) -> list[int]:
        dm = create_datamodule("digits", data_config=config, train_fraction=1.0, seed=seed, batch_size=997)
        dm.setup()
        (_, labels), = list(dm.train_dataloader())
        return labels.tolist()

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(order(4))
