"""The results store: one JSON per run under results/runs/, written atomically, and the summary."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from benchmark.core.errors import ConfigError

if TYPE_CHECKING:  # pandas is imported where a table is built: a single run (`make bench`) never needs its 0.5 s
    import pandas as pd


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temp file in the same folder, fsync, then rename over `path`: readers (and a run that
    crashed or was killed mid-write) see the old file or the new one, never half of one. The suite's one writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide results from the rest of a lab
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Errors of a full, read-only or forbidden results folder: reported in one line, never as a traceback.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EIO}


def is_storage_error(err: BaseException) -> bool:
    """A full, read-only or forbidden disk: said in one line, without a traceback."""
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def storage_problem(err: OSError, path: str | Path | None = None) -> str:
    """One line for an OSError met while writing: the reason, the file (the error's own, else `path`: a plain
    os.write names none) and, for a full disk, the space left and what to do."""
    where = Path(err.filename or path or ".")
    line = f"{err.strerror or err} writing {str(where)!r}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        existing = next((p for p in (where, *where.parents) if p.exists()), Path("."))
        line += (f" ({shutil.disk_usage(existing).free / 2**20:.1f} MiB free there): free some space or point RESULTS= "
                 "at another disk, then run the same command again (finished results are kept)")
    return line


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def check_results_dir(value) -> str:
    """RESULTS as a non-empty folder name: an empty one would scatter runs, splits and logs over the working folder
    and the filesystem root."""
    if value is None or not str(value).strip():
        raise ConfigError("RESULTS is empty: name the results folder, e.g. RESULTS=results (the default when RESULTS "
                          "is not given) or RESULTS=/scratch/$USER/vpt-results.")
    return str(value)


# A file-name part may take 255 bytes (NAME_MAX); the atomic writer adds ".<name>.<8 random>.tmp" and a suffix.
MAX_NAME_BYTES = 200


def results_path(results_dir: str | Path, *parts: str) -> Path:
    """`results_dir/parts...`, the one way the suite builds a path it writes: refuses an empty results folder, a part
    that is empty, '.', '..', absolute or longer than MAX_NAME_BYTES, and anything that resolves outside the folder."""
    root = Path(check_results_dir(results_dir))
    names = [name for part in parts for name in str(part).split("/")]
    for name in names:
        if name in ("", ".", "..") or "\0" in name or len(os.fsencode(name)) > MAX_NAME_BYTES:
            shown = name if len(name) <= 40 else f"{name[:40]}... ({len(os.fsencode(name))} bytes)"
            raise ConfigError(f"The run's file path {'/'.join(names)[:120]!r} has a bad part {shown!r} (parts must be "
                              f"non-empty names of at most {MAX_NAME_BYTES} bytes, not '.' or '..'); shorten TAG= or "
                              "the option values that name the run.")
    path = root.joinpath(*names)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{str(path)!r} would lie outside the results folder {str(root)!r} (a link inside it points "
                          "elsewhere); remove the link or choose another RESULTS=.")
    return path


def result_path(results_dir: str | Path, run_id: str) -> Path:
    return results_path(results_dir, "runs", f"{run_id}.json")


def split_path(results_dir: str | Path, run_id: str) -> Path:
    """The run's exact training ids and labels (its split record)."""
    return results_path(results_dir, "splits", f"{run_id}.json")


def log_dir(results_dir: str | Path, run_id: str) -> Path:
    """The folder of the run's per-epoch logs (one folder per attempt below it)."""
    return results_path(results_dir, "logs", run_id)


def read_result(path: str | Path) -> dict | None:
    """A run's result, or None when absent, unreadable or not a run record (never raises on a damaged file)."""
    try:
        with open(path, "rb") as f:
            result = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return result if isinstance(result, dict) else None


def finished_ok(result: dict | None) -> bool:
    """A result a run or grid may skip: status ok with a test top-1 (a record without it is redone, not trusted)."""
    if not result or result.get("status") != "ok":
        return False
    top1 = result.get("test_top1")
    return isinstance(top1, (int, float)) and not isinstance(top1, bool)


# why a run file is left out of a report: the first three by load_runs, the last by the report (its row stays)
CORRUPT, NOT_A_RECORD, UNREADABLE, FAILED = "corrupt", "not a run record", "unreadable", "failed run"
SKIP_REASONS = (CORRUPT, NOT_A_RECORD, UNREADABLE, FAILED)


def load_runs(results_dir: str | Path) -> pd.DataFrame:
    """Every run JSON below results_dir/runs as one row (nested values dropped, but the config's `tag` kept:
    it tells search points of the selection protocol from final runs). A failed run keeps its row (status failed).
    The files left out are in `frame.attrs["skipped"]`, one (path, reason, detail) each, reason one of SKIP_REASONS'
    first three; `frame.attrs["files"]` counts the files read."""
    import pandas as pd

    rows, skipped = [], []
    paths = sorted((Path(results_dir) / "runs").rglob("*.json"))
    for path in paths:
        try:
            result = json.loads(path.read_bytes())
        except OSError as err:  # permissions, a folder named *.json
            skipped.append((str(path), UNREADABLE, f"{type(err).__name__}: {err.strerror or err}"))
            continue
        except ValueError as err:  # not JSON, or not UTF-8 (UnicodeDecodeError)
            skipped.append((str(path), CORRUPT, f"{type(err).__name__}: {err}"))
            continue
        if not isinstance(result, dict) or "status" not in result:
            detail = "an object without a status" if isinstance(result, dict) else f"a JSON {type(result).__name__}"
            skipped.append((str(path), NOT_A_RECORD, detail))
            continue
        flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        config = result.get("config") if isinstance(result.get("config"), dict) else {}
        rows.append(flat | {"tag": config.get("tag", ""), "path": str(path)})
    frame = pd.DataFrame(rows)
    frame.attrs |= {"skipped": skipped, "files": len(paths)}
    return frame


BUDGET_DIR = "budget"  # <results>/budget/: one budget record per search cell (benchmark/sweeps/budget.py)


def read_budgets(results_dir: str | Path) -> list[dict]:
    """Every search cell's budget record under `<results_dir>/budget/`, in path order."""
    folder = Path(results_dir) / BUDGET_DIR
    return [json.loads(path.read_text()) for path in sorted(folder.rglob("*.json"))] if folder.is_dir() else []


def read_summary(results_dir: str | Path) -> pd.DataFrame:
    """results/summary.csv as written by `write_summary` (empty tags stay empty strings, not NaN)."""
    path = Path(results_dir) / "summary.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run a grid first (`make grid`), or point RESULTS= at a "
                                "folder holding runs/ or summary.csv.")
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:  # written from a runs/ folder without one run record
        return pd.DataFrame()
    except (UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ValueError(f"{path} is not a summary table ({type(err).__name__}: {err}).") from err
    if "tag" in frame:
        frame["tag"] = frame["tag"].fillna("").astype(str)
    return frame


def write_summary(results_dir: str | Path, frame: pd.DataFrame | None = None) -> Path:
    """results/summary.csv: one row per run (`frame`: load_runs(results_dir) already read)."""
    frame = load_runs(results_dir) if frame is None else frame
    path = Path(results_dir) / "summary.csv"
    atomic_write_text(path, frame.to_csv(index=False))
    return path
