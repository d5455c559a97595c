"""The results store: one JSON per run under results/runs/, written atomically, and the summary."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # pandas is imported where a table is built: a single run (`make bench`) never needs its 0.5 s
    import pandas as pd


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temp file in the same folder, fsync, then rename over `path`: readers (and a run that
    crashed or was killed mid-write) see the old file or the new one, never half of one. The suite's one writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def result_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / "runs" / f"{run_id}.json"


def read_result(path: str | Path) -> dict | None:
    """A run's result, or None when absent or unreadable (never raises on a damaged file)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


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
