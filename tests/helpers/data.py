"""Tiny data sets for the tests: image folders in each on-disk layout (folder, VTAB-1k, FGVC), in-memory
datamodules (patterns, the digits with a NaN image), and a stand-in that declares a deterministic train transform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules import list_datasets, register_dataset
from datamodules.embedded import DigitsDataModule, TensorSplitsDataModule

# The tiny ViT's data config (32 px RGB), bilinear: what DATASET=folder and vtab/* tests build their data with.
DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear"}


# --- DATASET=folder: class folders under train/ (val/, test/) --------------------------------------------------
FOLDER_CLASSES = ("zebra", "ant", "mole")  # sorted: ant 0, mole 1, zebra 2


def make_folder(root: Path, per_class: dict[str, int]) -> Path:
    seed = 0
    for split, count in per_class.items():
        for name in FOLDER_CLASSES:
            for i in range(count):
                path = root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng(seed).integers(0, 256, (36, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
                seed += 1
    (root / "train" / "ant" / "notes.txt").write_text("not an image: ignored")
    return root


# --- VTAB-1k in the processed list layout --------------------------------------------------------------------
VTAB_SIZES = {"train800.txt": 3, "val200.txt": 1, "test.txt": 2}  # per class; train800val200 = train800 + val200


def write_vtab_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (20 + seed % 7, 30 + seed % 5)  # assorted, non-square sizes: the transform must resize them all
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def make_vtab(root: Path, task: str = "kitti", labels=(3, 0, 1, 2)) -> Path:
    """<root>/<task>/ with the four list files, lines in shuffled order, image paths with a space in them."""
    folder = root / task
    lists = {}
    seed = 0
    for name, count in VTAB_SIZES.items():
        lines = []
        for label in labels:
            for i in range(count):
                relative = f"images/{name[:-4]}/class {label}_{i}.png"
                write_vtab_image(folder / relative, seed)
                lines.append(f"{relative} {label}")
                seed += 1
        lists[name] = lines[::-1]
    lists["train800val200.txt"] = lists["val200.txt"] + lists["train800.txt"]
    for name, lines in lists.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return root


# --- FGVC-5 in VPT's JSON layout -------------------------------------------------------------------------------
FGVC_IMAGE_DIRS = {"cub": "images", "nabirds": "images", "dogs": "Images", "cars": "", "flowers": ""}
FGVC_RAW_CLASSES = (17, 3, 200)  # raw ids, unsorted and not contiguous: remapped to 3 -> 0, 17 -> 1, 200 -> 2


def write_fgvc_image(path: Path, seed: int, size=(40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_fgvc(root: Path, dataset: str, per_class=(6, 2, 3)) -> Path:
    """Tiny VPT-layout dataset: per class `per_class` = (train, val, test) images, written as JSON + PNGs.
    It has 3 classes, not the paper's counts: datamodules warn about that (a test filters the warning)."""
    image_root = root / FGVC_IMAGE_DIRS[dataset]
    seed = 0
    for split, count in zip(("train", "val", "test"), per_class, strict=True):
        annotation = {}
        for class_id in FGVC_RAW_CLASSES:
            for i in range(count):
                relative = f"{split}/{class_id:03d}.class/img_{i}.png"
                write_fgvc_image(image_root / relative, seed)
                annotation[relative] = class_id
                seed += 1
        # keys in reverse order: the datamodule must not depend on the file's key order
        (root / f"{split}.json").write_text(json.dumps(dict(reversed(annotation.items()))))
    return root


# --- in-memory datamodules ------------------------------------------------------------------------------------
PATTERN_SIZES = {"train": 60, "val": 30, "test": 45}


class PatternDataModule(TensorSplitsDataModule):
    """3 classes of 12x12 grey images: a bright band whose row depends on the class, plus noise."""

    name = "patterns"
    offset = 0  # changing it changes every image: the cache must notice

    @property
    def num_classes(self) -> int:
        return 3

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(list(PATTERN_SIZES).index(split))
        labels = np.arange(PATTERN_SIZES[split]) % 3
        images = rng.integers(0, 120, size=(len(labels), 12, 12)).astype(np.int64) + self.offset
        for i, label in enumerate(labels):
            images[i, 4 * label: 4 * label + 4] += 120
        return np.clip(images, 0, 255).astype(np.uint8), labels


NAN_DIGITS = "test_digits_nan"


class NaNDigitsDataModule(DigitsDataModule):
    """The digits with one corrupted training image (all NaN): the first batch holding it has a NaN loss."""

    name = NAN_DIGITS

    def load_split(self, split: str):
        data = super().load_split(split)
        if split == "train":
            data.dataset.tensors[0][0] = float("nan")
        return data


def register_nan_digits() -> str:
    """Registers DATASET=test_digits_nan (NaNDigitsDataModule) once; returns its name."""
    if NAN_DIGITS not in list_datasets():
        register_dataset(NAN_DIGITS, NaNDigitsDataModule)
    return NAN_DIGITS


class DeterministicData:
    deterministic_train_transform = True  # what a datamodule declares where the linear probe's cache applies
