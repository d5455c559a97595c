"""Build the FGVC JSON split files (VPT's layout, datamodules/fgvc.py) from each dataset's original release.

    python -m benchmark.prepare --dataset cub --raw <dir of the release> [--out <DATA_ROOT>] [--seed 0] [--force]
    make prepare DATASET=cub RAW=<dir> [DATA_ROOT=<dir>]

What each converter reads (RAW may also be the folder that holds the release's top folder):

    cub       CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, images/
    nabirds   nabirds/: the same three text files (class ids are not contiguous: remapped when loading), images/
    flowers   imagelabels.mat, setid.mat (trnid / valid / tstid), jpg/image_NNNNN.jpg
    dogs      train_list.mat, test_list.mat (file_list, labels), Images/
    cars      devkit/cars_train_annos.mat + cars_test_annos_withlabels.mat (the test labels released after the
              devkit; a cars_test_annos.mat that has labels also works), cars_train/, cars_test/;
              or the all-in-one cars_annos.mat (relative_im_path, class, test) with car_ims/

Flowers has an official val split; for the others val is carved from train (10% of each class, stratified, seeded),
as the paper did. The JSON files go to --out (default: RAW itself); when that is elsewhere, the image folders are
linked into it so the image paths resolve. Existing JSON files that differ are kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.core.cli import add_switch
from benchmark.core.store import atomic_write_text
from datamodules.checks import DataError, name_some
from datamodules.fgvc import FGVC_DATAMODULES, SPLIT_FILES
from datamodules.files import VAL_FRACTION, carve_val

Annotation = dict[str, int]  # {image path relative to the image folder: class id}


@dataclass
class Release:
    """A converted release: the three splits and the entries of RAW their image paths need."""

    splits: dict[str, Annotation]
    root: Path  # the release's folder: a DATA_ROOT once the JSON files are in it
    shared: list[str]  # its entries that hold the images (linked into DATA_ROOT when that is elsewhere)


# --- readers -----------------------------------------------------------------------------------------
def find_release(raw: Path, marker: str, subfolders: tuple[str, ...]) -> Path:
    """The folder holding `marker`: RAW itself, or one of the release's usual top folders inside it."""
    for folder in (raw, *(raw / s for s in subfolders)):
        if (folder / marker).is_file():
            return folder
    places = ", ".join(str(raw / s) for s in ("", *subfolders))
    raise DataError(f"{marker} not found in {places}; pass RAW=<the folder of the original release>.")


def read_table(path: Path) -> dict[str, str]:
    """A release's `<image id> <value>` text file as {image id: value}."""
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            key, _, value = line.strip().partition(" ")
            if not value:
                raise DataError(f"{path}:{number}: expected `<image id> <value>`, got {line!r}.")
            rows[key] = value.strip()
    return rows


def load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    if not path.is_file():
        raise DataError(f"{path} not found; pass RAW=<the folder of the original release>.")
    return loadmat(str(path), squeeze_me=True)


def flat(values) -> list:
    """A MATLAB array or cell array (as scipy reads it) as a flat Python list of scalars/strings."""
    out = []
    for value in np.atleast_1d(values).ravel():
        out.extend(flat(value) if isinstance(value, np.ndarray) else [value.item() if hasattr(value, "item")
                                                                         else value])
    return out


# --- converters --------------------------------------------------------------------------------------
def carve(train: Annotation, seed: int) -> tuple[Annotation, Annotation]:
    """(train, val): val takes 10% of each class of `train` (stratified, seeded; datamodules.files.carve_val)."""
    ids = sorted(train)
    to_val = carve_val(np.asarray([train[i] for i in ids]), VAL_FRACTION, seed)
    return ({i: train[i] for i, v in zip(ids, to_val, strict=True) if not v},
            {i: train[i] for i, v in zip(ids, to_val, strict=True) if v})


