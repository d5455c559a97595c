"""One split as a Dataset plus its labels and example ids: what the split logic (datamodules/base.py) and the extra
test sets (datamodules/extra_test_sets.py) both read, below both of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset


@dataclass
class LabelledSplit:
    """One split as a Dataset plus what the fraction logic needs without touching any image."""

    dataset: Dataset
    labels: np.ndarray  # (N,) int class ids in 0..C-1, in the dataset's order
    ids: list[str] = field(default_factory=list)  # stable example ids (relative paths or "<split>/<index>")

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.labels))]
