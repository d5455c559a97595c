"""The base DataModule and the suite's one implementation of training splits: data fractions and few-shot sets."""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from datamodules.checks import DataError
from datamodules.extra_test_sets import ExtraTestSet, scan_class_folders
from datamodules.labelled_split import LabelledSplit

SPLITS = ("train", "val", "test")


def asked_examples(class_size: int, fraction: float) -> int:
    """What a fraction asks of a class: fraction x size, rounded half up (0 for a fraction too small for the class)."""
    return math.floor(fraction * class_size + 0.5)


def examples_to_keep(class_size: int, fraction: float) -> int:
    """Per-class count for a fraction: rounded half up, never below one example."""
    return max(1, asked_examples(class_size, fraction))


def smallest_fraction(class_sizes) -> float:
    """The smallest fraction that asks for >= 1 example of every class (`asked_examples` >= 1 for the smallest class
    n: fraction >= 0.5 / n), rounded up to two significant digits; below it the split's floor of one example per class
    would train on more than was asked."""
    exact = 0.5 / int(min(class_sizes))
    scale = 10 ** (1 - math.floor(math.log10(exact)))
    return math.ceil(exact * scale) / scale


def fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a per-class stratified, seeded, nested subset of `labels`.

    Each class is shuffled by a generator seeded with (seed, class id) — PCG64 gives the same stream on
    every machine and ignores PYTHONHASHSEED — and its first `examples_to_keep` items are kept. A larger
    fraction keeps a longer prefix of the same permutation, so the 10% subset lies inside the 20% subset,
    ... inside 100%. The result depends only on the order of `labels`, which datamodules make canonical
    (sorted ids), never on file-listing order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}.")
    kept = [order[: examples_to_keep(len(order), fraction)] for order in class_orders(labels, seed)]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class present in `labels` (the NOAH / CoOp few-shot protocol).

    The first `shots` items of each class's seeded permutation (`class_orders`, the one the fractions take
    prefixes of): the 2-shot set holds the 1-shot set, ... up to 16 shots, and a seed gives the same set on every
    machine. A class with fewer than `shots` examples raises ValueError (no silent smaller class).
    """
    if isinstance(shots, bool) or int(shots) != shots or shots < 1:
        raise ValueError(f"shots must be a whole number >= 1 (examples per class), got {shots!r}.")
    orders = class_orders(labels, seed)
    short = {int(labels[order[0]]): len(order) for order in orders if len(order) < shots}
    if short:
        shown = ", ".join(f"class {c}: {n}" for c, n in list(short.items())[:8]) + (" ..." if len(short) > 8 else "")
        raise ValueError(f"SHOTS={shots} needs {shots} training examples of every class, but {len(short)} class(es) "
                         f"have fewer ({shown}); the largest SHOTS every class allows is "
                         f"{min(len(order) for order in orders)}.")
    kept = [order[:shots] for order in orders]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def class_orders(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Per class (in class-id order), the indices of its members in an order seeded by (seed, class id): the
    suite's one seeded per-class permutation."""
    labels = np.asarray(labels, dtype=np.int64)
    return [np.random.Generator(np.random.PCG64([int(seed), int(class_id)])).permutation(
        np.flatnonzero(labels == class_id)) for class_id in np.unique(labels)]


