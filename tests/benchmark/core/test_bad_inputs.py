"""Issue 26's hostile-but-realistic inputs, replayed through the CLI: each ends in one line naming the problem and
its fix (exit 2, nothing written anywhere), or, where the input is legitimate, in a run that works. The table in
docs/reliability.md ("Bad input, case by case") lists the same cases with their outcomes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.core.config import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.store import MAX_NAME_BYTES, atomic_write_text, finished_ok, read_result, result_path, results_path
from benchmark.core.validate import check_backbone_name, validate_config
from benchmark.run import main

TINY = "img_size=32 patch_size=8 embed_dim=32 depth=2 num_heads=2"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def refused(tmp_path: Path, capsys, *args: str) -> str:
    """Run the CLI from an empty working folder with its results in `tmp_path/results`; assert exit 2, one `error`
    line, no traceback and no file or folder written anywhere below tmp_path; return the message."""
    work = tmp_path / "work"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with pytest.raises(SystemExit) as exited:  # argparse refuses its own type errors with exit 2
            raise SystemExit(main(["--results-dir", str(tmp_path / "results"), "--epochs", "1", *args]))
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    assert files_under(tmp_path) == [work]  # nothing in the results folder, the working folder or beside them
    return err


@pytest.mark.parametrize("args, expected", [
    # writes outside the results folder
    (["--tag", "x/../../somewhere"], "TAG 'x/../../somewhere' must be one name"),
    (["--tag", "a/b"], "TAG 'a/b' must be one name"),
    (["--tag", "t" * 300], "(300 characters)' must be one name of at most 64"),
    (["--tag", ".hidden"], "starting with a letter or digit"),
    (["--options", "prompt_length=" + "1" * 250], f"at most {MAX_NAME_BYTES} bytes"),
    # wrong config trained silently, malformed values
    (["--method-args", "prompt_length="], "METHOD_ARGS prompt_length= has no value"),
    (["--method-args", "prompt_length=[1"], "METHOD_ARGS prompt_length=[1 is not a value"),
    (["--backbone-args", "img_size=[1"], "BACKBONE_ARGS img_size=[1 is not a value"),
    (["--options", "prompt_length=[1"], "OPTIONS prompt_length=[1 is not a value"),
    (["--options", "prompt_length="], "OPTIONS 'prompt_length' has no value"),
    (["--backbone-args", "img_size=abc"], "BACKBONE_ARGS img_size='abc' is text where"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    # settings that do not fit each other or the machine
    (["--warmup-epochs", "50", "--epochs", "2"], "WARMUP_EPOCHS=50 is longer than the run (EPOCHS=2)"),
    (["--devices", "99", "--accelerator", "cpu"], "DEVICES=99 asks for 99 processes on the CPU"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, expected):
    assert expected in refused(tmp_path, capsys, *args)


def test_an_empty_results_folder_is_refused_and_nothing_lands_in_the_working_folder(tmp_path, capsys):
    """`make bench RESULTS=` passes an empty value: it once wrote runs/ here and splits/, logs/, cache/ at /."""
    work = tmp_path / "work"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code = main(["--results-dir", "", "--method", "linear", "--epochs", "1"])
    finally:
        os.chdir(cwd)
    assert code == 2
    assert "RESULTS is empty" in capsys.readouterr().err
    assert files_under(work) == []
    with pytest.raises(ConfigError, match="RESULTS is empty"):
        RunConfig(results_dir=" ")


def test_devices_on_a_cpu_do_not_suggest_a_batch_size(tmp_path, capsys):
    err = refused(tmp_path, capsys, "--devices", "99", "--accelerator", "cpu")
    assert "BATCH_SIZE=99" not in err and "DEVICES=1" in err


def test_a_warmup_as_long_as_the_run_is_allowed(tmp_path):
    cfg = validate_config(RunConfig(method="linear", epochs=2, warmup_epochs=2, results_dir=str(tmp_path)))
    assert (cfg.epochs, cfg.warmup_epochs) == (2, 2)


@pytest.mark.parametrize("parts", [("runs", "../x.json"), ("runs", "a/../../x"), ("runs", ""), ("..",),
                                   ("runs", "n" * (MAX_NAME_BYTES + 1))])
def test_results_path_refuses_parts_that_leave_the_folder_or_no_filesystem_takes(tmp_path, parts):
    with pytest.raises(ConfigError):
        results_path(tmp_path, *parts)


def test_results_path_keeps_nested_names_inside_and_refuses_a_link_out(tmp_path):
    assert results_path(tmp_path, "runs", "digits/vit/full/frac1_seed0.json") == \
        tmp_path / "runs" / "digits" / "vit" / "full" / "frac1_seed0.json"
    assert results_path(tmp_path, "runs", "n" * MAX_NAME_BYTES).name == "n" * MAX_NAME_BYTES
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="outside the results folder"):
        results_path(tmp_path, "runs", "digits/x.json")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_result_files_follow_the_umask_like_other_tools(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
        plain = tmp_path / "plain.txt"
        plain.write_text("")  # what open() leaves: the reference
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


@pytest.mark.parametrize("record, ok", [
    ({"status": "ok", "test_top1": 50.0}, True), ({"status": "ok", "test_top1": 0}, True),
    ({"status": "ok"}, False), ({"status": "ok", "test_top1": "50"}, False),
    ({"status": "ok", "test_top1": True}, False),
    ({"status": "failed", "test_top1": 50.0}, False), (None, False)])
def test_only_a_record_with_its_test_top1_counts_as_finished(record, ok):
    assert finished_ok(record) is ok


@pytest.mark.parametrize("text", ['"a string"', "[1, 2]", "{not json", "\xff\xfe"])
def test_a_result_file_that_is_not_a_record_reads_as_absent(tmp_path, text):
    path = tmp_path / "r.json"
    path.write_bytes(text.encode("latin-1"))
    assert read_result(path) is None


def test_a_result_without_test_top1_is_retrained_not_a_key_error(tmp_path, capsys):
    args = ["--method", "linear", "--epochs", "1", "--results-dir", str(tmp_path)]
    cfg = RunConfig(method="linear", epochs=1, results_dir=str(tmp_path)).resolved()
    path = result_path(tmp_path, cfg.run_id())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"status": "ok", "method": "linear"}))
    assert main(args) == 0
    assert "its record has no test top-1" in capsys.readouterr().out
    assert finished_ok(json.loads(path.read_text()))


def test_the_embedded_backbone_brings_its_own_weights_on_any_dataset(tmp_path):
    """BACKBONE=vit_embedded_p7_28 on a folder dataset once asked timm's hub for weights it never had."""
    folder = tmp_path / "data"
    (folder / "train" / "a").mkdir(parents=True)
    cfg = RunConfig(method="linear", dataset="folder", data_root=str(folder), backbone=EMBEDDED_BACKBONE,
                    results_dir=str(tmp_path / "results")).resolved()
    assert cfg.weights == str(EMBEDDED_WEIGHTS)
    scratch = RunConfig(method="linear", backbone=EMBEDDED_BACKBONE, pretrained=False).resolved()
    assert scratch.weights is None