def caltech_birds(raw: Path, seed: int, subfolders: tuple[str, ...]) -> Release:
    """CUB-200-2011 and NABirds: images.txt, image_class_labels.txt, train_test_split.txt (1 = train)."""
    root = find_release(raw, "images.txt", subfolders)
    files = {name: read_table(root / f"{name}.txt") if (root / f"{name}.txt").is_file() else None
             for name in ("images", "image_class_labels", "train_test_split")}
    missing = [f"{name}.txt" for name, table in files.items() if table is None]
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)}; the release has images.txt, image_class_labels.txt "
                        "and train_test_split.txt.")
    paths, classes, is_train = files["images"], files["image_class_labels"], files["train_test_split"]
    unlabelled = [i for i in paths if i not in classes or i not in is_train]
    if unlabelled:
        raise DataError(f"{root}: image id(s) {name_some(unlabelled)} of images.txt have no class or split entry.")
    train = {paths[i]: int(classes[i]) for i in paths if is_train[i] == "1"}
    test = {paths[i]: int(classes[i]) for i in paths if is_train[i] != "1"}
    train, val = carve(train, seed)
    return Release({"train": train, "val": val, "test": test}, root, ["images"])


def cub(raw: Path, seed: int) -> Release:
    return caltech_birds(raw, seed, ("CUB_200_2011",))


def nabirds(raw: Path, seed: int) -> Release:
    return caltech_birds(raw, seed, ("nabirds",))


