"""The embedded default's offline datasets: read as their upstream loaders read them, once per process."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.embedded import load_digits_uint8


def test_digits_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    images, labels = load_digits_uint8()
    digits = load_digits()
    np.testing.assert_array_equal(images, np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))
    np.testing.assert_array_equal(labels, digits.target)
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and labels.dtype == np.int64


def test_cached_arrays_are_shared_and_read_only():
    images, labels = load_digits_uint8()
    assert load_digits_uint8()[0] is images
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0] = 1


@pytest.mark.parametrize("name", ["digits", "fashion_heldout"])
def test_published_split_sizes_are_the_carved_arrays(name):
    """The cost estimate (benchmark/costs/estimate.py) plans with split_sizes(); the runs train on arrays()."""
    from datamodules import get_datamodule_class

    cls = get_datamodule_class(name)
    dm = cls(data_config={"input_size": (1, 28, 28), "mean": (0.0,), "std": (1.0,)}, train_fraction=1.0)
    carved = {split: len(dm.arrays(split)[1]) for split in ("train", "val", "test")}
    assert cls.split_sizes() == carved | {"classes": dm.num_classes}
