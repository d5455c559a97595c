"""The decoded-image cache (IMAGE_CACHE=1): evaluation inputs equal to the PIL path's bit for bit, training crops and
flips with the PIL path's distribution, entries keyed on what they depend on, builds that cannot be read half-done,
and runs through the pipeline."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from benchmark.core import images as cache
from benchmark.core.config import RunConfig
from benchmark.core.distributed import ProcessShardedData
from benchmark.core.errors import ConfigError
from benchmark.core.images import RawBatch, cached_image_datamodule, entry_key, image_cache_dir
from benchmark.core.pipeline import run
from benchmark.core.validate import validate_config
from datamodules import create_datamodule
from datamodules.checks import DataError
from datamodules.files import Geometry, crop_and_normalise, fgvc_geometry
from tests.helpers.data import make_fgvc, make_vtab
from tests.helpers.models import TINY_VIT
from tests.helpers.runs import record_tested_model

pytestmark = pytest.mark.filterwarnings("ignore:DATASET=.*train.json has 3 classes:UserWarning")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # not 0.5: a swapped mean/std would show
CONFIG = {"input_size": (3, 32, 32), "mean": MEAN, "std": STD, "interpolation": "bicubic"}


def write_sized_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    paths = []
    for i, (height, width) in enumerate(sizes):
        path = folder / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed + i).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def make_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """DATASET=folder with the same images in train/, val/ and test/ of two classes."""
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            write_sized_images(root / split / label, sizes, seed=len(label) * 100)
    return root


# Heights 40 and 37 resize (bicubic, shorter side 37) to widths whose room for a 32 px window is 5..12 and 0: the
# centre offset (room / 2) lands on .5 for odd rooms, where half-to-even rounding (2.5 -> 2, 3.5 -> 4) differs
# from floor and from rounding half up; portrait images put the room in the other axis.
SIZES = [(40, w) for w in range(40, 50)] + [(37, 37), (37, 41), (48, 40), (55, 40)]


def delivered(datamodule, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [datamodule.on_after_batch_transfer(move_data_to_device(batch, "cpu"), 0) for batch in loader]


@pytest.mark.parametrize("family", ["folder", "vtab", "grey"])
def test_evaluation_inputs_equal_the_pil_paths(tmp_path, family):
    """Exactly equal, not within 1/255: the cache stores the PIL path's own resize (the same torchvision Resize on the
    same PIL image), and the tensor side does the PIL path's centre crop offsets and ToTensor + Normalize's float32
    operations in their order. Through one loader worker, so the memory map is reopened there."""
    root = make_folder(tmp_path / "data", SIZES)
    config = CONFIG
    if family == "vtab":
        root = make_vtab(tmp_path / "vtab")
    if family == "grey":
        config = {**CONFIG, "input_size": (1, 32, 32), "mean": (0.45,), "std": (0.27,)}
    name = "vtab/kitti" if family == "vtab" else "folder"
    source = create_datamodule(name, data_config=config, data_root=str(root), batch_size=5, eval_batch_size=7,
                               num_workers=1)
    source.setup()
    cached = cached_image_datamodule(source, tmp_path / "cache")
    for split in ("val_dataloader", "test_dataloader"):
        expected = list(getattr(source, split)())
        got = delivered(cached, getattr(cached, split)())
        assert len(got) == len(expected)
        for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
            assert images.dtype == torch.float32 and images.shape == want_images.shape
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    if family == "folder":  # the sizes did give odd rooms of both .5 parities (checked with PIL by hand)
        rooms = {T.Resize(37)(Image.new("RGB", (w, h))).size[0] - 32 for h, w in SIZES if h < w}
        assert {5, 7} <= rooms


def test_training_batches_are_valid_pil_path_inputs(tmp_path):
    """Every training image the cache delivers is one of the PIL path's possible outputs for the example at its place
    in the shuffled order (some window of its resized image, flipped or not), with its label: the cached loader
    shuffles as the PIL loader does."""
    root = make_folder(tmp_path / "data", SIZES[:6])
    source = create_datamodule("folder", data_config=CONFIG, data_root=str(root), train_fraction=1.0, batch_size=4)
    source.setup()
    cached = cached_image_datamodule(source, tmp_path / "cache")
    pool = source.train_set
    # the order the suite's loader draws for this seed, read off a loader of indices built the same way
    order = [int(i) for batch in source._loader(list(range(len(pool))), 4, shuffle=True) for i in batch]
    pil_labels = torch.cat([labels for _, labels in source.train_dataloader()])
    batches = delivered(cached, cached.train_dataloader())
    assert torch.equal(torch.cat([labels for _, labels in batches]), pil_labels)
    assert pil_labels.tolist() == [pool[i][1] for i in order]
    images = [image for batch, _ in batches for image in batch]
    assert len(images) == len(order) == len(pool)
    for image, index in zip(images, order, strict=True):
        assert image_in(image, candidates(pool.dataset.samples[pool.indices[index]][0]))


def candidates(path, crop: int = 32, resize: int = 37) -> dict[bytes, tuple[int, int, bool]]:
    """Every output the PIL training path can give for the image at `path`, keyed by its bytes: torchvision's own
    Resize, crop, flip, ToTensor and Normalize at each offset."""
    resized = T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC)(Image.open(path).convert("RGB"))
    finish = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    width, height = resized.size
    found = {}
    for top in range(height - crop + 1):
        for left in range(width - crop + 1):
            window = resized.crop((left, top, left + crop, top + crop))
            for flip in (False, True):
                image = window.transpose(Image.FLIP_LEFT_RIGHT) if flip else window
                found[finish(image).numpy().tobytes()] = (top, left, flip)
    return found


def image_in(image: torch.Tensor, outputs: dict) -> bool:
    return image.numpy().tobytes() in outputs


# --- training augmentation: the PIL path's distribution ---------------------------------------------------------
DRAWS = 3000


def windows_drawn(path: Path, draws: int) -> dict[str, np.ndarray]:
    """(top, left, flip) of `draws` training outputs for one image, from the PIL path (torchvision, seeded) and from
    the cache's crop (its generator, seeded), each identified exactly among all possible outputs."""
    outputs = candidates(path)
    geometry = fgvc_geometry(CONFIG, train=True)
    torch.manual_seed(0)
    pil = [outputs[T.Compose([geometry.resize_op(), *geometry.crop_ops(), T.ToTensor(), T.Normalize(MEAN, STD)])(
        Image.open(path).convert("RGB")).numpy().tobytes()] for _ in range(draws)]
    resized = np.asarray(geometry.resize_op()(Image.open(path).convert("RGB")))
    pixels = torch.from_numpy(resized.copy())[None].expand(draws, *resized.shape)
    sizes = np.tile(resized.shape[:2], (draws, 1))
    images = crop_and_normalise(pixels, sizes, geometry, CONFIG, torch.Generator().manual_seed(1))
    cached = [outputs[image.numpy().tobytes()] for image in images]
    return {"pil": np.asarray(pil), "cache": np.asarray(cached), "room": (resized.shape[0] - 32, resized.shape[1] - 32)}


