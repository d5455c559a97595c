"""Bad input -> one clear error before any training, naming the problem and the fix (issue 5).

Most cases go through `benchmark.run.main` exactly as `make bench` does, and check what the user reads on
stderr, that the exit status is 2 and that nothing was written to the results store.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import Dataset

from backbones import create_backbone, data_config
from benchmark.core.config import EMBEDDED_WEIGHTS, REPO_ROOT, RunConfig
from benchmark.core.errors import ConfigError, ConfigWarning
from benchmark.core.validate import check_wandb, validate_config, validate_data
from benchmark.run import main
from datamodules import create_datamodule, list_datasets, register_dataset
from datamodules.base import SPLITS, FractionDataModule, smallest_fraction
from datamodules.checks import load_image, require_files
from datamodules.labelled_split import LabelledSplit

IMAGE_LIST = "test_image_list"  # a fixture dataset family: <root>/<split>.txt with "<relative path> <label>"


class ImageListDataset(Dataset):
    """Image files listed with labels; `samples` follows torchvision's DatasetFolder convention."""

    def __init__(self, samples: list[tuple[str, int]], size: int):
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path, mode="L").resize((self.size, self.size))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None], label


class ImageListDataModule(FractionDataModule):
    """What a file-based family does with `datamodules.checks`: require its split files, list its images."""

    name = IMAGE_LIST

    @property
    def num_classes(self) -> int:
        return 3

    def load_split(self, split: str) -> LabelledSplit:
        root = require_files(self.data_root, [f"{s}.txt" for s in SPLITS], dataset=self.name)
        rows = [line.split() for line in (root / f"{split}.txt").read_text().splitlines() if line.strip()]
        samples = [(str(root / path), int(label)) for path, label in rows]
        dataset = ImageListDataset(samples, self.data_config["input_size"][-1])
        return LabelledSplit(dataset, [label for _, label in samples], [path for path, _ in rows])


if IMAGE_LIST not in list_datasets():
    register_dataset(IMAGE_LIST, ImageListDataModule)


