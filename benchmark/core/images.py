"""Decoded-image cache for image-file datasets (FGVC, VTAB-1k, folder): `IMAGE_CACHE=1` (`--image-cache`).

Decoding and resizing a 500x375 JPEG with PIL costs milliseconds per image per core, every epoch; on a GPU that,
not the model, sets the pace of a frozen-backbone run. Here each image is decoded and resized once, by the PIL
path's own resize (`Geometry.resize_op`: same size, same interpolation), into a uint8 memory-mapped file; the
loaders then only copy bytes, and the crop, flip and normalisation run on the batch on the training device
(`CachedImageDataModule.on_after_batch_transfer`, Lightning's hook for on-device transforms, calling
`datamodules.files.crop_and_normalise`). Evaluation inputs equal the PIL path's exactly; training crops and flips
have its distribution (tests/benchmark/core/test_images.py).

An entry is one list of image files at one resize, stored beside the feature cache and named like it
(`benchmark.core.features.record_key`):

    <results>/cache/images/<key>.u8     every image's resized pixels (h, w, channels) uint8, back to back
    <results>/cache/images/<key>.npy    (N, 3) int64: each image's (h, w, channels), in the list's order

The key hashes the cache format version, the files (each one's absolute path, size and modification time:
`datamodules.checks.file_list_digest`), the resize (size and interpolation), the image mode and the Pillow and
torchvision versions (their resize is the stored one): a changed file, list, size or library rebuilds. Both files
are written by the suite's atomic writer (temp file, fsync, rename), the pixels first and the shapes last, and an
entry is read only when its shapes file exists and the pixel file holds exactly their bytes: a build that crashed
or was killed is never read as complete, it is rebuilt.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from benchmark.core.features import CachedDataModule, record_key
from benchmark.core.store import atomic_write, results_path
from datamodules.checks import DataError, file_list_digest, load_image, name_some
from datamodules.files import Geometry, ImageFiles, ImageFilesDataModule, crop_and_normalise

IMAGE_CACHE_VERSION = 1  # bump when what is stored (or how it is computed) changes
BUILD_CHUNK = 256  # images decoded ahead of the writer at most: bounds the build's memory


class RawBatch(NamedTuple):
    """A batch as the cached loaders deliver it; `on_after_batch_transfer` turns it into (images, labels)."""

    pixels: torch.Tensor  # (B, Hmax, Wmax, C) uint8, image i in its top-left (h_i, w_i) corner
    sizes: np.ndarray  # (B, 2) int64 (h, w): a numpy array, so Lightning leaves it on the host
    labels: torch.Tensor  # (B,) int64
    train: bool  # crop with the training geometry (random window, flip) or the evaluation one


class CachedImages(Dataset):
    """(resized pixels (h, w, C) uint8 view, label) of one cache entry, read from its memory-mapped file."""

    def __init__(self, pixel_path: str | Path, shapes: np.ndarray, labels: Sequence[int], paths: Sequence[str]):
        self.pixel_path = str(pixel_path)
        self.shapes = np.asarray(shapes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shapes.prod(axis=1))])
        self.labels = list(labels)
        self.paths = list(paths)
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:  # a loader worker opens its own map: a memmap would be pickled as its bytes
        return {**self.__dict__, "_pixels": None}

    @property
    def pixels(self) -> np.memmap:
        if self._pixels is None:
            self._pixels = np.memmap(self.pixel_path, dtype=np.uint8, mode="r")
        return self._pixels

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        start, stop = self.offsets[index], self.offsets[index + 1]
        return self.pixels[start:stop].reshape(self.shapes[index]), self.labels[index]


def collate(items: list[tuple[np.ndarray, int]], train: bool) -> RawBatch:
    """Images of different sizes into one uint8 batch, each in the top-left corner of the largest (the padding is
    never read: every crop window lies inside its image)."""
    sizes = np.asarray([image.shape[:2] for image, _ in items], dtype=np.int64)
    channels = items[0][0].shape[2]
    pixels = torch.empty((len(items), *sizes.max(axis=0), channels), dtype=torch.uint8)
    canvas = pixels.numpy()
    for i, (image, _) in enumerate(items):
        canvas[i, : image.shape[0], : image.shape[1]] = image
    labels = torch.as_tensor([label for _, label in items], dtype=torch.int64)
    return RawBatch(pixels, sizes, labels, train)


# --- entries ---------------------------------------------------------------------------------------------------
def entry_key(paths: Sequence[str], geometry: Geometry, mode: str) -> str:
    """What the stored pixels depend on (see the module docstring), hashed; not the crop or the normalisation,
    which are applied on the device."""
    return record_key({"version": IMAGE_CACHE_VERSION, "files": file_list_digest(paths), "n": len(paths),
                       "resize": list(geometry.resize) if isinstance(geometry.resize, tuple) else geometry.resize,
                       "interpolation": geometry.interpolation.value, "mode": mode,
                       "pillow": PIL.__version__, "torchvision": torchvision.__version__})


def decode_resized(path: str, resize: Callable, mode: str) -> np.ndarray:
    """The PIL path's decode and resize of one image (ImageFiles.__getitem__ up to the crop), as (h, w, C) uint8."""
    array = np.asarray(resize(load_image(path, mode)))
    return array[:, :, None] if array.ndim == 2 else array


def build_entry(paths: Sequence[str], geometry: Geometry, mode: str, pixel_path: Path, shapes_path: Path,
                workers: int) -> np.ndarray:
    """Decode every image (a thread pool: PIL releases the GIL while decoding and resizing), write the pixels, then
    the shapes; returns the shapes."""
    shapes: list[tuple[int, ...]] = []
    decode = partial(decode_resized, resize=geometry.resize_op(), mode=mode)

    def write_pixels(file) -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(paths), BUILD_CHUNK):
                for array in pool.map(decode, paths[start:start + BUILD_CHUNK]):
                    file.write(np.ascontiguousarray(array).tobytes())
                    shapes.append(array.shape)

    atomic_write(pixel_path, write_pixels)
    stored = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
    atomic_write(shapes_path, lambda file: np.save(file, stored))
    return stored


