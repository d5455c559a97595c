"""Rules of the datamodules that decide a number, with expectations by hand: the val carve (10% per class, seed
fixed, singletons kept in train), the transforms' normalisation, label ranges, VTAB's task table, the embedded
tasks' pools."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import create_datamodule
from datamodules.checks import DataError
from datamodules.embedded import FashionHeldoutDataModule, FashionPretrainDataModule, to_model_input
from datamodules.files import carve_val, fgvc_transform, resize_transform
from datamodules.vtab import VTAB_TASKS, read_list

RGB_CONFIG = {"input_size": (3, 16, 16), "mean": (0.2, 0.4, 0.6), "std": (0.5, 0.25, 0.1),
              "interpolation": "bilinear"}


# --- the val carve -----------------------------------------------------------------------------------------
CARVE_SIZES = [10, 20, 5, 1, 15, 2]  # per class; class 3 is a singleton
# 10% rounded half up, at least one: 1.0 -> 1, 2.0 -> 2, 0.5 -> 1, (singleton: stays in train), 1.5 -> 2, 0.2 -> 1
CARVE_COUNTS = [1, 2, 1, 0, 2, 1]


def test_carve_val_takes_ten_percent_of_each_class_and_keeps_singletons_in_train():
    labels = np.repeat(np.arange(6), CARVE_SIZES)
    mask = carve_val(labels)
    assert mask.dtype == bool and mask.shape == labels.shape
    assert np.bincount(labels[mask], minlength=6).tolist() == CARVE_COUNTS
    assert np.bincount(labels[~mask], minlength=6).tolist() == [9, 18, 4, 1, 13, 1]  # every class still trains
    # pinned: the carve's seed is fixed (0) and its draw is the suite's split function
    assert np.flatnonzero(mask).tolist() == [4, 10, 20, 34, 36, 45, 52]


def test_carve_val_ignores_the_order_of_other_classes():
    """A class's carve depends on its own members only: shuffling which positions belong to the other classes
    leaves the chosen members' ranks within their class unchanged."""
    labels = np.repeat(np.arange(6), CARVE_SIZES)
    mask = carve_val(labels)
    ranks = {c: sorted(np.flatnonzero(mask[labels == c]).tolist()) for c in range(6)}
    shuffled = np.concatenate([labels[labels == c] for c in (5, 4, 3, 2, 1, 0)])
    shuffled_mask = carve_val(shuffled)
    assert {c: sorted(np.flatnonzero(shuffled_mask[shuffled == c]).tolist()) for c in range(6)} == ranks


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value % 256, dtype=np.uint8)).save(path)


def make_folder_without_val(root: Path) -> Path:
    for name, count in zip(("ant", "bee", "cat"), (10, 20, 1), strict=True):
        for i in range(count):
            write_png(root / "train" / name / f"{i:02d}.png", 7 * i)
    write_png(root / "test" / "ant" / "t.png", 1)
    return root


def test_folder_carve_is_independent_of_the_run_seed(tmp_path):
    """DATASET=folder without val/: the val carve is the same for run seeds 0 and 7 (else val would leak into
    train across seeds), 10% stratified, the singleton class kept in train; only the train subset moves."""
    root = make_folder_without_val(tmp_path)
    config = {**RGB_CONFIG, "input_size": (3, 8, 8)}
    first = create_datamodule("folder", data_config=config, data_root=str(root), seed=0, train_fraction=0.5)
    other = create_datamodule("folder", data_config=config, data_root=str(root), seed=7, train_fraction=0.5)
    first.setup()
    other.setup()
    assert first.splits["val"].ids == other.splits["val"].ids
    assert first.splits["train"].ids == other.splits["train"].ids
    assert np.bincount(first.splits["val"].labels, minlength=3).tolist() == [1, 2, 0]
    assert np.bincount(first.splits["train"].labels, minlength=3).tolist() == [9, 18, 1]
    assert not set(first.splits["val"].ids) & set(first.splits["train"].ids)
    assert first.train_ids != other.train_ids  # the run seed still draws the training subset
    assert np.bincount(first.train_labels).tolist() == [5, 9, 1]  # 4.5 -> 5, 9.0 -> 9, 0.5 -> 1


# --- transforms: the backbone's mean and std, by hand on a constant image ------------------------------------
@pytest.mark.parametrize("make", [lambda c: fgvc_transform(c, train=False), lambda c: fgvc_transform(c, train=True),
                                  resize_transform])
def test_transforms_normalise_with_the_backbones_mean_and_std(make):
    colour = (51, 153, 255)  # 0.2, 0.6, 1.0 after ToTensor
    image = Image.new("RGB", (20, 26), colour)
    out = make(RGB_CONFIG)(image)
    assert out.shape == (3, 16, 16)
    expected = [(0.2 - 0.2) / 0.5, (0.6 - 0.4) / 0.25, (1.0 - 0.6) / 0.1]  # 0.0, 0.8, 4.0
    for channel, value in enumerate(expected):
        torch.testing.assert_close(out[channel], torch.full((16, 16), value), atol=1e-5, rtol=0)