def flowers(raw: Path, seed: int) -> Release:
    """Oxford Flowers-102: labels[i] is the class of image i+1; setid holds 1-based image ids per split."""
    root = find_release(raw, "imagelabels.mat", ("flowers102", "102flowers", "flowers"))
    labels = [int(c) for c in flat(load_mat(root / "imagelabels.mat")["labels"])]
    setid = load_mat(root / "setid.mat")
    path = lambda image_id: f"jpg/image_{image_id:05d}.jpg"
    splits = {split: {path(int(i)): labels[int(i) - 1] for i in flat(setid[key])}
              for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    return Release(splits, root, ["jpg"])


def dogs(raw: Path, seed: int) -> Release:
    """Stanford Dogs: train_list.mat / test_list.mat, each with file_list (paths under Images/) and labels."""
    root = find_release(raw, "train_list.mat", ("StanfordDogs", "stanford_dogs", "dogs"))
    splits = {}
    for split in ("train", "test"):
        mat = load_mat(root / f"{split}_list.mat")
        splits[split] = {str(f): int(c) for f, c in zip(flat(mat["file_list"]), flat(mat["labels"]), strict=True)}
    splits["train"], splits["val"] = carve(splits["train"], seed)
    return Release(splits, root, ["Images"])


def car_annotations(mat: dict, path: Path, folder: str) -> Annotation:
    annotations = mat["annotations"]
    if "class" not in annotations.dtype.names:
        raise DataError(f"{path} has no class labels (the devkit's test annotations do not); download "
                        "cars_test_annos_withlabels.mat and put it in RAW or RAW/devkit.")
    return {f"{folder}/{a['fname']}": int(a["class"]) for a in np.atleast_1d(annotations)}


def cars(raw: Path, seed: int) -> Release:
    """Stanford Cars: the devkit's annotation structs (fname, class), or the all-in-one cars_annos.mat."""
    for folder in (raw, raw / "stanford_cars", raw / "StanfordCars", raw / "cars"):
        if (folder / "cars_annos.mat").is_file():  # relative_im_path = car_ims/NNNNNN.jpg, test flag per image
            annotations = np.atleast_1d(load_mat(folder / "cars_annos.mat")["annotations"])
            train = {str(a["relative_im_path"]): int(a["class"]) for a in annotations if not int(a["test"])}
            test = {str(a["relative_im_path"]): int(a["class"]) for a in annotations if int(a["test"])}
            train, val = carve(train, seed)
            return Release({"train": train, "val": val, "test": test}, folder, ["car_ims"])
    root = find_release(raw, "devkit/cars_train_annos.mat", ("stanford_cars", "StanfordCars", "cars"))
    test_file = next((p for p in (root / "cars_test_annos_withlabels.mat", root / "devkit" /
                                  "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos.mat")
                      if p.is_file()), root / "cars_test_annos_withlabels.mat")
    train = car_annotations(load_mat(root / "devkit" / "cars_train_annos.mat"), root, "cars_train")
    test = car_annotations(load_mat(test_file), test_file, "cars_test")
    train, val = carve(train, seed)
    return Release({"train": train, "val": val, "test": test}, root, ["cars_train", "cars_test"])


CONVERTERS: dict[str, Callable[[Path, int], Release]] = {
    "cub": cub, "nabirds": nabirds, "flowers": flowers, "dogs": dogs, "cars": cars}
IMAGE_DIRS = {cls.name: cls.image_dir for cls in FGVC_DATAMODULES}


# --- writing -----------------------------------------------------------------------------------------
def check_images_exist(release: Release, image_root: Path) -> None:
    missing = [str(image_root / p) for split in release.splits.values() for p in split
               if not (image_root / p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) named by the release do not exist: {name_some(missing)}. "
                        "Is the release complete (images unpacked next to its annotation files)?")


def link_images(release: Release, out: Path) -> None:
    """Make `out` a DATA_ROOT whose image paths resolve: symlink the release's image folders into it."""
    for entry in release.shared:
        target, link = release.root / entry, out / entry
        if link.resolve() == target.resolve():
            continue
        if link.exists() or link.is_symlink():
            raise DataError(f"{link} exists and is not the release's {entry}; remove it or choose another DATA_ROOT.")
        link.symlink_to(target.resolve(), target_is_directory=True)


def write_splits(release: Release, out: Path, force: bool) -> list[Path]:
    """Write train/val/test JSON into `out` (atomically); a differing existing file is kept unless `force`."""
    texts = {SPLIT_FILES[s]: json.dumps(dict(sorted(a.items())), indent=0) + "\n" for s, a in release.splits.items()}
    clashes = [name for name, text in texts.items() if (out / name).is_file() and (out / name).read_text() != text]
    if clashes and not force:
        raise DataError(f"{out} already has {', '.join(clashes)} with other contents (e.g. VPT's published files); "
                        "keep them, or pass --force (FORCE=1) to overwrite, or write elsewhere with --out (DATA_ROOT).")
    written = []
    for name, text in texts.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    return written


def prepare(dataset: str, raw: str | Path, out: str | Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Convert the release of `dataset` at `raw`; returns the DATA_ROOT to pass to a run."""
    if dataset not in CONVERTERS:
        raise DataError(f"make prepare converts the FGVC datasets {', '.join(CONVERTERS)}, not {dataset!r}. "
                        "VTAB-1k is read as the processed lists (docs/datasets.md); DATASET=folder needs no preparing.")
    raw = Path(raw)
    if not raw.is_dir():
        raise DataError(f"RAW {str(raw)!r} is not a directory; pass RAW=<the folder of the original release>.")
    release = CONVERTERS[dataset](raw, seed)
    check_images_exist(release, release.root / IMAGE_DIRS[dataset])
    out = Path(out) if out else release.root
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != release.root.resolve():
        link_images(release, out)
    write_splits(release, out, force)
    classes = len(set(release.splits["train"].values()))
    sizes = ", ".join(f"{split} {len(a)}" for split, a in release.splits.items())
    print(f"{dataset}: {sizes}; {classes} classes -> {out} (use DATA_ROOT={out})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(CONVERTERS))
    p.add_argument("--raw", required=True, help="folder of the original release")
    p.add_argument("--out", "--data-root", help="DATA_ROOT to write the JSON files into (default: the release folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val carve (default 0)")
    add_switch(p, "--force", help="overwrite existing JSON files that differ")
    args = p.parse_args(argv)
    try:
        prepare(args.dataset, args.raw, args.out, args.seed, args.force)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
