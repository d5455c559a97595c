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


def test_load_runs_names_every_file_it_leaves_out(tmp_path, monkeypatch):
    results = tmp_path / "results"
    runs = results / "runs"
    atomic_write_json(runs / "ok.json", {"method": "linear", "status": "ok", "test_top1": 40.0})
    atomic_write_json(runs / "failed.json", {"method": "linear", "status": "failed", "error": "RuntimeError: boom"})
    (runs / "list.json").write_text("[1, 2]")
    (runs / "string.json").write_text('"ok"')
    (runs / "nostatus.json").write_text('{"method": "linear"}')
    (runs / "cut.json").write_text('{"status": "o')
    (runs / "latin1.json").write_bytes(b'{"status": "ok", "method": "caf\xe9"}')
    locked = runs / "locked.json"
    atomic_write_json(locked, {"method": "linear", "status": "ok", "test_top1": 99.0})
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway: inject the error it would meet
        real = type(locked).read_bytes

        def read_bytes(self):
            if self.name == "locked.json":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(type(locked), "read_bytes", read_bytes)
    frame = load_runs(results)
    locked.chmod(0o644)

    assert sorted(frame["path"].map(lambda p: p.rsplit("/", 1)[1])) == ["failed.json", "ok.json"]  # a failed run: a row
    skipped = {path.rsplit("/", 1)[1]: (reason, detail) for path, reason, detail in frame.attrs["skipped"]}
    assert skipped["list.json"] == (store.NOT_A_RECORD, "a JSON list")
    assert skipped["string.json"] == (store.NOT_A_RECORD, "a JSON str")
    assert skipped["nostatus.json"] == (store.NOT_A_RECORD, "an object without a status")
    assert skipped["cut.json"][0] == store.CORRUPT and skipped["cut.json"][1].startswith("JSONDecodeError")
    assert skipped["latin1.json"][0] == store.CORRUPT and skipped["latin1.json"][1].startswith("UnicodeDecodeError")
    assert skipped["locked.json"] == (store.UNREADABLE, "PermissionError: Permission denied")
    assert len(skipped) == 6 and frame.attrs["files"] == 8


def test_summary_of_runs_without_a_record_and_of_a_damaged_summary(tmp_path):
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "list.json").write_text("[]")
    write_summary(results)  # no row, no column: reads back as an empty table
    assert read_summary(results).empty
    (results / "summary.csv").write_bytes(b"status,test_top1\n\xff\xfe,1\n")
    with pytest.raises(ValueError, match="summary.csv is not a summary table"):
        read_summary(results)