def test_training_crops_and_flips_have_the_pil_paths_distribution(tmp_path):
    """Over 3000 draws per path of one 40x48 image (resized to 37x44: 6 x 13 offsets): each path's top and left
    offsets are uniform (chi-square goodness of fit), their means within 4 standard errors of the uniform mean
    (SE = sqrt(((k^2 - 1) / 12) / n) for k offsets), the flip rate within 4 SE = 4 sqrt(0.25 / n) of 1/2, and the two
    paths' offset histograms alike (chi-square test of homogeneity). Seeded, so the test is deterministic; a
    p-value floor of 1e-4 (an off-by-one range or a wrong flip rate gives p < 1e-30 at this n)."""
    path = write_sized_images(tmp_path, [(40, 48)])[0]
    drawn = windows_drawn(path, DRAWS)
    for name in ("pil", "cache"):
        windows = drawn[name]
        for axis, room in enumerate(drawn["room"]):
            k = room + 1
            counts = np.bincount(windows[:, axis].astype(int), minlength=k)
            assert len(counts) == k and stats.chisquare(counts).pvalue > 1e-4, (name, axis, counts)
            se = math.sqrt((k * k - 1) / 12 / DRAWS)
            assert abs(windows[:, axis].mean() - room / 2) < 4 * se, (name, axis)
        assert abs(windows[:, 2].mean() - 0.5) < 4 * math.sqrt(0.25 / DRAWS), name
    for axis, room in enumerate(drawn["room"]):
        table = np.stack([np.bincount(drawn[name][:, axis].astype(int), minlength=room + 1)
                          for name in ("pil", "cache")])
        assert stats.chi2_contingency(table).pvalue > 1e-4
    flips = np.asarray([[np.sum(drawn[n][:, 2] == 0), np.sum(drawn[n][:, 2] == 1)] for n in ("pil", "cache")])
    assert stats.chi2_contingency(flips).pvalue > 1e-4


