"""What every image-file dataset family shares: a Dataset over (path, label) pairs read with PIL, the
transforms of the VPT paper (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119), class-id remapping
and a seeded validation carve.

The transforms take the backbone's data config as plain values (`input_size`, `mean`, `std`,
`interpolation`, from `timm.data.resolve_model_data_config`), so a datamodule never sees the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from torch.utils.data import ConcatDataset, Dataset
from torchvision import transforms as T

from datamodules.base import FractionDataModule, LabelledSplit, fraction_indices
from datamodules.checks import load_image

# VPT's FGVC pipeline resizes to 256 and crops 224 (src/data/transforms.py of github.com/KMnP/vpt); other input
# sizes keep that ratio (e.g. 32 -> resize 37, crop 32 for the tiny test models).
RESIZE_RATIO = 256 / 224
VAL_FRACTION = 0.1  # the paper carves val from train where a release has none: 10%, stratified, seeded
CARVE_SEED = 0  # fixed: the val carve must not change with the run seed, or val would leak into train


class ImageFiles(Dataset):
    """(image, label) pairs read from `samples` = [(path, label), ...] (torchvision's attribute name, which
    `benchmark.core.validate` uses to check every file exists and decodes before training)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, mode: str = "RGB"):
        self.samples = list(samples)
        self.transform = transform
        self.mode = mode  # "RGB", or "L" for a grey backbone

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_image(path, self.mode)), label

    def with_transform(self, transform: Callable) -> ImageFiles:
        return ImageFiles(self.samples, transform, self.mode)


def input_hw(data_config: dict) -> tuple[int, int]:
    _, height, width = data_config["input_size"]
    return int(height), int(width)


def interpolation(data_config: dict) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(data_config.get("interpolation", "bilinear"))
    except ValueError:  # timm's "random" and other training-time modes: evaluate with bilinear
        return T.InterpolationMode.BILINEAR


def to_normalised_tensor(data_config: dict) -> list:
    return [T.ToTensor(), T.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"]))]


def fgvc_transform(data_config: dict, train: bool) -> T.Compose:
    """VPT's FGVC transform: train Resize(256) -> RandomCrop(224) -> horizontal flip; eval Resize(256) ->
    CenterCrop(224); 256 and 224 scaled to the backbone's input size. Resize(int) sets the shorter side.

    Normalisation uses the backbone's own mean/std (0.5 for the in21k ViT); VPT's code used ImageNet's statistics
    for every backbone, which shifts the inputs the pretrained weights expect.
    """
    size = input_hw(data_config)
    resize = T.Resize(round(min(size) * RESIZE_RATIO), interpolation=interpolation(data_config))
    crop = [T.RandomCrop(size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(size)]
    return T.Compose([resize, *crop, *to_normalised_tensor(data_config)])


def resize_transform(data_config: dict) -> T.Compose:
    """VTAB's transform: a plain resize to the input size, no crop, no augmentation (VPT's tf_dataset.py)."""
    return T.Compose([T.Resize(input_hw(data_config), interpolation=interpolation(data_config)),
                      *to_normalised_tensor(data_config)])


def remap_classes(raw_labels: Sequence, classes: Sequence) -> np.ndarray:
    """Raw class ids -> 0..C-1 by their position in the sorted `classes`; an id outside `classes` raises KeyError."""
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[c] for c in raw_labels], dtype=np.int64)


def carve_val(labels: np.ndarray, fraction: float = VAL_FRACTION, seed: int = CARVE_SEED) -> np.ndarray:
    """Boolean mask of the examples that move from train to val: a stratified, seeded share of each class, drawn
    by the suite's one split function. A class with a single example keeps it in train (it needs one to learn)."""
    labels = np.asarray(labels, dtype=np.int64)
    chosen = fraction_indices(labels, fraction, seed)
    singletons = np.flatnonzero(np.bincount(labels) == 1) if labels.size else np.zeros(0, dtype=np.int64)
    chosen = chosen[~np.isin(labels[chosen], singletons)]
    mask = np.zeros(len(labels), dtype=bool)
    mask[chosen] = True
    return mask


class ImageFilesDataModule(FractionDataModule):
    """A dataset family whose splits are image files on disk: a subclass lists each split as
    (paths, labels in 0..C-1, ids) and says which transform trains; this class builds the datasets."""

    def list_split(self, split: str) -> tuple[list[str], np.ndarray, list[str]]:
        """(absolute image paths, labels, stable ids) of `split`, in a canonical order (sorted ids)."""
        raise NotImplementedError

    def transform(self, train: bool) -> Callable:
        """VPT's FGVC transform (augmented for training); VTAB-1k overrides it with a plain resize."""
        return fgvc_transform(self.data_config, train)

    @property
    def num_classes(self) -> int:
        return len(self.classes)  # the family's sorted class list; VTAB-1k's comes from its task table instead

    @property
    def image_mode(self) -> str:
        return "L" if self.data_config["input_size"][0] == 1 else "RGB"

    def eval_image_dataset(self, samples: list[tuple[str, int]]) -> ImageFiles:
        return ImageFiles(samples, self.transform(train=False), self.image_mode)

    def as_split(self, paths: list[str], labels: np.ndarray, ids: list[str], train: bool) -> LabelledSplit:
        samples = list(zip(paths, labels.tolist(), strict=True))
        return LabelledSplit(ImageFiles(samples, self.transform(train), self.image_mode), labels, ids)

    def load_split(self, split: str) -> LabelledSplit:
        return self.as_split(*self.list_split(split), train=split == "train")

    def training_pool(self) -> LabelledSplit:
        pool = super().training_pool()
        if self.train_on == "trainval":  # val examples that train get the training transform, not the eval one
            val = self.splits["val"].dataset.with_transform(self.transform(train=True))
            pool = replace(pool, dataset=ConcatDataset([self.splits["train"].dataset, val]))
        return pool
