"""The results store's rules: an atomic write flushes and fsyncs the temp file before renaming it over the result
(else a crash can leave a renamed but empty file), a failed write keeps the old file; the summary's rows."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from benchmark.core import store
from benchmark.core.store import (
    atomic_write_json,
    atomic_write_text,
    load_runs,
    read_result,
    read_summary,
    write_summary,
)


def test_fsync_of_the_written_temp_file_comes_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "r.json"
    atomic_write_text(path, "old\n")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        stat = os.fstat(fd)
        calls.append(("fsync", (stat.st_dev, stat.st_ino), stat.st_size))  # size: what reached the file
        return real_fsync(fd)

    def replace(src, dst):
        stat = os.stat(src)
        calls.append(("replace", (stat.st_dev, stat.st_ino), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    text = '{"status": "ok", "test_top1": 12.5}\n'
    atomic_write_text(path, text)

    assert [name for name, *_ in calls] == ["fsync", "replace"]
    (_, synced, size), (_, renamed, target) = calls
    assert synced == renamed  # the file fsynced is the temp file that is renamed ...
    assert size == len(text)  # ... after its contents were flushed to it ...
    assert target == str(path) and path.read_text() == text  # ... over the result
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


@pytest.mark.parametrize("crash_in", ["fsync", "replace"])
def test_a_crash_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, crash_in):
    path = tmp_path / "runs" / "r.json"
    atomic_write_json(path, {"status": "ok", "test_top1": 50.0})
    before = path.read_bytes()

    def crash(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, crash_in, crash)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_json(path, {"status": "ok", "test_top1": 99.0})
    assert path.read_bytes() == before and read_result(path)["test_top1"] == 50.0
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_read_result_of_missing_or_damaged_files_is_none(tmp_path):
    assert read_result(tmp_path / "absent.json") is None
    (tmp_path / "half.json").write_text('{"status": "o')
    assert read_result(tmp_path / "half.json") is None


def test_summary_has_one_flat_row_per_run_with_the_tag(tmp_path):
    results = tmp_path / "results"
    atomic_write_json(store.result_path(results, "digits/b/linear/frac0.1_seed0"),
                      {"method": "linear", "status": "ok", "test_top1": 40.0, "config": {"tag": ""}, "ids": [1, 2]})
    atomic_write_json(store.result_path(results, "digits/b/linear/frac0.1_seed0_search_lr1_wd0"),
                      {"method": "linear", "status": "failed", "error": "E", "config": {"tag": "search_lr1_wd0"}})
    (results / "runs" / "digits" / "b" / "linear" / "broken.json").write_text("{")  # unreadable: left out
    frame = load_runs(results)
    assert len(frame) == 2 and "config" not in frame and "ids" not in frame
    assert sorted(frame["tag"]) == ["", "search_lr1_wd0"]
    write_summary(results)
    summary = read_summary(results)
    assert summary["tag"].tolist() == ["", "search_lr1_wd0"]  # an empty tag reads back as "", not NaN
    assert summary.set_index("tag").loc["", "test_top1"] == 40.0
    assert pd.isna(summary.set_index("tag").loc["search_lr1_wd0", "test_top1"])
    with pytest.raises(FileNotFoundError, match="make grid"):
        read_summary(tmp_path / "empty")
    assert json.loads((results / "runs" / "digits" / "b" / "linear" / "frac0.1_seed0.json").read_text())["ids"] == [
        1, 2]