def test_a_fixed_size_resize_is_neither_cropped_nor_flipped():
    geometry = Geometry((4, 5), None, False, T.InterpolationMode.BILINEAR)
    pixels = torch.arange(2 * 4 * 5 * 3, dtype=torch.uint8).reshape(2, 4, 5, 3)
    images = crop_and_normalise(pixels, np.asarray([[4, 5], [4, 5]]), geometry, {"mean": MEAN, "std": STD})
    by_hand = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN)[:, None, None]) / \
        torch.tensor(STD)[:, None, None]
    assert images.shape == (2, 3, 4, 5) and torch.equal(images, by_hand)


# --- keys, reuse and atomic builds --------------------------------------------------------------------------
def test_key_changes_with_what_the_pixels_depend_on(tmp_path):
    paths = [str(p) for p in write_sized_images(tmp_path, [(40, 44), (41, 45), (42, 46)])]
    geometry = fgvc_geometry(CONFIG, train=False)
    key = entry_key(paths, geometry, "RGB")
    assert entry_key(list(paths), fgvc_geometry(CONFIG, train=True), "RGB") == key  # the crop is not stored
    assert entry_key(paths, fgvc_geometry({**CONFIG, "input_size": (3, 36, 36)}, False), "RGB") != key  # resize
    assert entry_key(paths, fgvc_geometry({**CONFIG, "interpolation": "bilinear"}, False), "RGB") != key
    assert entry_key(paths, geometry, "L") != key
    assert entry_key(paths[:2], geometry, "RGB") != key and entry_key(paths[::-1], geometry, "RGB") != key
    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced (re-downloaded) file
    assert entry_key(paths, geometry, "RGB") != key


def test_second_use_reads_the_cache_and_a_changed_resize_or_file_rebuilds(tmp_path, capsys):
    root = make_fgvc(tmp_path / "cub", "cub", (2, 1, 1))

    def cached(config=CONFIG):
        source = create_datamodule("cub", data_config=config, data_root=str(root))
        source.setup()
        return source, cached_image_datamodule(source, tmp_path / "cache")

    assert cached()[1].hits == {"train": False, "val": False, "test": False}
    assert cached()[1].hits == {"train": True, "val": True, "test": True}
    assert cached({**CONFIG, "input_size": (3, 28, 28)})[1].hits == {"train": False, "val": False, "test": False}
    test_image = Path(cached()[0].splits["test"].dataset.samples[0][0])
    Image.fromarray(np.zeros((44, 40, 3), np.uint8)).save(test_image)  # new content, new size and mtime
    source, again = cached()
    assert again.hits == {"train": True, "val": True, "test": False}
    (images, _), = delivered(again, again.test_dataloader())
    assert torch.equal(images, next(iter(source.test_dataloader()))[0])  # the new image, not the stored one
    assert "image cache: train hit, val hit, test built" in capsys.readouterr().out