def read_shapes(pixel_path: Path, shapes_path: Path, n: int) -> np.ndarray | None:
    """A complete entry's shapes, or None: absent, unreadable, or not matching the pixel file (a killed build)."""
    try:
        shapes = np.load(shapes_path)
        complete = (shapes.shape == (n, 3) and shapes.dtype == np.int64
                    and pixel_path.stat().st_size == int(shapes.prod(axis=1).sum()))
    except (OSError, ValueError):
        return None
    return shapes if complete else None


def load_or_build(files: ImageFiles, geometry: Geometry, cache_dir: Path, workers: int) -> tuple[CachedImages, bool]:
    """The entry of `files` at `geometry`'s resize, built on a miss; returns (dataset, hit)."""
    paths = [path for path, _ in files.samples]
    key = entry_key(paths, geometry, files.mode)
    pixel_path, shapes_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.npy"
    shapes = read_shapes(pixel_path, shapes_path, len(paths))
    hit = shapes is not None
    if not hit:
        shapes = build_entry(paths, geometry, files.mode, pixel_path, shapes_path, workers)
    check_crop_fits(shapes, geometry, paths)
    return CachedImages(pixel_path, shapes, [label for _, label in files.samples], paths), hit


def check_crop_fits(shapes: np.ndarray, geometry: Geometry, paths: Sequence[str]) -> None:
    """Every resized image holds the crop window (checked here, once, so the device never syncs to check it)."""
    if geometry.crop is None:
        return
    small = np.flatnonzero((shapes[:, 0] < geometry.crop[0]) | (shapes[:, 1] < geometry.crop[1]))
    if small.size:
        named = name_some([f"{paths[i]} ({shapes[i, 0]}x{shapes[i, 1]})" for i in small])
        raise DataError(f"{small.size} image(s) are smaller than the {geometry.crop} crop after the resize to "
                        f"{geometry.resize}: {named}. Run without IMAGE_CACHE (torchvision's crop then decides), or "
                        "drop them.")


def cached_dataset(dataset: Dataset, load: Callable[[ImageFiles], CachedImages]) -> Dataset:
    """`dataset` (ImageFiles, or Subsets and ConcatDatasets of them, as the datamodules build them) with each
    ImageFiles replaced by its cache entry: the same examples in the same order."""
    if isinstance(dataset, ImageFiles):
        return load(dataset)
    if isinstance(dataset, Subset):
        return Subset(cached_dataset(dataset.dataset, load), dataset.indices)
    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([cached_dataset(part, load) for part in dataset.datasets])
    raise TypeError(f"the image cache reads ImageFiles datasets (and Subsets / ConcatDatasets of them), got "
                    f"{type(dataset).__name__}.")


# --- the datamodule -------------------------------------------------------------------------------------------
class CachedImageDataModule(CachedDataModule):
    """`source`'s splits read from the image cache, with its batch sizes, workers and seeded shuffling; batches
    are cropped, flipped and normalised after they reach the device."""

    def __init__(self, source: ImageFilesDataModule, datasets: dict[str, Dataset], hits: dict[str, bool]):
        super().__init__(source, hits)
        self.datasets = datasets
        self.geometries = {True: source.geometry(train=True), False: source.geometry(train=False)}
        self._generator: torch.Generator | None = None

    def loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        return self.source._loader(self.datasets[split], batch_size, shuffle=train,
                                   collate_fn=partial(collate, train=train))

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        if not isinstance(batch, RawBatch):
            return batch
        if self._generator is None:  # the crop draws, seeded by the run seed and the process rank
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._generator = torch.Generator().manual_seed(self.source.seed * 1009 + rank)
        images = crop_and_normalise(batch.pixels, batch.sizes, self.geometries[batch.train], self.source.data_config,
                                    self._generator)
        return images, batch.labels


def image_cache_dir(results_dir: str | Path) -> Path:
    return results_path(results_dir, "cache", "images")


def cached_image_datamodule(datamodule: ImageFilesDataModule, cache_dir: str | Path,
                            workers: int | None = None) -> CachedImageDataModule:
    """`datamodule` (set up here if it is not) reading from the image cache in `cache_dir`, each entry built on a
    miss with `workers` decoding threads (default: every core)."""
    if not isinstance(datamodule, ImageFilesDataModule):
        raise ValueError(f"the image cache stores decoded image files; {datamodule.name!r} is not an image-file "
                         "dataset. Run without IMAGE_CACHE.")
    datamodule.setup()
    cache_dir = Path(cache_dir)
    workers = workers or os.cpu_count() or 1
    datasets, hits = {}, {}
    for split, dataset, train in (("train", datamodule.train_set, True),
                                  ("val", datamodule.splits["val"].dataset, False),
                                  ("test", datamodule.splits["test"].dataset, False)):
        found: list[bool] = []  # an entry another split built (FGVC's train split and training pool) is a hit

        def load(files: ImageFiles, train: bool = train, found: list[bool] = found) -> CachedImages:
            cached, hit = load_or_build(files, datamodule.geometry(train), cache_dir, workers)
            found.append(hit)
            return cached

        datasets[split] = cached_dataset(dataset, load)
        hits[split] = all(found)
    print("image cache: " + ", ".join(f"{split} {'hit' if hit else 'built'}" for split, hit in hits.items())
          + f" ({cache_dir})")
    return CachedImageDataModule(datamodule, datasets, hits)
