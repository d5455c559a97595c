"""FGVC-5, the fine-grained tasks of VPT's Fig. 3 (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119):
CUB-200-2011, NABirds, Oxford Flowers-102, Stanford Dogs and Stanford Cars, in the official VPT layout.

    <DATA_ROOT>/train.json, val.json, test.json     {relative image path: class id}
    <DATA_ROOT>/train_<p>.json                      optional: the training subset for fraction p (e.g. train_0.1.json)
    <DATA_ROOT>/<image dir>/<relative image path>   images/ (CUB, NABirds), Images/ (Dogs), the root (Cars, Flowers)

Class ids are sorted and remapped to 0..C-1 from train.json (as VPT's json_dataset.py does). A `train_<p>.json`
file, when present, is the training set for fraction p; otherwise the suite's nested stratified split is used.
`make prepare` writes the JSON files from each dataset's original release, `make splits` the fraction files.
"""

from __future__ import annotations

import json
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from datamodules.checks import DataError, name_some, prepare_hint, require_files
from datamodules.files import ImageFilesDataModule, remap_classes
from datamodules.labelled_split import LabelledSplit

SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}


def fraction_file_name(fraction: float) -> str:
    """`train_0.1.json` for 0.1: VPT's json_dataset.py names them "{split}_{percentage}.json"."""
    return f"train_{fraction:g}.json"


def read_annotation(path: Path) -> dict[str, int]:
    """A VPT split file: a JSON object {relative image path: integer class id}."""
    try:
        annotation = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a readable JSON file ({err}); re-create it with `make prepare`.") from err
    if not isinstance(annotation, dict):
        raise DataError(f"{path} must hold a JSON object {{relative image path: class id}}, "
                        f"got a {type(annotation).__name__}.")
    bad = [f"{key}: {value!r}" for key, value in annotation.items()
           if not isinstance(value, int) or isinstance(value, bool)]
    if bad:
        raise DataError(f"{path}: class ids must be integers, got {name_some(bad)}.")
    return annotation


class FGVCDataModule(ImageFilesDataModule):
    """One FGVC task in the VPT JSON layout; subclasses name the image folder and the paper's class count."""

    image_dir: str = ""  # image paths in the JSON files are relative to <DATA_ROOT>/<image_dir>
    paper_num_classes: int = 0

    @cached_property
    def root(self) -> Path:
        return require_files(self.data_root, SPLIT_FILES.values(), self.name)

    def annotation(self, file_name: str) -> dict[str, int]:
        return read_annotation(self.root / file_name)

    @cached_property
    def classes(self) -> list[int]:
        """The raw class ids of train.json, sorted: position = the label the model sees."""
        classes = sorted(set(self.annotation(SPLIT_FILES["train"]).values()))
        if len(classes) != self.paper_num_classes:
            warnings.warn(f"DATASET={self.name}: train.json has {len(classes)} classes, the paper's {self.name} has "
                          f"{self.paper_num_classes}; results will not be comparable to the paper's. Check DATA_ROOT "
                          f"or {prepare_hint(self.name)}.", stacklevel=2)
        return classes

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.classes]  # the raw ids of train.json, which extra test folders are named by

    def list_split(self, split: str) -> tuple[list[str], np.ndarray, list[str]]:
        annotation = self.annotation(SPLIT_FILES[split])
        ids = sorted(annotation)  # canonical order: the split must not depend on the JSON's key order
        unknown = sorted({annotation[i] for i in ids} - set(self.classes))
        if unknown:
            raise DataError(f"{self.root / SPLIT_FILES[split]} has class id(s) {name_some(unknown)} that train.json "
                            f"does not have; every class must have training images. {prepare_hint(self.name)}.")
        labels = remap_classes([annotation[i] for i in ids], self.classes)
        image_root = self.root / self.image_dir
        return [str(image_root / i) for i in ids], labels, ids

    # --- published fraction files --------------------------------------------------------------------------
    @property
    def fraction_file(self) -> Path | None:
        """`train_<p>.json` for this run's fraction, when it exists and applies (train_on=train, p < 1, no shots)."""
        if self.train_fraction >= 1.0 or self.shots is not None:
            return None
        path = self.root / fraction_file_name(self.train_fraction)
        if not path.is_file():
            return None
        if self.train_on != "train":
            warnings.warn(f"{path.name} selects from train.json only; train_on={self.train_on} uses the suite's "
                          "split of train + val instead.", stacklevel=2)
            return None
        return path

    def select_training_indices(self, pool: LabelledSplit) -> np.ndarray:
        path = self.fraction_file
        if path is None:
            return super().select_training_indices(pool)
        subset = self.annotation(path.name)
        position = {example_id: i for i, example_id in enumerate(pool.ids)}
        train = self.annotation(SPLIT_FILES["train"])
        foreign = [key for key in subset if key not in position]
        relabelled = [key for key in subset if key in position and subset[key] != train[key]]
        if foreign or relabelled or not subset:
            problem = (f"{len(foreign)} image(s) not in train.json: {name_some(foreign)}" if foreign else
                       f"{len(relabelled)} image(s) with another class than in train.json: {name_some(relabelled)}"
                       if relabelled else "no image")
            raise DataError(f"{path} lists {problem}. A fraction file must be a subset of train.json; delete it to "
                            f"use the suite's split, or rewrite it with `make splits DATASET={self.name} "
                            f"DATA_ROOT={self.root}`.")
        return np.sort(np.asarray([position[key] for key in subset], dtype=np.int64))

    def split_record(self) -> dict:
        path = self.fraction_file
        return super().split_record() | {"split_source": path.name if path else "suite"}


class CUBDataModule(FGVCDataModule):
    """CUB-200-2011 (Wah et al., 2011): 200 bird species."""

    name, image_dir, paper_num_classes = "cub", "images", 200


class NABirdsDataModule(FGVCDataModule):
    """NABirds (Van Horn et al., CVPR 2015): 555 North American bird categories."""

    name, image_dir, paper_num_classes = "nabirds", "images", 555


class FlowersDataModule(FGVCDataModule):
    """Oxford Flowers-102 (Nilsback & Zisserman, 2008): 102 flower species."""

    name, image_dir, paper_num_classes = "flowers", "", 102


class DogsDataModule(FGVCDataModule):
    """Stanford Dogs (Khosla et al., 2011): 120 dog breeds."""

    name, image_dir, paper_num_classes = "dogs", "Images", 120


class CarsDataModule(FGVCDataModule):
    """Stanford Cars (Krause et al., 2013): 196 car models."""

    name, image_dir, paper_num_classes = "cars", "", 196


FGVC_DATAMODULES = (CUBDataModule, NABirdsDataModule, FlowersDataModule, DogsDataModule, CarsDataModule)