def write_image_list(root: Path, per_class: int = 4, labels=(0, 1, 2)) -> Path:
    """A valid fixture dataset: per_class 8x8 PNGs of each label in every split."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = []
        for label in labels:
            for i in range(per_class):
                path = f"images/{split}_{label}_{i}.png"
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / path)
                lines.append(f"{path} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def bench(tmp_path: Path, capsys, *args: str) -> str:
    """`make bench` with bad input: exit status 2, nothing in the results store; returns what stderr said."""
    results = tmp_path / "results"
    code = main([*args, "--results-dir", str(results), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (results / "runs").exists() and not (results / "logs").exists()
    return err


def image_list_args(root: Path, *extra: str) -> list[str]:
    return ["--dataset", IMAGE_LIST, "--data-root", str(root), "--backbone", "vit_embedded_p7_28",
            "--weights", str(EMBEDDED_WEIGHTS), "--recipe", "quick", "--fraction", "1", *extra]


# --- names ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--method", "vpt_deeep"], ["Unknown method 'vpt_deeep'", "Did you mean 'vpt_deep'?",
                                 "full, linear, bias, adapter, vpt_shallow, vpt_deep", "METHOD="]),
    (["--dataset", "digts"], ["Unknown dataset 'digts'", "Did you mean 'digits'?", "fashion_heldout", "DATASET="]),
    (["--recipe", "quik"], ["Unknown recipe 'quik'", "Did you mean 'quick'?", "paper, quick", "RECIPE="]),
    (["--backbone", "vit_bse_patch16_224"], ["Unknown backbone 'vit_bse_patch16_224'",
                                             "Did you mean 'vit_base_patch16_224'?", "timm.list_models"]),
    (["--backbone", "vit_base_patch16_224.orig_in2k"], ["no pretrained weights tagged 'orig_in2k'",
                                                        "Did you mean 'vit_base_patch16_224.orig_in21k'?"]),
])
def test_unknown_names_suggest_the_closest(tmp_path, capsys, args, expected):
    err = bench(tmp_path, capsys, *args)
    for text in expected:
        assert text in err


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    err = bench(tmp_path, capsys, "--method", "lnear", "--dataset", "digts")
    assert "2 problems" in err and "'linear'" in err and "'digits'" in err


def test_a_recipe_file_of_ones_own_is_read_and_its_typos_refused(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults: {optimizer: sgd, lr: 0.2, weight_decay: 0.0, epochs: 3, warmup_epochs: 1, "
                    "batch_size: 16}\nmethods:\n  vpt_deep: {method_options: {prompt_length: 2}}\n")
    cfg = validate_config(RunConfig(method="vpt_deep", dataset="digits", recipe=str(mine),
                                    results_dir=str(tmp_path / "results")))
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.method_options) == (0.2, 3, 16, {"prompt_length": 2})
    mine.write_text(mine.read_text().replace("method_options", "method_option"))
    err = bench(tmp_path, capsys, "--recipe", str(mine))
    assert f"Recipe file {mine}, method 'vpt_deep': unknown key 'method_option'. Did you mean 'method_options'?" in err
    assert len(err.strip().splitlines()) == 1, err
    assert "does not exist" in bench(tmp_path, capsys, "--recipe", str(tmp_path / "gone.yaml"))


def test_backbone_family_a_method_does_not_support_is_rejected(tmp_path, capsys):
    err = bench(tmp_path, capsys, "--backbone", "efficientnet_b0", "--scratch")
    assert "timm EfficientNet, which no tuning method supports; the backbone families are: plain ViTs" in err
    err = bench(tmp_path, capsys, "--backbone", "resnet18", "--scratch", "--method", "vpt_deep")
    assert "Method 'vpt_deep' does not support convnet backbones (a timm ResNet); it supports: vit, swin." in err


# --- fraction ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["0", "-0.1", "1.5", "nan", "ten"])
def test_bad_fraction_on_the_command_line(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--fraction", bad])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "FRACTION must be" in err and "(0, 1]" in err and "e.g. FRACTION=0.1" in err


@pytest.mark.parametrize("bad", [0.0, 1.01, float("nan"), "a tenth", None])
def test_bad_fraction_in_a_config(bad):
    with pytest.raises(ConfigError, match=r"FRACTION must be .*\(0, 1\]"):
        RunConfig(train_fraction=bad)


def test_fraction_too_small_names_the_smallest_valid_one(tmp_path, capsys):
    err = bench(tmp_path, capsys, "--method", "linear", "--fraction", "0.001")
    assert "FRACTION=0.001 is too small for digits" in err
    smallest = float(err.split("smallest valid fraction is ")[1].split()[0])
    # The suggestion really is valid, and just so: it keeps >= 1 example of every class, a tenth less does not.
    digits = create_datamodule("digits", data_config=data_config(create_backbone("vit_embedded_p7_28")),
                               train_fraction=smallest)
    digits.setup()
    counts = np.bincount(digits.splits["train"].labels)
    assert all(math.floor(smallest * n + 0.5) >= 1 for n in counts)
    assert any(math.floor(0.9 * smallest * n + 0.5) == 0 for n in counts)
    assert smallest == smallest_fraction(counts)
    validate_data(digits, RunConfig(dataset="digits", train_fraction=smallest))  # accepted


# --- numbers and method options ------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--epochs", "0"], "EPOCHS must be an integer in [1, 10,000], got 0"),
    (["--batch-size", "0"], "BATCH_SIZE must be an integer in [1, 65,536], got 0"),
    (["--lr", "-1"], "LR must be in (0, 1000] for sgd, got -1.0"),
    (["--lr", "nan"], "LR must be in (0, 1000] for sgd, got nan"),
    (["--method", "full", "--lr", "5"], "LR must be in (0, 1] for adamw, got 5.0"),
    (["--weight-decay", "-0.1"], "weight decay must be in [0, 1], got -0.1"),
    (["--seed", "-1"], "SEED must be an integer"),
])
def test_numbers_out_of_range(tmp_path, capsys, args, expected):
    code = main([*args, "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err
    assert not (tmp_path / "runs").exists()


def test_prompt_length_must_be_positive(tmp_path, capsys):
    err = bench(tmp_path, capsys, "--method", "vpt_shallow", "--method-arg", "prompt_length=0")
    assert "prompt_length must be a positive integer" in err and "got 0" in err and "METHOD_ARGS=" in err


def test_adapter_reduction_must_divide_the_width(tmp_path, capsys):
    err = bench(tmp_path, capsys, "--method", "adapter", "--method-arg", "reduction=7")
    assert "reduction 7 does not divide the embedding width 128" in err and "[1, 2, 4, 8, 16, 32, 64]" in err


def test_unknown_method_option_suggests_the_closest(tmp_path, capsys):
    err = bench(tmp_path, capsys, "--method", "adapter", "--method-arg", "reducton=8")
    assert "no option(s) ['reducton']" in err and "Did you mean 'reduction'?" in err


def test_a_valid_paper_backbone_config_passes():
    """A ViT-B/16 config validates offline: the backbone is built on the `meta` device, without weights."""
    cfg = validate_config(RunConfig(method="adapter", dataset="digits", backbone="vit_base_patch16_224",
                                    pretrained=False, results_dir="results"))
    assert cfg.backbone == "vit_base_patch16_224" and cfg.method_options == {}


# --- weights -------------------------------------------------------------------------------------------------
def test_weights_missing(tmp_path, capsys):
    err = bench(tmp_path, capsys, "--weights", str(tmp_path / "nope.pth"))
    assert "WEIGHTS file" in err and "nope.pth' does not exist" in err and ".safetensors" in err


def test_weights_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    err = bench(tmp_path, capsys, "--weights", str(tmp_path / "notes.pth"))
    assert "notes.pth' is not a readable checkpoint" in err


def test_weights_for_another_backbone_name_the_keys(tmp_path, capsys):
    from safetensors.torch import load_file

    state = load_file(EMBEDDED_WEIGHTS)
    state.pop("blocks.5.mlp.fc2.weight")
    state["adapter.extra"] = torch.zeros(3)
    save_file(state, tmp_path / "edited.safetensors")
    err = bench(tmp_path, capsys, "--weights", str(tmp_path / "edited.safetensors"))
    assert "do not match backbone" in err
    assert "missing keys ['blocks.5.mlp.fc2.weight']" in err and "unexpected keys ['adapter.extra']" in err
    err = bench(tmp_path, capsys, "--backbone", "vit_tiny_patch16_224", "--weights", str(EMBEDDED_WEIGHTS))
    assert "tensors have another shape" in err and "(128,) != (192,)" in err


@pytest.mark.slow  # a fresh Python process (torch import) per case
def test_hub_weights_unreachable_suggest_local_weights(tmp_path):
    """Offline with an empty cache (a GPU node without internet): the error says to pass WEIGHTS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "benchmark.run", "--backbone", "vit_tiny_patch16_224.augreg_in21k",
                           "--epochs", "1", "--results-dir", str(tmp_path / "results")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "could not be fetched from the Hugging Face hub" in done.stderr and "WEIGHTS=" in done.stderr


