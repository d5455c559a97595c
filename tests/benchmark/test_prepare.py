"""`make prepare` converters on tiny fake releases of each FGVC dataset, and `make splits` fraction files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from benchmark.prepare import main as prepare_main
from benchmark.prepare import prepare
from benchmark.splits import main as splits_main
from benchmark.splits import parse_fractions, write_fraction_files
from datamodules import create_datamodule, fraction_indices
from datamodules.checks import DataError

pytestmark = pytest.mark.filterwarnings("ignore:DATASET=.*train.json has:UserWarning")
DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color=(len(path.name) * 9 % 256, 40, 90)).save(path)


def text(path: Path, rows) -> None:
    path.write_text("".join(f"{a} {b}\n" for a, b in rows))


def fake_caltech_birds(raw: Path, classes=(1, 2, 3), train=10, test=4, top="CUB_200_2011") -> Path:
    """CUB-200-2011 / NABirds: images.txt, image_class_labels.txt, train_test_split.txt, images/."""
    root = raw / top
    rows = []
    for c in classes:
        for i in range(train + test):
            rows.append((f"id{c}_{i}", f"{c:03d}.Bird/img_{i}.jpg", c, int(i < train)))
    for _, path, _, _ in rows:
        write_image(root / "images" / path)
    text(root / "images.txt", [(r[0], r[1]) for r in rows])
    text(root / "image_class_labels.txt", [(r[0], r[2]) for r in rows])
    text(root / "train_test_split.txt", [(r[0], r[3]) for r in rows])
    return root


def fake_flowers(raw: Path) -> Path:
    labels = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3, 1, 2, 3], dtype=np.uint8)
    for i in range(1, len(labels) + 1):
        write_image(raw / "jpg" / f"image_{i:05d}.jpg")
    savemat(raw / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(raw / "setid.mat", {"trnid": np.array([[1, 4, 7, 10, 11, 12]]), "valid": np.array([[2, 5, 8]]),
                                "tstid": np.array([[3, 6, 9]])})
    return raw


def fake_dogs(raw: Path, per_class=10) -> Path:
    for split, count in (("train", per_class), ("test", 3)):
        files = [f"n0{c}-Breed{c}/n0{c}_{split}{i}.jpg" for c in (1, 2, 3) for i in range(count)]
        for f in files:
            write_image(raw / "Images" / f)
        cell = np.empty((len(files), 1), dtype=object)
        for i, f in enumerate(files):
            cell[i, 0] = np.array([f])
        savemat(raw / f"{split}_list.mat", {"file_list": cell, "labels": np.repeat([1, 2, 3], count)[:, None]})
    return raw


def car_struct(names, classes=None):
    fields = [("fname", object)] + ([("class", object)] if classes is not None else [])
    annotations = np.zeros((1, len(names)), dtype=fields)
    for i, name in enumerate(names):
        annotations[0, i]["fname"] = name
        if classes is not None:
            annotations[0, i]["class"] = np.array([[classes[i]]], dtype=np.uint8)
    return {"annotations": annotations}


def fake_cars(raw: Path, test_labels=True) -> Path:
    train = [f"{i:05d}.jpg" for i in range(1, 31)]
    test = [f"{i:05d}.jpg" for i in range(1, 7)]
    for name in train:
        write_image(raw / "cars_train" / name)
    for name in test:
        write_image(raw / "cars_test" / name)
    (raw / "devkit").mkdir(parents=True)
    savemat(raw / "devkit" / "cars_train_annos.mat", car_struct(train, [i % 3 + 1 for i in range(30)]))
    if test_labels:
        savemat(raw / "cars_test_annos_withlabels.mat", car_struct(test, [i % 3 + 1 for i in range(6)]))
    else:
        savemat(raw / "devkit" / "cars_test_annos.mat", car_struct(test))
    return raw


def split(root: Path, name: str) -> dict:
    return json.loads((root / f"{name}.json").read_text())


def loads(dataset: str, root: Path):
    dm = create_datamodule(dataset, data_config=DATA_CONFIG, data_root=str(root), train_fraction=1.0)
    dm.setup()
    return dm


@pytest.mark.parametrize("dataset, top", [("cub", "CUB_200_2011"), ("nabirds", "nabirds")])
def test_caltech_birds(tmp_path, dataset, top):
    classes = (1, 2, 3) if dataset == "cub" else (295, 313, 1010)  # NABirds ids are not contiguous
    fake_caltech_birds(tmp_path, classes, top=top)
    root = prepare(dataset, tmp_path)  # RAW may be the folder above the release's top folder
    assert root == tmp_path / top
    train, val, test = split(root, "train"), split(root, "val"), split(root, "test")
    assert (len(train), len(val), len(test)) == (27, 3, 12)
    assert sorted(val.values()) == list(classes)  # 10% of each class's 10 train images: stratified
    assert not set(val) & set(train) and all(not k.startswith("images/") for k in train)
    dm = loads(dataset, root)
    assert dm.num_classes == 3 and sorted(set(dm.splits["test"].labels.tolist())) == [0, 1, 2]
    assert Path(dm.splits["train"].dataset.samples[0][0]).is_file()


def test_val_carve_is_seeded(tmp_path):
    fake_caltech_birds(tmp_path / "raw", train=20)
    prepare("cub", tmp_path / "raw", tmp_path / "seed0")
    prepare("cub", tmp_path / "raw", tmp_path / "seed0b")
    prepare("cub", tmp_path / "raw", tmp_path / "seed1", seed=1)
    assert split(tmp_path / "seed0", "val") == split(tmp_path / "seed0b", "val")
    assert split(tmp_path / "seed0", "val") != split(tmp_path / "seed1", "val")


def test_flowers_keeps_the_official_val(tmp_path):
    root = prepare("flowers", fake_flowers(tmp_path))
    assert split(root, "val") == {"jpg/image_00002.jpg": 1, "jpg/image_00005.jpg": 2, "jpg/image_00008.jpg": 3}
    assert len(split(root, "train")) == 6 and split(root, "test")["jpg/image_00009.jpg"] == 3
    assert loads("flowers", root).num_classes == 3


def test_dogs(tmp_path):
    root = prepare("dogs", fake_dogs(tmp_path))
    train, val, test = split(root, "train"), split(root, "val"), split(root, "test")
    assert (len(train), len(val), len(test)) == (27, 3, 9)
    assert test["n01-Breed1/n01_test0.jpg"] == 1
    assert loads("dogs", root).splits["val"].dataset.samples[0][0].startswith(str(root / "Images"))


def test_cars_devkit(tmp_path):
    root = prepare("cars", fake_cars(tmp_path))
    train, val, test = split(root, "train"), split(root, "val"), split(root, "test")
    assert (len(train), len(val), len(test)) == (27, 3, 6)
    assert train["cars_train/00001.jpg"] == 1 and test["cars_test/00002.jpg"] == 2
    assert loads("cars", root).num_classes == 3


def test_cars_test_annotations_without_labels_say_what_to_download(tmp_path):
    with pytest.raises(DataError, match="cars_test_annos_withlabels.mat"):
        prepare("cars", fake_cars(tmp_path, test_labels=False))


def test_output_elsewhere_links_the_images(tmp_path):
    fake_caltech_birds(tmp_path / "raw")
    out = prepare("cub", tmp_path / "raw", tmp_path / "prepared")
    assert (out / "images").is_symlink() and not (tmp_path / "raw" / "CUB_200_2011" / "train.json").exists()
    assert loads("cub", out).n_train == 27


def test_existing_files_that_differ_are_kept_unless_forced(tmp_path, capsys):
    root = fake_caltech_birds(tmp_path)
    prepare("cub", root)
    (root / "val.json").write_text("{}")
    assert prepare_main(["--dataset", "cub", "--raw", str(root)]) == 2
    assert "already has val.json with other contents" in capsys.readouterr().err
    assert prepare_main(["--dataset", "cub", "--raw", str(root), "--force"]) == 0
    assert len(split(root, "val")) == 3


def test_missing_images_and_files_are_named(tmp_path, capsys):
    root = fake_caltech_birds(tmp_path)
    (root / "images" / "001.Bird" / "img_0.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) named by the release do not exist: .*img_0.jpg"):
        prepare("cub", root)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="lacks train_test_split.txt"):
        prepare("cub", root)
    assert prepare_main(["--dataset", "dogs", "--raw", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --- make splits -------------------------------------------------------------------------------------
def test_splits_writes_the_suites_nested_split(tmp_path):
    root = prepare("cub", fake_caltech_birds(tmp_path, train=30))
    paths = write_fraction_files("cub", root)
    assert [p.name for p in paths] == ["train_0.1.json", "train_0.2.json", "train_0.4.json", "train_0.8.json"]
    subsets = [split(root, p.stem) for p in paths]
    assert all(set(a) <= set(b) for a, b in zip(subsets, subsets[1:], strict=False))  # nested
    assert all(set(s) <= set(split(root, "train")) for s in subsets)
    for fraction in (0.1, 0.4):  # what a run at that fraction trains on, with or without the file
        without = loads("cub", root)
        pool = without.splits["train"]
        expected = {pool.ids[i] for i in fraction_indices(pool.labels, fraction, 0)}
        with_file = create_datamodule("cub", data_config=DATA_CONFIG, data_root=str(root), train_fraction=fraction)
        with_file.setup()
        assert set(with_file.train_ids) == expected == set(split(root, f"train_{fraction:g}"))
        assert with_file.split_record()["split_source"] == f"train_{fraction:g}.json"


def test_splits_cli_fractions_and_protection(tmp_path, capsys):
    root = prepare("cub", fake_caltech_birds(tmp_path))
    assert splits_main(["--dataset", "cub", "--data-root", str(root), "--fractions", "0.5,", "0.3"]) == 0
    assert sorted(p.name for p in root.glob("train_*.json")) == ["train_0.3.json", "train_0.5.json"]
    assert splits_main(["--dataset", "cub", "--data-root", str(root), "--fractions", "0.5"]) == 0  # unchanged: ok
    (root / "train_0.5.json").write_text("{}")
    assert splits_main(["--dataset", "cub", "--data-root", str(root), "--fractions", "0.5"]) == 2
    assert "already has train_0.5.json" in capsys.readouterr().err
    assert splits_main(["--dataset", "vtab/dtd", "--data-root", str(root)]) == 2
    with pytest.raises(DataError, match=r"must be in \(0, 1\)"):
        parse_fractions(["1.0"])


def test_val_carve_follows_the_sorted_ids_not_the_release_order(tmp_path):
    """The carve draws from the train images sorted by path: a release listing the same images in another order
    gives the same val.json. 10% of each class's 20 train images: 2 per class."""
    fake_caltech_birds(tmp_path / "raw", train=20)
    prepare("cub", tmp_path / "raw", tmp_path / "forward")
    top = tmp_path / "raw" / "CUB_200_2011"
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        lines = (top / name).read_text().splitlines()
        (top / name).write_text("\n".join(reversed(lines)) + "\n")
    prepare("cub", tmp_path / "raw", tmp_path / "reversed")
    val = split(tmp_path / "forward", "val")
    assert val == split(tmp_path / "reversed", "val")
    assert sorted(val.values()) == [1, 1, 2, 2, 3, 3]
    assert split(tmp_path / "forward", "train") == split(tmp_path / "reversed", "train")


def test_fraction_files_follow_the_seed_and_count_per_class(tmp_path):
    """`make splits SEED=3`: the files hold the examples a run at seed 3 would train on without them; 30 train images
    per class minus the 3 carved to val leave 27: 0.1 -> 2.7 -> 3, 0.4 -> 10.8 -> 11 per class."""
    root = prepare("cub", fake_caltech_birds(tmp_path, train=30))
    write_fraction_files("cub", root, [0.1, 0.4], seed=3)
    pool = loads("cub", root).splits["train"]
    for fraction, per_class in ((0.1, 3), (0.4, 11)):
        written = split(root, f"train_{fraction:g}")
        assert set(written) == {pool.ids[i] for i in fraction_indices(pool.labels, fraction, 3)}
        assert sorted(written.values()) == sorted([1, 2, 3] * per_class)
    assert set(split(root, "train_0.1")) != {pool.ids[i] for i in fraction_indices(pool.labels, 0.1, 0)}
