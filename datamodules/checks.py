"""Checks a file-based dataset can call before any training: clear errors that name the file and the fix.

Datamodules reading images from disk (FGVC, VTAB-1k, folder) call these from `load_split`:

    require_files(root, ["train.json", "val.json", "test.json"], dataset="cub")
    check_image_files(paths)          # every path exists and decodes; raises naming the first few bad ones
    image = load_image(path)          # in __getitem__: a decoding error names the file

`benchmark.core.validate` also calls `check_image_files` on any split whose dataset exposes torchvision's
`samples` list of (path, label), so a datamodule built on `ImageFolder`/`DatasetFolder` is covered for free.
Each raises `DataError`, a `ValueError`, so the run stops before training with one readable message.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

SHOWN = 5  # how many offending files a message names before counting the rest


class DataError(ValueError):
    """A dataset on disk is missing, incomplete or damaged; the message says which file and how to fix it."""


def prepare_hint(dataset: str) -> str:
    return (f"prepare it with `make prepare DATASET={dataset} RAW=<dir of the original release>` "
            f"(or point DATA_ROOT at an already prepared copy)")


def name_some(items: Sequence[str]) -> str:
    """'a, b, c, d, e and 12 more' — the first few names and a count of the rest."""
    shown = ", ".join(str(item) for item in items[:SHOWN])
    return f"{shown} and {len(items) - SHOWN} more" if len(items) > SHOWN else shown


def require_root(root: str | Path | None, dataset: str) -> Path:
    """DATA_ROOT must be given and be a directory."""
    if root is None or str(root) == "":
        raise DataError(f"DATASET={dataset} reads files from disk but no DATA_ROOT was given; "
                        f"pass DATA_ROOT=<dir> (--data-root), or {prepare_hint(dataset)}.")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DATA_ROOT {str(root)!r} does not exist (or is not a directory) for DATASET={dataset}; "
                        f"check the path, or {prepare_hint(dataset)}.")
    return root


def require_files(root: str | Path | None, names: Iterable[str], dataset: str) -> Path:
    """DATA_ROOT exists and holds every split file in `names`; the error lists the missing ones."""
    root = require_root(root, dataset)
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise DataError(f"DATA_ROOT {str(root)!r} lacks the split file(s) {name_some(missing)} needed by "
                        f"DATASET={dataset}; {prepare_hint(dataset)}.")
    return root


def unreadable_reason(path: str | Path) -> str | None:
    """Why the image at `path` cannot be used (missing, empty, not an image, truncated), or None if it decodes.

    A full decode (`load`), not just the header: a truncated JPEG has a valid header and fails only when
    its last rows are read.
    """
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncation and corrupt data as OSError
        return f"unreadable: {err}"
    return None


def checked_images_dir() -> Path:
    """Where lists of images that decoded are remembered: $VPT_BENCH_CACHE/checked-images, by default under
    ~/.cache/vpt-bench (not in DATA_ROOT, which may be read-only or shared)."""
    root = os.environ.get("VPT_BENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "vpt-bench"
    return Path(root) / "checked-images"


def file_list_digest(paths: Sequence[str | Path]) -> str:
    """sha256 over each file's absolute path, size and modification time: any edit, replacement or re-download
    of any listed file gives a new digest."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        # os.fsencode: a file name that is not UTF-8 (kept by Python as surrogates) hashes as its own bytes
        digest.update(os.fsencode(os.path.abspath(path)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def remember_checked(digest: str) -> None:
    """Record that the file list with `digest` decoded; a cache that cannot be written only costs a re-check."""
    try:
        folder = checked_images_dir()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / digest).touch()
    except OSError:
        pass


def check_image_files(paths: Sequence[str | Path], split: str = "", workers: int | None = None) -> None:
    """Every path exists and decodes; raises one `DataError` naming the first few bad files and counting the rest.

    Existence is checked first (a stat per file) so that a wrong DATA_ROOT is reported as "missing" at once;
    then every image is decoded in a thread pool (PIL releases the GIL while decoding). A list that decoded
    before, with every file's size and modification time unchanged, is not decoded again: a grid of runs over
    the same dataset decodes it once, not once per run.
    """
    where = f" in the {split} split" if split else ""
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} image(s) listed{where} do not exist: {name_some(missing)}. "
                        "Check DATA_ROOT (image paths are relative to it) or re-run `make prepare`.")
    digest = file_list_digest(paths)
    if (checked_images_dir() / digest).is_file():
        return
    workers = workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(unreadable_reason, paths))
    bad = [f"{p} ({reason})" for p, reason in zip(paths, reasons, strict=True) if reason]
    if bad:
        raise DataError(f"{len(bad)} image(s){where} cannot be read: {name_some(bad)}. "
                        "Replace or remove them (re-download the file, or drop it from the split list).")
    remember_checked(digest)


def load_image(path: str | Path, mode: str = "RGB"):
    """Open and decode one image for a Dataset's __getitem__; an error names the file."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"image {str(path)!r} cannot be read ({err}); replace it or drop it from the split list.") \
            from err