# --- results directory and W&B -------------------------------------------------------------------------------
def test_results_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["--epochs", "1", "--results-dir", str(blocker / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "results directory" in err and "is not writable" in err and "RESULTS=" in err


def test_results_dir_that_is_a_file(tmp_path, capsys):
    """RESULTS= naming an existing regular file: no folder can be made there, whoever runs the test (root too,
    which a permission bit would not stop)."""
    taken = tmp_path / "results"
    taken.write_text("a file, not a folder")
    code = main(["--epochs", "1", "--results-dir", str(taken)])
    err = capsys.readouterr().err
    assert code == 2 and f"results directory {str(taken)!r} is not writable" in err and "RESULTS=" in err
    assert taken.read_text() == "a file, not a folder"


def test_wandb_without_the_package_falls_back_to_csv(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own way of making `import wandb` fail
    with pytest.warns(ConfigWarning, match="wandb package is not installed: logging to CSV only"):
        cfg = check_wandb(RunConfig(wandb=True))
    assert cfg.wandb is False


@pytest.mark.parametrize("key, expected", [("abc123", "WANDB_API_KEY is malformed"), (None, "no W&B API key")])
def test_wandb_with_a_broken_or_missing_key_goes_offline(monkeypatch, tmp_path, key, expected):
    monkeypatch.setenv("WANDB_MODE", "")  # unset for the check; monkeypatch restores the original afterwards
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", key)
    with pytest.warns(ConfigWarning, match=expected) as record:
        cfg = check_wandb(RunConfig(wandb=True))
    assert cfg.wandb is True and os.environ["WANDB_MODE"] == "offline"
    assert "wandb sync" in str(record[0].message)


def test_wandb_with_a_well_formed_key_stays_online(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        check_wandb(RunConfig(wandb=True))
    assert os.environ["WANDB_MODE"] == ""


# --- data on disk --------------------------------------------------------------------------------------------
def test_image_list_fixture_is_valid(tmp_path):
    """The fixture family itself passes every check, so the failures below are caused by the damage alone."""
    root = write_image_list(tmp_path / "data")
    assert main(image_list_args(root, "--method", "linear", "--epochs", "1", "--results-dir",
                                str(tmp_path / "results"))) == 0


def test_data_root_missing(tmp_path, capsys):
    err = bench(tmp_path, capsys, *image_list_args(tmp_path / "nowhere"))
    assert "DATA_ROOT" in err and "nowhere' does not exist" in err and f"make prepare DATASET={IMAGE_LIST}" in err


def test_split_file_missing(tmp_path, capsys):
    root = write_image_list(tmp_path / "data")
    (root / "test.txt").unlink()
    err = bench(tmp_path, capsys, *image_list_args(root))
    assert "lacks the split file(s) test.txt" in err and "make prepare" in err


def test_missing_images_named_and_counted(tmp_path, capsys):
    root = write_image_list(tmp_path / "data")
    gone = sorted((root / "images").glob("val_*.png"))[:8]
    for path in gone:
        path.unlink()
    err = bench(tmp_path, capsys, *image_list_args(root))
    assert "8 of 12 image(s) listed in the val split do not exist" in err
    assert all(str(path) in err for path in gone[:5]) and str(gone[5]) not in err and "and 3 more" in err


@pytest.mark.parametrize("damage, reason", [("truncate", "unreadable"), ("text", "not an image")])
def test_unreadable_image_is_named(tmp_path, capsys, damage, reason):
    root = write_image_list(tmp_path / "data")
    victim = root / "images" / "train_1_2.png"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-30])
    else:
        victim.write_text("this is not a png")
    err = bench(tmp_path, capsys, *image_list_args(root))
    assert f"1 image(s) in the train split cannot be read: {victim} ({reason}" in err


def test_a_list_that_decoded_is_not_decoded_again_until_a_file_changes(tmp_path, monkeypatch):
    from datamodules import checks

    root = write_image_list(tmp_path / "data")
    paths = sorted((root / "images").glob("train_*.png"))
    decoded = []
    real_reason = checks.unreadable_reason
    monkeypatch.setattr(checks, "unreadable_reason", lambda path: decoded.append(path) or real_reason(path))
    checks.check_image_files(paths)
    assert len(decoded) == len(paths)
    checks.check_image_files(paths)  # remembered: only stats, no decoding
    assert len(decoded) == len(paths)
    victim = paths[1]
    victim.write_bytes(victim.read_bytes()[:-30])  # damaged after the check: size and mtime change
    with pytest.raises(checks.DataError, match=f"cannot be read: {victim}"):
        checks.check_image_files(paths)
    assert len(decoded) == 2 * len(paths)
    assert len(list(checks.checked_images_dir().iterdir())) == 1  # the damaged list was not remembered


def test_unwritable_checked_images_cache_only_costs_a_recheck(tmp_path, monkeypatch):
    from datamodules import checks

    root = write_image_list(tmp_path / "data")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VPT_BENCH_CACHE", str(blocker))  # a file, so its subfolder cannot be created
    checks.check_image_files(sorted((root / "images").glob("*.png")))


def test_labels_out_of_range(tmp_path, capsys):
    root = write_image_list(tmp_path / "data")
    lines = (root / "test.txt").read_text().replace(" 2\n", " 7\n")
    (root / "test.txt").write_text(lines)
    err = bench(tmp_path, capsys, *image_list_args(root))
    assert "test split has labels [7] outside 0..2 (3 classes)" in err


def test_class_absent_from_train(tmp_path, capsys):
    root = write_image_list(tmp_path / "data")
    kept = [line for line in (root / "train.txt").read_text().splitlines() if not line.endswith(" 1")]
    (root / "train.txt").write_text("\n".join(kept) + "\n")
    err = bench(tmp_path, capsys, *image_list_args(root))
    assert "class(es) [1] have no example in the training pool" in err


def test_load_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(path)


def test_make_bench_passes_bad_input_through_to_the_same_message():
    """The Makefile adds nothing that hides the message: `make -n` shows the exact command it runs."""
    done = subprocess.run(["make", "-n", "bench", "METHOD=vpt_deeep", "FORCE=1"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    command = [line for line in done.stdout.splitlines() if "benchmark.run" in line]
    assert command and command[0].endswith(" -m benchmark.run --method=\"vpt_deeep\" --force=\"1\"")
