"""What the input pipeline delivers: training-loader images/s of an image-file dataset, the PIL path against the
decoded-image cache (benchmark/core/images.py), on a generated FGVC-like JPEG folder.

    python -m benchmark.perf --loader-benchmark [--workers 2 --repeats 5]     # make perf LOADER_BENCHMARK=1

Both loaders are timed the same way: the datamodule's own training loader (same batch size, workers and
shuffling), each batch moved to the device as Lightning moves it, and for the cache its on-device crop, flip and
normalisation (`on_after_batch_transfer`) included, so both deliver the model's float inputs on the device.
`cache_loader_only` stops at the transfer: the cache's uint8 batches as a GPU receives them, which on a CPU-only
machine separates the loader from the transform the CPU then does as the device. A warm-up epoch first (worker
start-up, the files in the page cache), then whole epochs until `min_seconds`.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image

from benchmark.core.images import cached_image_datamodule
from datamodules import create_datamodule

FIXTURE_SIZE = (500, 375)  # (width, height): about the median FGVC photo (CUB, NABirds, Dogs)
LOADER_BACKBONE = "vit_base_patch16_224"  # 224 px input, bicubic: the loader of a ViT-B/16 run


def write_jpeg_folder(root: str | Path, n_train: int = 512, n_eval: int = 64, classes: int = 8,
                      size: tuple[int, int] = FIXTURE_SIZE, seed: int = 0, quality: int = 90) -> Path:
    """A `DATASET=folder` layout (train/, val/, test/ of <class>/<image>.jpg) of photo-like JPEGs: smooth colour
    fields with a little noise, so file sizes and decode cost are a photo's rather than white noise's. A quarter are
    portrait, and sizes vary by up to 10%, as in FGVC. Each image is seeded by its index (written by a thread pool:
    PIL releases the GIL while encoding), so the folder is the same whatever the machine."""
    root = Path(root)
    jobs = [(split, i) for split, count in (("train", n_train), ("val", n_eval), ("test", n_eval))
            for i in range(count)]

    def write(job: tuple[str, int]) -> None:
        split, i = job
        rng = np.random.default_rng([seed, i, ("train", "val", "test").index(split)])
        width, height = (round(side * rng.uniform(0.9, 1.1)) for side in size)
        if i % 4 == 3:
            width, height = height, width
        coarse = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((width, height),
                                                                                         Image.BICUBIC)
        noise = rng.integers(-8, 9, (height, width, 3), dtype=np.int16)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        path = root / split / f"class_{i % classes}" / f"{split}_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=quality)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, jobs))
    return root


def loader_data_config(backbone: str = LOADER_BACKBONE, **backbone_kwargs) -> dict:
    """The backbone's data config (input size, mean, std, interpolation) without building its weights."""
    from backbones import create_backbone, data_config

    with torch.device("meta"):
        return data_config(create_backbone(backbone, pretrained=False, **backbone_kwargs))


def images_per_s(datamodule, device: torch.device, min_seconds: float, transform: bool = True) -> tuple[float, int]:
    """(images/s, images timed) of `datamodule`'s training loader delivered to `device` (see the module docstring);
    `transform=False` stops at the transfer (the cache's uint8 batches, before the on-device crop)."""
    loader = datamodule.train_dataloader()

    def epoch() -> int:
        seen = 0
        for batch in loader:
            batch = move_data_to_device(batch, device)
            if transform:
                batch = datamodule.on_after_batch_transfer(batch, 0)
            seen += len(batch[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return seen

    epoch()
    seen, start = 0, time.perf_counter()
    while seen == 0 or time.perf_counter() - start < min_seconds:
        seen += epoch()
    return seen / (time.perf_counter() - start), seen


LOADERS = ("pil", "cache", "cache_loader_only")  # the last: the cache's batches up to the transfer, not cropped


def loader_benchmark(root: str | Path, cache_dir: str | Path, *, workers: int, batch_size: int, repeats: int,
                     device: torch.device | str = "cpu", data_config: dict | None = None,
                     min_seconds: float = 2.0, loaders: tuple[str, ...] = LOADERS[:2]) -> pd.DataFrame:
    """One row per (repeat, loader): the `loaders` timed in turn, their order reversed every other repeat so a change
    of load on a shared machine hits all of them. The cache is built (timed as `build_s`) before the first repeat."""
    device = torch.device(device)
    data_config = data_config or loader_data_config()
    source = create_datamodule("folder", data_config=data_config, data_root=str(root), train_fraction=1.0,
                               batch_size=batch_size, num_workers=workers)
    source.setup()
    start = time.perf_counter()
    cached = cached_image_datamodule(source, cache_dir, workers=max(workers, 1))
    build_s = time.perf_counter() - start
    rows = []
    for repeat in range(repeats):
        for name in loaders if repeat % 2 == 0 else loaders[::-1]:
            datamodule = source if name == "pil" else cached
            rate, seen = images_per_s(datamodule, device, min_seconds, transform=name != "cache_loader_only")
            rows.append({"repeat": repeat, "loader": name, "img_per_s": rate, "images_timed": seen,
                         "workers": workers, "batch_size": batch_size, "n_train": source.n_train,
                         "input_size": "x".join(map(str, data_config["input_size"][1:])),
                         "build_s": build_s if name != "pil" else float("nan"), "device": str(device)})
            print(f"  [{repeat + 1}/{repeats}] {name:17s} {rate:9,.0f} img/s ({seen} images)", flush=True)
    return pd.DataFrame(rows)


def loader_summary(rows: pd.DataFrame) -> dict:
    """Median images/s of each loader over the repeats and each one's ratio to the PIL path's."""
    medians = {name: statistics.median(group["img_per_s"]) for name, group in rows.groupby("loader", sort=False)}
    return ({f"{name}_img_per_s": rate for name, rate in medians.items()}
            | {f"{name}_ratio": rate / medians["pil"] for name, rate in medians.items() if name != "pil"}
            | {"repeats": int(rows["repeat"].nunique())})
