"""A full disk (ENOSPC) loses nothing already computed and is said in one line, never a traceback (issue 26): the
fast tests inject the error where the suite writes; the slow one fills a real 2 MiB tmpfs where the machine lets
us mount one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import benchmark.core.features as features
import benchmark.core.pipeline as pipeline
from benchmark.core.config import REPO_ROOT, RunConfig
from benchmark.core.store import result_path, split_path
from benchmark.grid import main as grid_main
from benchmark.run import main

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def linear_args(results: Path, *extra: str) -> list[str]:
    return ["--method", "linear", "--epochs", "1", "--results-dir", str(results), *extra]


def the_result(results: Path) -> Path:
    return result_path(results, RunConfig(method="linear", epochs=1, results_dir=str(results)).resolved().run_id())


def refuse_writes_under(monkeypatch, module, name: str, folder: Path) -> None:
    """`module.name` (the suite's atomic writer as that module calls it) raises ENOSPC for files below `folder`."""
    real = getattr(module, name)

    def write(path, *args, **kwargs):
        if Path(path).is_relative_to(folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, write)


def test_a_result_the_disk_refuses_is_printed_and_the_earlier_result_stays(tmp_path, capsys, monkeypatch):
    assert main(linear_args(tmp_path)) == 0
    path = the_result(tmp_path)
    before = path.read_bytes()
    capsys.readouterr()
    refuse_writes_under(monkeypatch, pipeline, "atomic_write_json", tmp_path / "runs")
    assert main(linear_args(tmp_path, "--force", "1")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"No space left on device writing {str(path)!r}" in err
    printed = json.loads(err.split("here it is:\n", 1)[1].splitlines()[0])  # what the run learned, kept in the log
    assert printed["status"] == "ok" and isinstance(printed["test_top1"], float)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_split_record_the_disk_refuses_is_a_recorded_failure_with_the_reason(tmp_path, capsys, monkeypatch):
    refuse_writes_under(monkeypatch, pipeline, "atomic_write_json", tmp_path / "splits")
    assert main(linear_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    record = json.loads(the_result(tmp_path).read_text())
    split = split_path(tmp_path, RunConfig(method="linear", epochs=1).resolved().run_id())
    assert record["status"] == "failed"
    assert record["error"].startswith(f"OSError: No space left on device writing {str(split)!r}")
    assert "MiB free there" in record["error"]


def test_the_feature_cache_is_best_effort(tmp_path, capsys, monkeypatch):
    refuse_writes_under(monkeypatch, features, "atomic_write", tmp_path / "cache")
    with pytest.warns(UserWarning, match="feature cache not written .*No space left on device"):
        assert main(linear_args(tmp_path)) == 0
    assert json.loads(the_result(tmp_path).read_text())["status"] == "ok"
    assert not (tmp_path / "cache" / "features").exists() or not any((tmp_path / "cache" / "features").iterdir())


def test_a_failure_record_the_disk_refuses_is_one_line(tmp_path, capsys, monkeypatch):
    cfg = RunConfig(method="linear", epochs=1, results_dir=str(tmp_path)).resolved()
    path = result_path(tmp_path, cfg.run_id())
    monkeypatch.setattr(pipeline, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(FULL))
    result = pipeline.record_failure(cfg, path, 0.0, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    err = capsys.readouterr().err
    assert result["status"] == "failed" and "Traceback" not in err
    assert f"the failure could not be recorded: No space left on device writing {str(path)!r}" in err
    assert not path.exists()


def test_a_grid_on_a_full_disk_ends_in_one_line(tmp_path, capsys, monkeypatch):
    import benchmark.core.store as store

    real = store.atomic_write

    def full(path, write):
        if Path(path).is_relative_to(tmp_path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(store, "atomic_write", full)
    code = grid_main(["--methods", "linear", "--fractions", "0.1", "--datasets", "digits", "--epochs", "1",
                      "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert f"error: No space left on device writing {str(tmp_path)!r}" in err
    assert list((tmp_path / "runs").rglob("*.json")) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root and a kernel that allow the mount), unmounted afterwards."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"this machine refuses a tmpfs mount: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


@pytest.mark.slow  # fresh Python processes on a real full filesystem
def test_a_real_full_disk_keeps_finished_results_and_says_so_in_one_line(small_disk):
    results = small_disk / "results"
    command = [sys.executable, "-m", "benchmark.run", *linear_args(results)]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    path = the_result(results)
    before = path.read_bytes()
    fill(small_disk)
    again = subprocess.run([*command, "--force", "1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert again.returncode == 1
    assert "Traceback" not in again.stderr and "No space left on device" in again.stderr
    assert path.read_bytes() == before
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")]
    grid = subprocess.run([sys.executable, "-m", "benchmark.grid", "--methods", "linear,bias", "--fractions", "0.1",
                           "--datasets", "digits", "--epochs", "1", "--results-dir", str(results)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert grid.returncode == 1 and "Traceback" not in grid.stderr
    assert path.read_bytes() == before
