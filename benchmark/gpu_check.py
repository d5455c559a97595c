"""`make gpu-check`: per method, ViT-B/16 train and eval images/s and peak memory at batch 128 (bf16, fp32 for full and
VPT-deep, with and without torch.compile), the loader's images/s (PIL path and decoded-image cache, 8 workers) and one
end-to-end run on a generated JPEG folder, within a time budget, into results/gpu_check.csv. Without a GPU the same
plan runs at CPU size. The plan, the budget and the columns: benchmark/costs/device_check.py.

    python -m benchmark.gpu_check [--budget-s 420] [--out results/gpu_check.csv] [--methods full,vpt_deep]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass

from benchmark.core.cli import add_settings, comma_list
from benchmark.core.config import setting
from benchmark.costs.device_check import check_size, run_check


def positive_seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise ValueError(f"BUDGET_S must be a positive number of seconds, got {text}; e.g. BUDGET_S=420")
    return seconds


@dataclass
class GpuCheckSettings:
    """The flags of `make gpu-check`, each declared once (benchmark.core.cli.add_settings)."""

    out: str = setting("results/gpu_check.csv", "the CSV of the measurements")
    budget_s: float | None = setting(None, "stop cleanly after this many seconds of measuring (default: 420 on a GPU, "
                                     "so the whole script fits 8 minutes; 600 on a CPU)", parse=positive_seconds)
    methods: list | None = setting(None, "a subset of the registered methods (default: all)", parse=comma_list(str))
    workdir: str | None = setting(None, "where the JPEG folder, caches and the run go (default: a temporary folder)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, GpuCheckSettings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = GpuCheckSettings(**vars(parser().parse_args(argv)))
    from methods import list_methods

    unknown = sorted(set(args.methods or []) - set(list_methods()))
    if unknown:
        print(f"error: unknown method(s) {unknown}; METHODS takes a comma list of {', '.join(list_methods())}.",
              file=sys.stderr)
        return 2
    size = check_size()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        frame = run_check(args.out, args.workdir or tmp, size, args.budget_s, args.methods)
    ok = frame["status"].eq("ok")
    others = ", ".join(f"{count} {status}" for status, count in frame.loc[~ok, "status"].value_counts().items())
    print(f"{int(ok.sum())} of {len(frame)} rows measured{f' ({others})' if others else ''} in "
          f"{time.monotonic() - start:.0f} s on {size.backbone}, batch {size.batch_size} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
