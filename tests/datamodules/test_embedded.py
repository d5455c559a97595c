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
