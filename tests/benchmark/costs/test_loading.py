"""The loader benchmark's parts: the generated JPEG folder is FGVC-like and reproducible, the loaders are timed in
alternating order, and the summary's medians and ratios are the rows'. No speed thresholds."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from benchmark.costs.loading import FIXTURE_SIZE, loader_benchmark, loader_summary, write_jpeg_folder
from datamodules import create_datamodule

TINY_CONFIG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}


def test_jpeg_folder_is_an_fgvc_like_folder_dataset(tmp_path):
    root = write_jpeg_folder(tmp_path / "a", n_train=8, n_eval=4, classes=2)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 16 and {p.parent.parent.name for p in files} == {"train", "val", "test"}
    sizes = [Image.open(p).size for p in sorted((root / "train").rglob("*.jpg"), key=lambda p: p.name)]
    width, height = FIXTURE_SIZE
    portrait = [w < h for w, h in sizes]
    assert portrait == [i % 4 == 3 for i in range(8)]  # every fourth image is portrait
    for (w, h), tall in zip(sizes, portrait, strict=True):
        long, short = (h, w) if tall else (w, h)
        assert 0.9 * width - 1 <= long <= 1.1 * width + 1 and 0.9 * height - 1 <= short <= 1.1 * height + 1
    again = write_jpeg_folder(tmp_path / "b", n_train=8, n_eval=4, classes=2)
    assert all(p.read_bytes() == (again / p.relative_to(root)).read_bytes() for p in files)  # seeded per image
    dm = create_datamodule("folder", data_config=TINY_CONFIG, data_root=str(root))
    dm.setup()
    assert dm.num_classes == 2 and len(dm.splits["test"].labels) == 4


def test_loaders_alternate_and_the_summary_is_the_rows_medians(tmp_path):
    root = write_jpeg_folder(tmp_path / "jpeg", n_train=6, n_eval=2, classes=2, size=(40, 30))
    rows = loader_benchmark(root, tmp_path / "cache", workers=0, batch_size=4, repeats=3, data_config=TINY_CONFIG,
                            min_seconds=0.0, loaders=("pil", "cache", "cache_loader_only"))
    assert rows["loader"].tolist() == ["pil", "cache", "cache_loader_only", "cache_loader_only", "cache", "pil",
                                       "pil", "cache", "cache_loader_only"]
    assert (rows["img_per_s"] > 0).all() and (rows["images_timed"] % 6 == 0).all()
    made = pd.DataFrame({"repeat": [0, 0, 1, 1, 2, 2], "loader": ["pil", "cache"] * 3,
                         "img_per_s": [10.0, 50.0, 30.0, 40.0, 20.0, 90.0]})
    assert loader_summary(made) == {"pil_img_per_s": 20.0, "cache_img_per_s": 50.0, "cache_ratio": 2.5, "repeats": 3}
