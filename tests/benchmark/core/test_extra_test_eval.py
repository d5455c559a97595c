"""Extra test sets (EXTRA_TEST=name=dir): class folders matched by name, logits restricted to a subset's classes
before the argmax, one accuracy per set through Lightning's multiple test dataloaders, in the result and the table;
a class the training set lacks stops the run before training."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from backbones import data_config
from benchmark.analysis import ablations, tables
from benchmark.core.config import RunConfig
from benchmark.core.distributed import each_example_once
from benchmark.core.errors import ConfigError
from benchmark.core.extra_test_eval import ExtraTestEvaluation
from benchmark.core.pipeline import run
from benchmark.run import config_from_args
from benchmark.run import main as run_main
from benchmark.sweeps.search import final_config, point_config
from datamodules import create_datamodule
from datamodules.checks import DataError
from datamodules.embedded import carve, load_digits_uint8
from datamodules.extra_test_sets import ExtraTestSet, restricted_argmax, scan_class_folders
from tests.helpers.data import make_folder
from tests.helpers.models import TINY_VIT
from tests.helpers.runs import make_dry_run, run_both


def test_restricted_argmax_picks_the_best_allowed_class_even_when_another_is_higher():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0],   # unrestricted: class 0; among {1, 2}: class 2
                           [0.0, 2.0, 1.0, 9.0],   # unrestricted: class 3; among {1, 2}: class 1
                           [0.0, 4.0, 6.0, 1.0]])  # class 2 either way
    allowed = torch.tensor([False, True, True, False])
    assert logits.argmax(dim=1).tolist() == [0, 3, 2]
    assert restricted_argmax(logits, allowed).tolist() == [2, 1, 2]
    assert restricted_argmax(logits, torch.ones(4, dtype=torch.bool)).tolist() == [0, 3, 2]


class FixedLogits(nn.Module):
    """A "model" whose input is its logits: the test decides every prediction."""

    def forward(self, x):
        return x


def test_a_sets_allowed_classes_are_the_ones_it_holds():
    extra = ExtraTestSet("a", "/a", None, np.array([0, 2]), num_classes=4)
    assert extra.allowed().tolist() == [True, False, True, False] and extra.restricted
    assert not ExtraTestSet("b", "/b", None, np.arange(4), num_classes=4).restricted


def test_evaluation_scores_each_loader_with_its_own_classes():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 2.0, 1.0, 9.0], [0.0, 4.0, 6.0, 1.0]])
    labels = torch.tensor([2, 1, 1])
    loaders = [DataLoader(TensorDataset(logits, labels), batch_size=2) for _ in range(2)]
    evaluation = ExtraTestEvaluation(FixedLogits(), ["all", "sub"],
                                     [torch.ones(4, dtype=torch.bool), torch.tensor([False, True, True, False])], 4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(evaluation, dataloaders=loaders, verbose=False)
    # all classes: predictions 0, 3, 2 against labels 2, 1, 1 -> 0 of 3; among {1, 2}: 2, 1, 2 -> 2 of 3 right
    assert float(trainer.callback_metrics["extra_test/all/top1"]) == pytest.approx(0.0)
    assert float(trainer.callback_metrics["extra_test/sub/top1"]) == pytest.approx(2 / 3)


def write_images(folder: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    for name, count in per_class.items():
        for i in range(count):
            (folder / name).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.jpg")
            seed += 1
    return folder


def test_class_folders_are_matched_by_name_and_unknown_or_empty_ones_refused(tmp_path):
    training = ["ant", "mole", "zebra"]
    samples, ids, classes = scan_class_folders(write_images(tmp_path / "a", {"zebra": 2, "ant": 1}), training, "a")
    assert [label for _, label in samples] == [0, 2, 2] and ids == ["ant/0.jpg", "zebra/0.jpg", "zebra/1.jpg"]
    assert classes.tolist() == [0, 2]
    write_images(tmp_path / "b", {"ant": 1, "yak": 1, "emu": 1})
    with pytest.raises(DataError, match=r"EXTRA_TEST b=.* has class folder\(s\) emu, yak that the training set lacks"):
        scan_class_folders(tmp_path / "b", training, "b")
    (write_images(tmp_path / "c", {"ant": 1}) / "mole").mkdir()
    with pytest.raises(DataError, match="EXTRA_TEST c=.*mole"):
        scan_class_folders(tmp_path / "c", training, "c")
    with pytest.raises(DataError, match="no such folder"):
        scan_class_folders(tmp_path / "none", training, "none")


def test_command_line_and_make_variable(tmp_path, capsys):
    argv = make_dry_run("bench", "EXTRA_TEST=v2=/data/v2,sketch=/data/my sketch")
    assert argv == ["--extra-test=v2=/data/v2,sketch=/data/my sketch"]
    assert config_from_args(argv).extra_test == {"v2": "/data/v2", "sketch": "/data/my sketch"}
    for bad, message in (["--extra-test", "v2"], "must look like name=dir"), (["--extra-test", "a=/x,a=/y"], "twice"):
        with pytest.raises(SystemExit):
            config_from_args(bad)
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="EXTRA_TEST names \\['a/b'\\]"):
        RunConfig(extra_test={"a/b": "/x"})
    assert run_main(["--extra-test", f"gone={tmp_path / 'gone'}", "--results-dir", str(tmp_path)]) == 2
    assert "EXTRA_TEST gone=" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def folder_run(tmp_path: Path, extra: dict[str, str], method: str = "vpt_deep") -> RunConfig:
    return RunConfig(method=method, dataset="folder", data_root=str(tmp_path / "data"), train_fraction=1.0,
                     backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT, epochs=1,
                     warmup_epochs=0, batch_size=4, method_options={"prompt_length": 2} if method != "linear" else {},
                     results_dir=str(tmp_path / "results"), extra_test=extra)


def test_folder_run_scores_each_extra_set_and_restricts_a_subset(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", {"train": 3, "val": 1, "test": 4})  # classes ant, mole, zebra
    shutil.copytree(root / "test", tmp_path / "same")
    shutil.copytree(root / "test", tmp_path / "sub", ignore=lambda folder, names: ["mole"] * ("mole" in names))
    shutil.copytree(root / "test" / "mole", tmp_path / "one" / "mole")  # one class: its argmax can only be mole
    seen, real_test = {}, L.Trainer.test

    def test(self, model=None, *args, **kwargs):
        seen.setdefault("models", []).append(model)
        return real_test(self, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", test)
    result = run(folder_run(tmp_path, {"same": str(tmp_path / "same"), "sub": str(tmp_path / "sub"),
                                       "one": str(tmp_path / "one")}))
    assert result["status"] == "ok" and len(seen["models"]) == 2  # the test split, then both extra sets at once
    model = seen["models"][0].eval()
    # By hand, from the run's own test split (the same images): plain argmax, and the best of ant (0) and zebra (2).
    data = create_datamodule("folder", data_config=data_config(model.backbone), data_root=str(root))
    data.setup()
    test = data.splits["test"]
    x = torch.stack([test.dataset[i][0] for i in range(len(test.labels))])
    with torch.inference_mode():
        logits = model(x)
    labels = torch.as_tensor(test.labels)
    plain = 100 * float((logits.argmax(1) == labels).float().mean())
    keep = labels != 1
    subset = torch.tensor([0, 2])
    restricted = subset[logits[keep][:, subset].argmax(1)]
    assert result["test_top1"] == pytest.approx(plain, abs=1e-4)
    assert result["extra_test/same/top1"] == pytest.approx(plain, abs=1e-4)
    assert result["extra_test/sub/top1"] == pytest.approx(100 * float((restricted == labels[keep]).float().mean()),
                                                          abs=1e-4)
    assert result["extra_test"]["sub"] == {"folder": str(tmp_path / "sub"), "n": 8, "classes": 2, "restricted": True}
    assert (logits[labels == 1].argmax(1) != 1).any()  # unrestricted, some mole image is called another class
    assert result["extra_test/one/top1"] == 100.0  # restricted to mole, every mole image is right
    assert result["extra_test"]["same"]["restricted"] is False


def test_a_class_the_training_set_lacks_stops_the_run_before_training(tmp_path):
    make_folder(tmp_path / "data", {"train": 2, "val": 1, "test": 1})
    write_images(tmp_path / "odd", {"ant": 1, "yak": 1})
    with pytest.raises(ConfigError, match=r"EXTRA_TEST odd=.* class folder\(s\) yak that the training set lacks"):
        run(folder_run(tmp_path, {"odd": str(tmp_path / "odd")}))
    assert not (tmp_path / "results" / "runs").exists() and not (tmp_path / "results" / "logs").exists()


def test_embedded_digits_read_an_image_folder_like_their_own_test_split(tmp_path):
    """The digits test images written losslessly as 8x8 PNGs, one folder per digit: the extra set is the test split
    itself, read from files through the embedded transform, so its top-1 is the test top-1 (the linear probe on
    cached features reads images again for it)."""
    write_digits_test_pngs(tmp_path / "digits")
    result = run(RunConfig(method="linear", dataset="digits", epochs=1, results_dir=str(tmp_path / "results"),
                           extra_test={"png": str(tmp_path / "digits")}))
    assert result["extra_test"]["png"] == {"folder": str(tmp_path / "digits"), "n": 600, "classes": 10,
                                           "restricted": False}
    assert result["extra_test/png/top1"] == pytest.approx(result["test_top1"], abs=1e-9)


def test_table_has_a_column_per_extra_set(tmp_path):
    final = pd.DataFrame([
        {"method": "linear", "dataset": "d", "seed": 0, "train_fraction": 1.0, "extra_test/sketch/top1": 40.0},
        {"method": "linear", "dataset": "d", "seed": 1, "train_fraction": 1.0, "extra_test/sketch/top1": 50.0},
        {"method": "full", "dataset": "d", "seed": 0, "train_fraction": 1.0, "extra_test/sketch/top1": 61.0},
        {"method": "full", "dataset": "d", "seed": 0, "train_fraction": 0.1, "extra_test/sketch/top1": 1.0}])
    table = pd.DataFrame({"method": ["full", "linear"], "label": ["Full", "Linear"], "train_fraction": [1.0, 1.0],
                          "tuned_percent": [100.0, 0.1], "seeds": [1, 2], "d": [70.0, 60.0], "d_std": [0.0, 1.0],
                          "d_ci_low": [math.nan, 50.0], "d_ci_high": [math.nan, 70.0], "mean": [70.0, 60.0],
                          "ppt": [60.0, 59.0]})
    shown = ablations.with_extra_test_columns(table, final)
    assert shown["extra_test/sketch/top1"].tolist() == [61.0, 45.0]  # the table's fraction only, mean over seeds
    text = tables.table_markdown(shown, pd.DataFrame())
    header, _, full, linear = text.splitlines()[2:6]
    assert header.endswith("| sketch (extra test) |") and full.endswith("| 61.00 |") and linear.endswith("| 45.00 |")


def test_search_points_skip_the_extra_sets_and_final_runs_keep_them():
    cell = RunConfig(method="linear", extra_test={"sketch": "/data/sketch"})
    assert point_config(cell, 0.5, 0.0, seed=0).extra_test == {}
    assert final_config(cell, 0.5, 0.0, seed=0).extra_test == {"sketch": "/data/sketch"}


def test_each_process_evaluates_every_extra_example_once():
    loader = DataLoader(TensorDataset(torch.arange(7)), batch_size=2)
    assert each_example_once(loader, world_size=1, rank=0) is loader
    for world_size in (2, 3):
        shards = [each_example_once(loader, world_size, rank) for rank in range(world_size)]
        seen = [int(x) for shard in shards for (batch,) in shard for x in batch]
        assert sorted(seen) == list(range(7))  # disjoint, none repeated to even out the processes


def write_digits_test_pngs(folder: Path) -> Path:
    images, labels = load_digits_uint8()
    test, _ = carve(labels, 60)
    for i in test:
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / str(labels[i]) / f"{i:04d}.png")
    return folder


@pytest.mark.slow
def test_ddp_extra_sets_count_every_example_once(tmp_path):
    """Two processes vs one, vpt_deep on digits, 1 epoch at lr 1e-9 (tests/benchmark/core/test_distributed.py: both
    evaluate the same weights); the extra set is the test split as files. Tolerance: one example of 600."""
    extra = write_digits_test_pngs(tmp_path / "pngs")
    single, ddp, _ = run_both(tmp_path, "--epochs", "1", "--lr", "1e-9", "--extra-test", f"png={extra}")
    assert ddp["world_size"] == 2 and ddp["extra_test"]["png"]["n"] == 600
    assert ddp["extra_test/png/top1"] == pytest.approx(single["extra_test/png/top1"], abs=100 / 600 + 1e-6)
    assert ddp["extra_test/png/top1"] == pytest.approx(ddp["test_top1"], abs=100 / 600 + 1e-6)