def test_a_build_that_dies_leaves_nothing_that_reads_as_complete(tmp_path, monkeypatch):
    paths = [str(p) for p in write_sized_images(tmp_path / "img", [(40, 44)] * 6)]
    geometry = fgvc_geometry(CONFIG, train=False)
    pixel_path, shapes_path = tmp_path / "c" / "k.u8", tmp_path / "c" / "k.npy"
    real, calls = cache.decode_resized, []

    def dies_at_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill mid-build (as a grid's SIGTERM handler raises)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "decode_resized", dies_at_the_fourth)
    monkeypatch.setattr(cache, "BUILD_CHUNK", 1)  # decode one at a time: three images are written before the kill
    with pytest.raises(KeyboardInterrupt):
        cache.build_entry(paths, geometry, "RGB", pixel_path, shapes_path, workers=1)
    assert not pixel_path.exists() and not shapes_path.exists() and not list(pixel_path.parent.iterdir())
    monkeypatch.setattr(cache, "decode_resized", real)
    shapes = cache.build_entry(paths, geometry, "RGB", pixel_path, shapes_path, workers=2)
    assert cache.read_shapes(pixel_path, shapes_path, 6) is not None
    assert shapes.tolist() == [[37, 40, 3]] * 6  # shorter side 40 -> 37, 44 -> int(37 * 44 / 40) = 40
    # a crash between the two writes (pixels without shapes), a truncated pixel file, a shorter list: not complete
    pixel_path.write_bytes(pixel_path.read_bytes()[:-1])
    assert cache.read_shapes(pixel_path, shapes_path, 6) is None
    shapes_path.unlink()
    assert cache.read_shapes(pixel_path, shapes_path, 6) is None
    shapes_path.write_bytes(b"not an npy file")
    assert cache.read_shapes(pixel_path, shapes_path, 6) is None


def test_an_image_smaller_than_the_crop_is_named(tmp_path):
    root = make_folder(tmp_path / "data", [(40, 44)])
    config = {**CONFIG, "input_size": (3, 32, 48)}  # resize 37 (from 32), crop 32 x 48: wider than a 40x44 image
    source = create_datamodule("folder", data_config=config, data_root=str(root))
    with pytest.raises(DataError, match=r"smaller than the \(32, 48\) crop.*000.png \(37x40\).*without IMAGE_CACHE"):
        cached_image_datamodule(source, tmp_path / "cache")


def test_cache_lives_beside_the_feature_cache():
    assert image_cache_dir("results") == Path("results/cache/images")


def test_multi_process_loaders_apply_the_on_device_transform(tmp_path):
    root = make_folder(tmp_path / "data", SIZES[:4])
    source = create_datamodule("folder", data_config=CONFIG, data_root=str(root), eval_batch_size=3)
    source.setup()
    sharded = ProcessShardedData(cached_image_datamodule(source, tmp_path / "cache"), world_size=2, rank=1, seed=0)
    batch = next(iter(sharded.test_dataloader()))
    assert isinstance(batch, RawBatch) and not batch.train
    images, labels = sharded.on_after_batch_transfer(batch, 0)
    expected = [source.splits["test"].dataset[i] for i in (1, 3, 5)]  # rank 1 of 2: every second example
    assert torch.equal(images, torch.stack([image for image, _ in expected]))
    assert labels.tolist() == [label for _, label in expected]


# --- the option -------------------------------------------------------------------------------------------------
def test_image_cache_is_refused_for_datasets_held_in_memory(tmp_path):
    with pytest.raises(ConfigError, match=r"IMAGE_CACHE=1 caches decoded image files, but DATASET=digits is not read "
                                          r"from image files.*drop IMAGE_CACHE.*folder"):
        validate_config(RunConfig(dataset="digits", image_cache=True, results_dir=str(tmp_path)))
    from benchmark.run import main

    assert main(["--dataset", "fashion_heldout", "--image-cache", "--results-dir", str(tmp_path)]) == 2


def tiny_vtab_run(tmp_path: Path, image_cache: bool, **overrides) -> dict:
    cfg = RunConfig(method="vpt_shallow", dataset="vtab/kitti", data_root=str(tmp_path / "vtab"), train_fraction=1.0,
                    backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT, epochs=2,
                    warmup_epochs=0, batch_size=4, method_options={"prompt_length": 2}, image_cache=image_cache,
                    results_dir=str(tmp_path / ("cached" if image_cache else "pil")), **overrides)
    return run(cfg)


def test_a_run_without_augmentation_trains_the_same_weights_from_the_cache(tmp_path, monkeypatch, capsys):
    """VTAB-1k's transform has no random part, so a run on the cache sees the PIL path's inputs in the same order:
    bit-identical weights and accuracies."""
    make_vtab(tmp_path / "vtab")
    seen = record_tested_model(monkeypatch)
    pil = tiny_vtab_run(tmp_path, image_cache=False)
    pil_weights = {k: v.clone() for k, v in seen["model"].state_dict().items()}
    cached = tiny_vtab_run(tmp_path, image_cache=True)
    assert pil["status"] == cached["status"] == "ok"
    assert "image cache: train built, val built, test built" in capsys.readouterr().out
    weights = seen["model"].state_dict()
    assert all(torch.equal(weights[k], pil_weights[k]) for k in pil_weights)
    assert (cached["val_top1"], cached["test_top1"]) == (pil["val_top1"], pil["test_top1"])
    assert cached["config"]["image_cache"] is True
    assert len(list(image_cache_dir(tmp_path / "cached").glob("*.u8"))) == 3  # train800, val200, test


def test_an_augmenting_run_trains_from_the_cache(tmp_path, capsys):
    root = make_fgvc(tmp_path / "cub", "cub", (4, 1, 2))
    cfg = RunConfig(method="vpt_deep", dataset="cub", data_root=str(root), train_fraction=1.0,
                    backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT, epochs=1,
                    warmup_epochs=0, batch_size=4, method_options={"prompt_length": 2}, image_cache=True,
                    results_dir=str(tmp_path / "results"))
    assert run(cfg)["status"] == "ok"
    assert "image cache: train built" in capsys.readouterr().out
    cfg.force = True
    assert run(cfg)["status"] == "ok"
    assert "image cache: train hit, val hit, test hit" in capsys.readouterr().out