def seed_worker(worker_id: int) -> None:
    """Derive numpy/random seeds of a loader worker from torch's per-worker seed (reproducible augmentation)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class FractionDataModule(L.LightningDataModule):
    """Subclasses say how to read each split (`load_split`); this class subsamples train and builds loaders.

    Only the training split is subsampled (a fraction of each class, or `shots` examples of each); val and test are
    always used whole. `extra_test` ({name: folder}) adds test sets of class folders named like the training
    classes (`class_names`), read with the evaluation transform (`eval_image_dataset`): the domain-shift protocol.
    """

    name: str = ""
    # VTAB-1k draws 800 training images from tasks with up to 397 classes, so some classes can be absent
    # from train: a warning there, an error for datasets whose splits must cover every class.
    sparse_classes: bool = False
    # True when the training split's transform is deterministic (no augmentation): a frozen backbone then gives
    # the same features every epoch, so the linear probe may train on cached ones (benchmark/core/features.py).
    deterministic_train_transform: bool = False

    def __init__(self, *, data_config: dict, train_fraction: float = 1.0, seed: int = 0, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, train_on: str = "train",
                 data_root: str | None = None, shots: int | None = None, extra_test: dict[str, str] | None = None):
        super().__init__()
        if train_on not in ("train", "trainval"):
            raise ValueError(f"train_on must be 'train' or 'trainval', got {train_on!r}.")
        self.data_config = dict(data_config)
        self.train_fraction = float(train_fraction)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or max(batch_size, 256))
        self.num_workers = int(num_workers)
        self.train_on = train_on
        self.data_root = data_root
        self.shots = None if shots is None else int(shots)
        self.extra_test_dirs = dict(extra_test or {})
        self.extra_tests: dict[str, ExtraTestSet] = {}
        self.splits: dict[str, LabelledSplit] = {}
        self.train_indices: np.ndarray | None = None

    # --- what a dataset family provides ------------------------------------------------------------
    def load_split(self, split: str) -> LabelledSplit:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @classmethod
    def split_sizes(cls) -> dict[str, int] | None:
        """Images per split (`train`: the train pool, `val`, `test`) and `classes`, where the family publishes them,
        so a grid is planned without its data on disk (benchmark/costs/estimate.py); None: known from the files only."""
        return None

    @property
    def class_names(self) -> list[str]:
        """Label i's name, which an extra test set's class folder must carry; class ids as text by default."""
        return [str(i) for i in range(self.num_classes)]

    def eval_image_dataset(self, samples: list[tuple[str, int]]) -> Dataset:
        """(image, label) pairs of image files `samples` under the evaluation transform (for extra test sets)."""
        raise NotImplementedError(f"DATASET={self.name} cannot read image folders as extra test sets.")

    # --- shared ------------------------------------------------------------------------------------
    def training_pool(self) -> LabelledSplit:
        """train, or train followed by val for the final runs of the selection protocol."""
        train = self.splits["train"]
        if self.train_on == "train":
            return train
        val = self.splits["val"]
        return LabelledSplit(ConcatDataset([train.dataset, val.dataset]), np.concatenate([train.labels, val.labels]),
                             [f"train/{i}" for i in train.ids] + [f"val/{i}" for i in val.ids])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.splits = {split: self.load_split(split) for split in SPLITS}
        pool = self.training_pool()
        self.train_indices = self.select_training_indices(pool)
        self.train_set = Subset(pool.dataset, self.train_indices.tolist())
        self.train_ids = [pool.ids[i] for i in self.train_indices]
        self.train_labels = pool.labels[self.train_indices]
        self.extra_tests = {name: self.load_extra_test(name, folder) for name, folder in self.extra_test_dirs.items()}

    def select_training_indices(self, pool: LabelledSplit) -> np.ndarray:
        """Indices into the training pool that train: the suite's split (`shots` per class when set, else the
        fraction). A family overrides this only to read a split that is published with the data (FGVC's
        `train_<p>.json`), never to split differently."""
        if self.shots is None:
            return fraction_indices(pool.labels, self.train_fraction, self.seed)
        try:
            return shot_indices(pool.labels, self.shots, self.seed)
        except ValueError as err:
            raise DataError(f"{self.name} ({self.train_on} pool): {err}") from None

    def load_extra_test(self, name: str, folder: str) -> ExtraTestSet:
        samples, ids, classes = scan_class_folders(folder, self.class_names, name)
        labels = np.asarray([label for _, label in samples], dtype=np.int64)
        return ExtraTestSet(name, str(folder), LabelledSplit(self.eval_image_dataset(samples), labels, ids), classes,
                            self.num_classes)

    @property
    def n_train(self) -> int:
        return len(self.train_indices)

    def split_record(self) -> dict:
        """Exactly which examples trained: written beside the results so a run can be traced."""
        return {"dataset": self.name, "train_fraction": self.train_fraction, "shots": self.shots, "seed": self.seed,
                "train_on": self.train_on, "n_train": self.n_train, "ids": self.train_ids,
                "labels": self.train_labels.tolist()}

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, collate_fn=None) -> DataLoader:
        """The suite's loader settings; `collate_fn` for a dataset that does not yield (image tensor, label) pairs
        (benchmark/core/images.py's cached images)."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate_fn, generator=generator, worker_init_fn=seed_worker,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"].dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"].dataset, self.eval_batch_size, shuffle=False)

    def extra_test_dataloaders(self) -> list[DataLoader]:
        """One loader per extra test set, in `extra_tests` order (Lightning's multiple test dataloaders)."""
        return [self._loader(extra.split.dataset, self.eval_batch_size, shuffle=False)
                for extra in self.extra_tests.values()]
