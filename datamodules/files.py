"""What every image-file dataset family shares: a Dataset over (path, label) pairs read with PIL, the
transforms of the VPT paper (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119), class-id remapping
and a seeded validation carve.

The transforms take the backbone's data config as plain values (`input_size`, `mean`, `std`,
`interpolation`, from `timm.data.resolve_model_data_config`), so a datamodule never sees the model. Each is a
`Geometry` (resize, crop, augment) applied by torchvision to a PIL image, or, for the decoded-image cache, resized by
the same PIL operation once and cropped, flipped and normalised on a batch on the training device
(`crop_and_normalise`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import transforms as T

from datamodules.base import FractionDataModule, fraction_indices
from datamodules.checks import load_image
from datamodules.labelled_split import LabelledSplit

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


@dataclass(frozen=True)
class Geometry:
    """What a split's transform does to an image's shape, as plain values. The PIL transform (`pil_transform`) and
    the decoded-image cache (benchmark/core/images.py, which stores `resize_op`'s output and crops with
    `crop_and_normalise`) are both built from it, so the two paths resize, crop and flip alike."""

    resize: int | tuple[int, int]  # an int sets the shorter side (torchvision's Resize(int)); (h, w) the exact size
    crop: tuple[int, int] | None  # the (h, w) window cut from the resized image; None: the resized image itself
    augment: bool  # a uniformly random window and a horizontal flip with p = 0.5 (training), else the centre window
    interpolation: T.InterpolationMode

    def resize_op(self) -> T.Resize:
        return T.Resize(self.resize, interpolation=self.interpolation)

    def crop_ops(self) -> list:
        if self.crop is None:
            return []
        return [T.RandomCrop(self.crop), T.RandomHorizontalFlip()] if self.augment else [T.CenterCrop(self.crop)]


def fgvc_geometry(data_config: dict, train: bool) -> Geometry:
    """VPT's FGVC geometry: Resize(256) -> RandomCrop(224) + horizontal flip for training, CenterCrop(224) for
    evaluation, 256 and 224 scaled to the backbone's input size. Resize(int) sets the shorter side."""
    size = input_hw(data_config)
    return Geometry(round(min(size) * RESIZE_RATIO), size, train, interpolation(data_config))


def resize_geometry(data_config: dict) -> Geometry:
    """VTAB's geometry: a plain resize to the input size, no crop, no augmentation (VPT's tf_dataset.py)."""
    return Geometry(input_hw(data_config), None, False, interpolation(data_config))


def pil_transform(geometry: Geometry, data_config: dict) -> T.Compose:
    """`geometry` as a torchvision transform of a PIL image, then ToTensor and the backbone's normalisation.

    Normalisation uses the backbone's own mean/std (0.5 for the in21k ViT); VPT's code used ImageNet's statistics
    for every backbone, which shifts the inputs the pretrained weights expect.
    """
    return T.Compose([geometry.resize_op(), *geometry.crop_ops(), *to_normalised_tensor(data_config)])


def fgvc_transform(data_config: dict, train: bool) -> T.Compose:
    """VPT's FGVC transform (`fgvc_geometry`) on PIL images."""
    return pil_transform(fgvc_geometry(data_config, train), data_config)


def resize_transform(data_config: dict) -> T.Compose:
    """VTAB's transform (`resize_geometry`) on PIL images."""
    return pil_transform(resize_geometry(data_config), data_config)


def crop_windows(sizes, geometry: Geometry, generator: torch.Generator | None = None) -> list[tuple[int, int, bool]]:
    """(top, left, flip) per image of `sizes` (B, 2) = (h, w) for `geometry`'s crop, drawn as torchvision draws
    them: RandomCrop's offsets uniform over 0..h-th and 0..w-tw, a flip with p = 0.5; CenterCrop's offsets
    round((h - th) / 2) with Python's half-to-even rounding, which torch.round shares. Every image must be at least
    the crop's size. Drawn on the host (a few numbers per image), so a GPU batch is cut without a device sync."""
    spare = torch.as_tensor(sizes, dtype=torch.int64) - torch.tensor(geometry.crop)  # (B, 2) room for the window
    if geometry.augment:
        # float64 uniforms times the number of offsets, floored: uniform integers (clamped against a rounding up)
        draws = torch.rand(len(spare), 3, dtype=torch.float64, generator=generator)
        offsets, flips = torch.minimum((draws[:, :2] * (spare + 1)).long(), spare), draws[:, 2] < 0.5
    else:
        offsets, flips = (spare.double() / 2).round().long(), torch.zeros(len(spare), dtype=torch.bool)
    return list(zip(offsets[:, 0].tolist(), offsets[:, 1].tolist(), flips.tolist(), strict=True))


def crop_and_normalise(pixels: torch.Tensor, sizes, geometry: Geometry, data_config: dict,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The tensor twin of `pil_transform` after its resize, on a batch already resized (and padded) on any device.

    pixels: (B, Hmax, Wmax, C) uint8, image i in its top-left (h_i, w_i) corner; sizes: (B, 2) on the host. Returns
    the model's (B, C, h, w) float32 inputs: the crop (or the resized image itself), then ToTensor's x / 255 and
    Normalize's (x - mean) / std, the same float32 operations in the same order, so an evaluation batch equals the
    PIL path's bit for bit.
    """
    batch, channels = len(pixels), pixels.shape[-1]
    if geometry.crop is None:  # a fixed-size resize: every image fills the batch (no padding), nothing to cut
        images = torch.empty((batch, channels, *pixels.shape[1:3]), dtype=torch.float32, device=pixels.device)
        images.copy_(pixels.permute(0, 3, 1, 2))
    else:
        th, tw = geometry.crop
        images = torch.empty((batch, channels, th, tw), dtype=torch.float32, device=pixels.device)
        # one slice per image, converted to float as it is copied: on a CPU several times faster than one gather
        for i, (top, left, flip) in enumerate(crop_windows(sizes, geometry, generator)):
            window = pixels[i, top:top + th, left:left + tw]  # (th, tw, C)
            images[i].copy_((window.flip(1) if flip else window).permute(2, 0, 1))
    mean = torch.as_tensor(data_config["mean"], dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.as_tensor(data_config["std"], dtype=images.dtype, device=images.device)[:, None, None]
    return images.div_(255).sub_(mean).div_(std)


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

    def geometry(self, train: bool) -> Geometry:
        """VPT's FGVC geometry (augmented for training); VTAB-1k overrides it with a plain resize."""
        return fgvc_geometry(self.data_config, train)

    def transform(self, train: bool) -> Callable:
        return pil_transform(self.geometry(train), self.data_config)

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
