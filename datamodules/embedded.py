"""Offline datasets of the embedded default: Fashion-MNIST (Debian `dataset-fashion-mnist`) and
scikit-learn's handwritten digits.

Upstream: the embedded ViT is pretrained on the Fashion-MNIST classes in PRETRAIN_CLASSES.
Downstream: tasks it never saw — the held-out Fashion-MNIST classes, and the 8x8 digits upsampled
to the backbone's input size (docs/datasets.md: why these classes are held out).

Images are small, so each split is decoded, resized and normalised once into a tensor; the transform
is deterministic (no augmentation), which keeps loading far faster than training.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from datamodules.base import FractionDataModule, class_orders
from datamodules.files import ImageFiles
from datamodules.labelled_split import LabelledSplit

FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FMNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
HELDOUT_CLASSES = (4, 5, 6, 7)  # coat, sandal, shirt, sneaker: never seen in pretraining; each has a
# sibling that is (pullover, ankle boot, t-shirt), so transfer can help while the pairs stay hard for raw pixels
PRETRAIN_CLASSES = tuple(c for c in range(10) if c not in HELDOUT_CLASSES)
POOL_SEED = 0  # fixed carving of the downstream pools: the same for every run seed


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of Fashion-MNIST 'train' or 't10k', read-only. Cached: a run's
    train and val splits both come from 'train', and a grid reads the same files for every run."""
    root = Path(root or FMNIST_DIR)
    images, labels = root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found at {root}: install it with "
                                "'apt-get install dataset-fashion-mnist' (or `make data`), or set FMNIST_DIR.")
    return read_only(read_idx(images), read_idx(labels).astype(np.int64))


def to_model_input(images: np.ndarray, data_config: dict) -> torch.Tensor:
    """uint8 (N, H, W) in [0, 255] -> float (N, C, h, w) resized and normalised as the backbone expects."""
    channels, height, width = data_config["input_size"]
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)  # (N, 1, H, W)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, channels, -1, -1)  # grey -> as many channels as the backbone takes
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def carve(labels: np.ndarray, per_class: int, seed: int = POOL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (first `per_class` of each class, the rest) by a fixed seeded permutation."""
    orders = class_orders(labels, seed)
    head, rest = [order[:per_class] for order in orders], [order[per_class:] for order in orders]
    return np.sort(np.concatenate(head)), np.sort(np.concatenate(rest))


def grey_image_to_model_input(image, data_config: dict) -> torch.Tensor:
    """A grey PIL image -> (C, h, w) as the in-memory splits get it (`to_model_input`): an extra test set's images."""
    return to_model_input(np.array(image, dtype=np.uint8)[None], data_config)[0]


class TensorSplitsDataModule(FractionDataModule):
    """A dataset held in memory as arrays: subclasses return (images uint8 (N,H,W), labels) per split."""

    deterministic_train_transform = True  # decoded, resized and normalised once; no augmentation

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def eval_image_dataset(self, samples: list[tuple[str, int]]) -> ImageFiles:
        return ImageFiles(samples, functools.partial(grey_image_to_model_input, data_config=self.data_config), "L")

    def load_split(self, split: str) -> LabelledSplit:
        images, labels = self.arrays(split)
        dataset = TensorDataset(to_model_input(images, self.data_config), torch.from_numpy(labels))
        return LabelledSplit(dataset, labels, [f"{split}/{i}" for i in range(len(labels))])


class FashionHeldoutDataModule(TensorSplitsDataModule):
    """Fashion-MNIST classes held out of pretraining: a 400/class train pool, 100/class val, full test."""

    name = "fashion_heldout"
    train_per_class, val_per_class = 400, 100
    test_per_class = 1000  # Fashion-MNIST's t10k holds 1,000 images of each class

    @classmethod
    def split_sizes(cls) -> dict[str, int]:
        """The carving's sizes (arrays() makes them), so a grid's cost is estimated before any data is read."""
        classes = len(HELDOUT_CLASSES)
        return {"train": cls.train_per_class * classes, "val": cls.val_per_class * classes,
                "test": cls.test_per_class * classes, "classes": classes}

    @property
    def num_classes(self) -> int:
        return len(HELDOUT_CLASSES)

    @property
    def class_names(self) -> list[str]:
        return [FMNIST_CLASSES[c] for c in HELDOUT_CLASSES]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = load_fashion_mnist("t10k" if split == "test" else "train", self.data_root)
        keep = np.isin(labels, HELDOUT_CLASSES)
        images, labels = images[keep], np.searchsorted(HELDOUT_CLASSES, labels[keep])
        if split != "test":
            pool, _ = carve(labels, self.train_per_class + self.val_per_class)
            val, train = carve(labels[pool], self.val_per_class)
            chosen = pool[train if split == "train" else val]
            images, labels = images[chosen], labels[chosen]
        return images, labels


class FashionPretrainDataModule(TensorSplitsDataModule):
    """The upstream task: Fashion-MNIST train images of PRETRAIN_CLASSES; val and test from t10k."""

    name = "fashion_pretrain"

    @property
    def num_classes(self) -> int:
        return len(PRETRAIN_CLASSES)

    @property
    def class_names(self) -> list[str]:
        return [FMNIST_CLASSES[c] for c in PRETRAIN_CLASSES]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = load_fashion_mnist("train" if split == "train" else "t10k", self.data_root)
        keep = np.isin(labels, PRETRAIN_CLASSES)
        images, labels = images[keep], np.searchsorted(PRETRAIN_CLASSES, labels[keep])
        if split != "train":  # t10k halves: val = first 500/class, test = the rest
            val, test = carve(labels, 500)
            chosen = val if split == "val" else test
            images, labels = images[chosen], labels[chosen]
        return images, labels


@functools.lru_cache(maxsize=1)
def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as (images (N, 8, 8) uint8 in [0, 255], labels (N,)), read-only; cached, as
    every split of every run reads them.

    Read from the CSV that `sklearn.datasets.load_digits` itself parses, found without importing scikit-learn:
    its import and load take 0.30 s against 0.02 s here, a third of a cached linear-probe run
    (tests/datamodules/test_embedded.py checks the arrays equal load_digits'). Without that file, load_digits.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        images, labels = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.images, digits.target
    return read_only(np.round(images * (255.0 / 16.0)).astype(np.uint8), labels.astype(np.int64))


class DigitsDataModule(TensorSplitsDataModule):
    """scikit-learn's 1,797 handwritten digits (8x8, 0-16), upsampled to the backbone's input size.

    Fixed carving: 60 per class for test, 20 per class for val, the remaining ~1,000 form the train pool.
    """

    name = "digits"
    total_images, test_per_class, val_per_class = 1797, 60, 20  # scikit-learn's digits; the carving below

    @property
    def num_classes(self) -> int:
        return 10

    @classmethod
    def split_sizes(cls) -> dict[str, int]:
        """The carving's sizes (arrays() makes them), so a grid's cost is estimated before any data is read."""
        test, val = cls.test_per_class * 10, cls.val_per_class * 10
        return {"train": cls.total_images - test - val, "val": val, "test": test, "classes": 10}

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = load_digits_uint8()
        test, rest = carve(labels, self.test_per_class)
        val, train = carve(labels[rest], self.val_per_class)
        chosen = {"test": test, "val": rest[val], "train": rest[train]}[split]
        return images[chosen], labels[chosen]
