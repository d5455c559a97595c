"""What a result records about where it came from: the code's commit (and whether it was dirty), the versions of
the libraries that decide a number, and the run's peak memory."""

from __future__ import annotations

import platform
import resource
import subprocess
from importlib.metadata import version

import lightning as L
import numpy
import timm
import torch
import torchmetrics

from benchmark.core.config import REPO_ROOT


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None

def git_commit() -> str:
    return git("rev-parse", "HEAD") or "unknown"

def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (then `git_commit` alone does not reproduce the run)."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)

def versions() -> dict:
    # peft decides every peft tuner's numbers (its layers, inits): read from its metadata, not imported here
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "lightning": L.__version__, "torchmetrics": torchmetrics.__version__, "numpy": numpy.__version__,
            "peft": version("peft")}

def peak_memory_mb(device: torch.device | None = None) -> float:
    """CUDA's peak allocation on `device` (the current one by default), else this process's peak resident set."""
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
