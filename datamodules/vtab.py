"""VTAB-1k (Zhai et al., 2019, https://arxiv.org/abs/1910.04867), the 19 tasks of VPT's Table 1, in the widely
shared processed layout (image files plus split lists):

    <DATA_ROOT>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt
        each line: `<image path relative to <DATA_ROOT>/<task>> <label>`

`train800` trains and `val200` selects hyperparameters; the final runs train on `train800val200`
(TRAIN_ON=trainval). The transform is a plain resize to the backbone's input size with no augmentation,
as in VPT's tf_dataset.py, so the linear probe may train on cached features.

Labels are used as written: they are already 0..C-1 for the task's full label set, and are not remapped
because 1,000 training images need not cover every class (SUN397 has 397), so remapping the classes that
happen to occur would give the same class different ids in train and test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from datamodules.checks import DataError, require_root
from datamodules.files import Geometry, ImageFilesDataModule, resize_geometry
from datamodules.labelled_split import LabelledSplit

SPLIT_FILES = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
TRAINVAL_FILE = "train800val200.txt"


SPLIT_SIZES = {"train": 800, "val": 200}  # VTAB-1k's train800 / val200 lists: 1,000 training images per task


@dataclass(frozen=True)
class VTABTask:
    group: str  # natural / specialized / structured: VTAB's three groups, averaged separately in the paper
    num_classes: int
    # test.txt's images: the "test" split of google-research/task_adaptation data/<task>.py, sized by the TFDS catalog
    # (tensorflow/datasets docs/catalog/<name>.md): the TFDS test split, except clevr = validation (15,000), eurosat
    # and resisc45 = train's last 20% (27,000, 31,500), dsprites = train's last 10% (737,280), smallnorb = test[50%:]
    # (24,300). Only the dry run's cost estimate reads them (a run counts its test.txt)
    test_size: int


VTAB_TASKS = {
    "cifar": VTABTask("natural", 100, 10000),
    "caltech101": VTABTask("natural", 102, 6084),
    "dtd": VTABTask("natural", 47, 1880),
    "oxford_flowers102": VTABTask("natural", 102, 6149),
    "oxford_iiit_pet": VTABTask("natural", 37, 3669),
    "svhn": VTABTask("natural", 10, 26032),
    "sun397": VTABTask("natural", 397, 21750),
    "patch_camelyon": VTABTask("specialized", 2, 32768),
    "eurosat": VTABTask("specialized", 10, 5400),
    "resisc45": VTABTask("specialized", 45, 6300),
    "diabetic_retinopathy": VTABTask("specialized", 5, 42670),
    "clevr_count": VTABTask("structured", 8, 15000),
    "clevr_dist": VTABTask("structured", 6, 15000),
    "dmlab": VTABTask("structured", 6, 22735),
    "kitti": VTABTask("structured", 4, 711),
    "dsprites_loc": VTABTask("structured", 16, 73728),
    "dsprites_ori": VTABTask("structured", 16, 73728),
    "smallnorb_azi": VTABTask("structured", 18, 12150),
    "smallnorb_ele": VTABTask("structured", 9, 12150),
}


def read_list(path: Path, num_classes: int) -> tuple[list[str], np.ndarray]:
    """(relative paths, labels) of a VTAB-1k list file; a malformed line or a label out of range names the line."""
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        relative, _, label = line.strip().rpartition(" ")  # the label is the last field; a path may hold spaces
        if not relative or not label.lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected `<relative image path> <integer label>`, got {line!r}.")
        if not 0 <= int(label) < num_classes:
            raise DataError(f"{path}:{number}: label {label} is outside 0..{num_classes - 1} ({num_classes} classes "
                            f"in this VTAB task); is DATA_ROOT/<task> the right task's folder?")
        paths.append(relative)
        labels.append(int(label))
    return paths, np.asarray(labels, dtype=np.int64)


class VTABDataModule(ImageFilesDataModule):
    """One VTAB-1k task; `vtab_datamodule(task)` makes the registered subclass of each of the 19."""

    task: str = ""
    deterministic_train_transform = True  # resize only: a frozen backbone gives the same features every epoch
    sparse_classes = True  # 800 training images need not cover every class (e.g. SUN397's 397)

    @property
    def num_classes(self) -> int:
        return VTAB_TASKS[self.task].num_classes

    @classmethod
    def split_sizes(cls) -> dict[str, int]:
        info = VTAB_TASKS[cls.task]
        return SPLIT_SIZES | {"test": info.test_size, "classes": info.num_classes}

    @cached_property
    def task_dir(self) -> Path:
        root = require_root(self.data_root, self.name)
        folder = root / self.task
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in VTAB_TASKS)
            raise DataError(f"DATA_ROOT {str(root)!r} has no folder {self.task!r} for DATASET={self.name}; DATA_ROOT "
                            "must be the VTAB-1k root holding one folder per task (task folders found: "
                            f"{', '.join(present) or 'none'}).")
        return folder

    def geometry(self, train: bool) -> Geometry:
        return resize_geometry(self.data_config)

    def list_file(self, file_name: str) -> tuple[list[str], np.ndarray, list[str]]:
        path = self.task_dir / file_name
        if not path.is_file():
            raise DataError(f"VTAB-1k task folder {str(self.task_dir)!r} lacks {file_name} (DATASET={self.name}); "
                            f"it needs {', '.join([*SPLIT_FILES.values(), TRAINVAL_FILE])}.")
        relative, labels = read_list(path, self.num_classes)
        order = np.argsort(relative, kind="stable")  # canonical order: sorted ids
        ids = [relative[i] for i in order]
        return [str(self.task_dir / i) for i in ids], labels[order], ids

    def list_split(self, split: str) -> tuple[list[str], np.ndarray, list[str]]:
        return self.list_file(SPLIT_FILES[split])

    def training_pool(self) -> LabelledSplit:
        """train800, or for the final runs the published train800val200 list."""
        if self.train_on == "train":
            return self.splits["train"]
        return self.as_split(*self.list_file(TRAINVAL_FILE), train=True)

def vtab_datamodule(task: str) -> type[VTABDataModule]:
    """The datamodule class of `vtab/<task>`."""
    return type(f"VTAB_{task}", (VTABDataModule,), {"task": task, "name": f"vtab/{task}",
                                                    "__doc__": f"VTAB-1k {task} ({VTAB_TASKS[task].group})."})


VTAB_DATAMODULES = tuple(vtab_datamodule(task) for task in VTAB_TASKS)