def test_a_backbone_without_hub_weights_asks_for_a_local_file():
    import timm

    with_weights = {name.split(".")[0] for name in timm.list_pretrained("vit_*")}
    bare = next(name for name in timm.list_models("vit_*") if name not in with_weights)
    problems = check_backbone_name(bare, uses_hub=True)
    assert len(problems) == 1 and "WEIGHTS=<file>" in problems[0] and "PRETRAINED=0" in problems[0]
    assert check_backbone_name(bare, uses_hub=False) == []
    assert check_backbone_name("vit_base_patch16_224", uses_hub=True) == []


def test_image_files_whose_names_are_not_utf8_train(tmp_path):
    """A file name in another encoding (kept by Python as surrogates) once stopped the data checks with a bare
    'surrogates not allowed'; such a file is a file like any other."""
    root = os.fsencode(tmp_path / "data")
    rng = np.random.default_rng(0)
    for split in (b"train", b"test"):
        for cls in (b"a", b"b"):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder)
            for i in range(4):
                name = b"\xff\xfe-latin1.png" if (i, cls) == (0, b"a") else b"%d.png" % i
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    os.fsdecode(os.path.join(folder, name)))
    results = tmp_path / "results"
    code = main(["--method", "linear", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--fraction", "1",
                 "--backbone", "vit_tiny_patch16_224", "--pretrained", "0", "--backbone-args", TINY, "--epochs", "1",
                 "--results-dir", str(results)])
    assert code == 0
    (record,) = (results / "runs").rglob("*.json")
    # 2 classes x 4 images, less the val images carved from train: 10% of a class, at least one (datamodules/base.py)
    assert json.loads(record.read_text())["n_train"] == 2 * (4 - 1)
    assert r"\udcff\udcfe-latin1.png" in "".join(p.read_text() for p in (results / "splits").rglob("*.json"))