def test_grey_backbones_read_images_in_mode_l(tmp_path):
    root = make_folder_without_val(tmp_path)
    grey = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "interpolation": "bilinear"}
    dm = create_datamodule("folder", data_config=grey, data_root=str(root))
    dm.setup()
    assert dm.image_mode == "L" and dm.splits["test"].dataset.mode == "L"
    image, _ = dm.splits["test"].dataset[0]  # value 1 in every channel -> 1/255 grey
    torch.testing.assert_close(image, torch.full((1, 8, 8), (1 / 255 - 0.5) / 0.5), atol=1e-5, rtol=0)


def test_embedded_inputs_scale_by_255_then_normalise():
    images = np.stack([np.full((4, 4), 255, np.uint8), np.full((4, 4), 51, np.uint8)])
    out = to_model_input(images, {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    assert out.shape == (2, 3, 8, 8)  # resized, grey repeated over the backbone's channels
    torch.testing.assert_close(out[0], torch.full((3, 8, 8), (1.0 - 0.5) / 0.25))  # 2.0
    torch.testing.assert_close(out[1], torch.full((3, 8, 8), (0.2 - 0.5) / 0.25))  # -1.2


# --- VTAB ----------------------------------------------------------------------------------------------------
# VTAB-1k's 19 tasks as VPT's Table 1 lists them: (group, classes).
VTAB_TABLE = {
    "cifar": ("natural", 100), "caltech101": ("natural", 102), "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102), "oxford_iiit_pet": ("natural", 37), "svhn": ("natural", 10),
    "sun397": ("natural", 397), "patch_camelyon": ("specialized", 2), "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45), "diabetic_retinopathy": ("specialized", 5), "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6), "dmlab": ("structured", 6), "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16), "dsprites_ori": ("structured", 16), "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}


def test_vtab_task_table():
    assert {task: (spec.group, spec.num_classes) for task, spec in VTAB_TASKS.items()} == VTAB_TABLE


def test_vtab_label_equal_to_the_class_count_is_out_of_range(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("a b.png 0\nc.png 3\n")
    paths, labels = read_list(path, num_classes=4)
    assert paths == ["a b.png", "c.png"] and labels.tolist() == [0, 3]
    path.write_text("a.png 4\n")
    with pytest.raises(DataError, match=r"label 4 is outside 0..3"):
        read_list(path, num_classes=4)
    path.write_text("a.png -1\n")
    with pytest.raises(DataError, match=r"label -1 is outside 0..3"):
        read_list(path, num_classes=4)


# --- the embedded Fashion-MNIST tasks, on a synthetic IDX release ---------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """Each image is filled with its raw class id * 20, so a label can be checked against its pixels."""
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10), per_class)  # interleaved, as in the real files
        images = np.repeat((labels * 20)[:, None, None], 28, axis=1).repeat(28, axis=2)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_fashion_heldout_pools_and_labels(tmp_path):
    """Held-out classes 4-7 (coat, sandal, shirt, sneaker) become labels 0-3; train 400 and val 100 per class come
    from Fashion-MNIST's train file, disjoint; test is all of t10k's images of those classes."""
    root = fake_fashion_mnist(tmp_path / "fmnist", train_per_class=505, test_per_class=3)
    config = {"input_size": (1, 28, 28), "mean": (0.0,), "std": (1.0,)}
    dm = FashionHeldoutDataModule(data_config=config, data_root=str(root), train_fraction=1.0)
    dm.setup()
    sizes = {s: np.bincount(d.labels, minlength=4).tolist() for s, d in dm.splits.items()}
    assert sizes == {"train": [400] * 4, "val": [100] * 4, "test": [3] * 4} and dm.num_classes == 4
    for split in dm.splits.values():
        pixels, labels = split.dataset.tensors
        raw = torch.round(pixels[:, 0, 0, 0] * 255 / 20).long()  # the raw class id each image was filled with
        assert torch.equal(raw, labels + 4)

    pretrain = FashionPretrainDataModule(data_config=config, data_root=str(fake_fashion_mnist(
        tmp_path / "fmnist2", train_per_class=2, test_per_class=502)), train_fraction=1.0)
    pretrain.setup()
    assert pretrain.num_classes == 6
    assert {s: np.bincount(d.labels, minlength=6).tolist() for s, d in pretrain.splits.items()} == {
        "train": [2] * 6, "val": [500] * 6, "test": [2] * 6}
    raw = torch.round(pretrain.splits["train"].dataset.tensors[0][:, 0, 0, 0] * 255 / 20).long()
    assert torch.equal(raw, torch.as_tensor([0, 1, 2, 3, 8, 9])[pretrain.splits["train"].dataset.tensors[1]])


def test_only_the_training_split_is_augmented(tmp_path):
    """FGVC transform: val and test get resize + center crop (deterministic), train gets random crop and flip."""
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        for i in range(2):
            write_png(root / split / "ant" / f"{i}.png", 40 * i)
    dm = create_datamodule("folder", data_config={**RGB_CONFIG, "input_size": (3, 8, 8)}, data_root=str(root))
    dm.setup()
    kinds = {split: [type(t).__name__ for t in data.dataset.transform.transforms] for split, data in dm.splits.items()}
    assert kinds["train"] == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert kinds["val"] == kinds["test"] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
