"""Extra test sets for the domain-shift protocol (NOAH, Zhang et al. 2022, https://arxiv.org/abs/2206.04673; SSF,
Lian et al. 2022, https://arxiv.org/abs/2210.08823): after training on one dataset (ImageNet), evaluate on others
that share its classes (ImageNet-V2, -Sketch, -A, -R), each an image folder

    <dir>/<class name>/<image>      class folders named like the training classes (`class_names` of the datamodule)

Class folders are matched to the training classes by name. A set may hold a subset of them (ImageNet-A and -R have
200 of ImageNet's 1,000 classes): the model's prediction is then the best of those classes only (the logits of the
others are masked before the argmax, `restricted_argmax`), as the papers evaluate A and R. A class folder whose
name the training set lacks is an error, named before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from datamodules.checks import DataError, name_some
from datamodules.labelled_split import LabelledSplit


@dataclass
class ExtraTestSet:
    name: str
    folder: str
    split: LabelledSplit
    classes: np.ndarray  # sorted training class ids the set holds: the logits its predictions may choose from
    num_classes: int  # of the training set

    @property
    def restricted(self) -> bool:
        """True when the set holds only some of the training classes: its argmax runs over those only."""
        return len(self.classes) < self.num_classes

    def allowed(self) -> torch.Tensor:
        """(num_classes,) bool: the classes a prediction on this set may be."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[torch.as_tensor(self.classes, dtype=torch.long)] = True
        return mask


def restricted_argmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(B,) the best class among `allowed` ((C,) bool) for each row of `logits` (B, C), in training class ids."""
    return logits.masked_fill(~allowed.to(logits.device), float("-inf")).argmax(dim=1)


def scan_class_folders(folder: str | Path, class_names: list[str], name: str) \
        -> tuple[list[tuple[str, int]], list[str], np.ndarray]:
    """(samples [(path, training label)], ids, sorted training class ids present) of the extra test set `name`.

    Raises DataError for a missing folder, class folders the training set lacks, or a class folder without images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"EXTRA_TEST {name}={folder}: no such folder; give <name>=<dir of class folders>.")
    try:
        found, _ = find_classes(root)
    except FileNotFoundError as err:
        raise DataError(f"EXTRA_TEST {name}={folder} has no class folders ({err}); it needs <class>/<image>.") from None
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"EXTRA_TEST {name}={folder} has class folder(s) {name_some(unknown)} that the training set "
                        f"lacks (its classes: {name_some(list(class_names))}); class folders must be named like the "
                        "training classes (rename or remove them).")
    try:
        samples = make_dataset(root, {c: index[c] for c in found}, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # a class folder without images
        raise DataError(f"EXTRA_TEST {name}={folder}: {err}") from None
    samples.sort()  # canonical order whatever the file system lists
    ids = [Path(path).relative_to(root).as_posix() for path, _ in samples]
    return samples, ids, np.asarray(sorted(index[c] for c in found), dtype=np.int64)
