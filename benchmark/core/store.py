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


def load_runs(results_dir: str | Path) -> pd.DataFrame:
    """Every run JSON below results_dir/runs as one row (nested values dropped, but the config's `tag` kept:
    it tells search points of the selection protocol from final runs)."""
    import pandas as pd

    rows = []
    for path in sorted((Path(results_dir) / "runs").rglob("*.json")):
        result = read_result(path)
        if result is not None:
            flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
            rows.append(flat | {"tag": (result.get("config") or {}).get("tag", ""), "path": str(path)})
    return pd.DataFrame(rows)


def read_summary(results_dir: str | Path) -> pd.DataFrame:
    """results/summary.csv as written by `write_summary` (empty tags stay empty strings, not NaN)."""
    path = Path(results_dir) / "summary.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run a grid first (`make grid`), or point RESULTS= at a "
                                "folder holding runs/ or summary.csv.")
    import pandas as pd

    frame = pd.read_csv(path)
    if "tag" in frame:
        frame["tag"] = frame["tag"].fillna("").astype(str)
    return frame


def write_summary(results_dir: str | Path) -> Path:
    """results/summary.csv: one row per run."""
    frame = load_runs(results_dir)
    path = Path(results_dir) / "summary.csv"
    atomic_write_text(path, frame.to_csv(index=False))
    return path
