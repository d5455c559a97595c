"""Any image classification dataset as class folders (torchvision's ImageFolder layout):

    <DATA_ROOT>/train/<class>/<image>     required; the class names, sorted, become labels 0..C-1
    <DATA_ROOT>/val/<class>/<image>       optional; without it, 10% of each class of train (seeded) becomes val
    <DATA_ROOT>/test/<class>/<image>      optional; without it, test accuracy is measured on val (with a warning)

Images get the FGVC transform of the VPT paper (resize, random crop and flip for training; resize and
center crop for evaluation), the natural choice for photographs.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from datamodules.checks import DataError, require_root
from datamodules.files import ImageFilesDataModule, carve_val

Listing = tuple[list[str], np.ndarray, list[str]]  # (paths, labels, ids)


class FolderDataModule(ImageFilesDataModule):
    """`DATASET=folder DATA_ROOT=<dir>` with train/<class>/..., optional val/ and test/."""

    name = "folder"

    @cached_property
    def root(self) -> Path:
        root = require_root(self.data_root, self.name)
        if not (root / "train").is_dir():
            raise DataError(f"DATA_ROOT {str(root)!r} has no train/ folder; DATASET=folder needs "
                            "train/<class>/<image> (and optionally val/ and test/ in the same layout).")
        return root

    @cached_property
    def classes(self) -> list[str]:
        try:
            classes, _ = find_classes(self.root / "train")
        except FileNotFoundError as err:
            raise DataError(f"{self.root / 'train'} has no class folders: {err}") from err
        return classes

    @property
    def class_names(self) -> list[str]:
        return self.classes

    def scan(self, split: str) -> Listing:
        """Every image of <root>/<split>/<class>/, classes numbered as in train/."""
        folder = self.root / split
        extra = sorted(set(find_classes(folder)[0]) - set(self.classes))
        if extra:
            raise DataError(f"{folder} has class folder(s) {extra} that train/ lacks; every class needs training "
                            "images (add them to train/ or remove the folders).")
        try:
            samples = make_dataset(folder, {c: i for i, c in enumerate(self.classes)}, extensions=IMG_EXTENSIONS,
                                   allow_empty=split != "train")
        except FileNotFoundError as err:  # a train class folder without images
            raise DataError(f"{folder}: {err}") from err
        samples.sort()  # canonical order whatever the file system lists
        paths = [path for path, _ in samples]
        return paths, np.asarray([label for _, label in samples], dtype=np.int64), \
            [Path(p).relative_to(self.root).as_posix() for p in paths]

    @cached_property
    def listing(self) -> dict[str, Listing]:
        train = self.scan("train")
        if (self.root / "val").is_dir():
            val = self.scan("val")
        else:
            to_val = carve_val(train[1])
            val, train = (subset(train, to_val), subset(train, ~to_val))
        if (self.root / "test").is_dir():
            test = self.scan("test")
        else:
            warnings.warn(f"{self.root} has no test/ folder: test accuracy is measured on the val split.", stacklevel=2)
            test = val
        return {"train": train, "val": val, "test": test}

    def list_split(self, split: str) -> Listing:
        return self.listing[split]


def subset(listing: Listing, mask: np.ndarray) -> Listing:
    paths, labels, ids = listing
    keep = np.flatnonzero(mask)
    return [paths[i] for i in keep], labels[keep], [ids[i] for i in keep]
