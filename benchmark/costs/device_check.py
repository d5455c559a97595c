"""`make gpu-check`: the suite measured on one accelerator within a fixed time budget, one CSV row per measurement.

On a GPU (ViT-B/16 `vit_base_patch16_224`, random init: speed does not depend on the weights; batch 128), in this
order, so that what matters most is measured first:

1. train and eval images/s and peak memory of the core methods (full, linear, bias, adapter, LoRA, VPT-shallow,
   VPT-deep) in bf16 autocast, eager (`benchmark.costs.model_costs.measure_method`, as `make perf` measures them);
2. full and VPT-deep in fp32;
3. the training loader of a generated FGVC-like JPEG folder (512 images, ~500x375), the PIL path against the
   decoded-image cache, 8 workers, batches delivered to the GPU (`benchmark.costs.loading`);
4. one `make bench`-equivalent run (`benchmark.core.pipeline.run`: VPT-deep on that folder as DATASET=folder, bf16,
   the image cache, 2 epochs);
5. every other registered method in bf16, eager;
6. torch.compile'd bf16 runs (full and VPT-deep first, then the other core methods) while the budget lasts.

Without a GPU the same plan runs at CPU size (a 1-block 32 px ViT, batch 4, one timed step, a 16-image folder, one
compiled method, the linear probe, with torch.compile's graph-capture-only "eager" backend: inductor's code generation
takes minutes on a small CPU), which is what the tests run.

The budget: a measurement starts only if the time left covers the longest of its group so far (a prior before the
first one), else its rows are written as `skipped (budget)`; an alarm at the deadline stops one that overruns (its rows
`stopped (budget)`, the rest skipped). A failing measurement is written as `failed: <error>` and the plan goes on.
The CSV is rewritten atomically after every measurement, so a kill keeps every finished row.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from benchmark.core.config import RunConfig
from benchmark.core.provenance import git_commit
from benchmark.core.store import atomic_write_text
from benchmark.costs.loading import loader_benchmark, loader_data_config, loader_summary, write_jpeg_folder
from benchmark.costs.model_costs import PerfConfig, device_name, measure_method
from benchmark.costs.perf_rows import recipe_settings

CORE_METHODS = ("full", "linear", "bias", "adapter", "lora", "vpt_shallow", "vpt_deep")
FP32_METHODS = ("full", "vpt_deep")  # the comparison the VPT paper is about, in fp32 too
COMPILE_ORDER = ("full", "vpt_deep", "linear", "lora", "adapter", "bias", "vpt_shallow")
END_TO_END_METHOD = "vpt_deep"
NUM_CLASSES = 200  # CUB's: the head's size in the measured models
COLUMNS = ["kind", "method", "precision", "compile", "batch_size", "img_per_s", "step_ms", "peak_mem_mb",
           "loader", "workers", "repeats", "device", "backbone", "img_size", "tuned_params", "flops_per_img",
           "measure_s", "status", "note", "torch", "git_commit", "measured_at"]


@dataclass(frozen=True)
class CheckSize:
    """How big each measurement is: the GPU's sizes, or the CPU form's (the same plan, tiny)."""

    backbone: str
    backbone_kwargs: dict
    batch_size: int
    steps: int  # timed steps per method (median); after `warmup` untimed ones
    warmup: int
    workers: int  # loader workers, for the loader check and the end-to-end run
    loader_images: int  # training images of the generated JPEG folder (val and test: an eighth each)
    loader_repeats: int
    loader_min_seconds: float
    end_to_end_epochs: int
    compile_methods: tuple[str, ...]
    compile_backend: str | None  # None: torch.compile's default (inductor)
    budget_s: float
    priors: dict = field(default_factory=dict)  # seconds expected of each group before one has been measured


GPU_SIZE = CheckSize(backbone="vit_base_patch16_224", backbone_kwargs={}, batch_size=128, steps=10, warmup=3,
                     workers=8, loader_images=512, loader_repeats=3, loader_min_seconds=2.0, end_to_end_epochs=2,
                     compile_methods=COMPILE_ORDER, compile_backend=None, budget_s=420.0,
                     priors={"eager": 15.0, "loader": 60.0, "end_to_end": 90.0, "compile": 150.0})
CPU_SIZE = CheckSize(backbone="vit_tiny_patch16_224",
                     backbone_kwargs=dict(img_size=32, patch_size=8, embed_dim=128, depth=1, num_heads=2),
                     batch_size=4, steps=1, warmup=0, workers=1, loader_images=16, loader_repeats=1,
                     loader_min_seconds=0.0, end_to_end_epochs=1, compile_methods=("linear",),
                     compile_backend="eager", budget_s=600.0,
                     priors={"eager": 5.0, "loader": 20.0, "end_to_end": 30.0, "compile": 30.0})


class BudgetExhausted(BaseException):
    """The deadline passed during a measurement. A BaseException, like KeyboardInterrupt, so that neither a
    run's failure recording nor Lightning's exception handling takes it for a failed measurement."""


@dataclass
class Measurement:
    """One measurement of the plan: what its rows will be (`keys`) and how to take them (`take` returns them)."""

    group: str  # eager, compile, loader, end_to_end: measurements of a group cost alike (the budget's estimate)
    keys: list[dict]
    take: Callable[[], list[dict]]

    def placeholders(self, status: str) -> list[dict]:
        return [key | {"status": status} for key in self.keys]


# --- the measurements ---------------------------------------------------------------------------------------
def method_keys(method: str, precision: str, compile: bool, size: CheckSize) -> list[dict]:
    return [{"kind": kind, "method": method, "precision": precision, "compile": compile,
             "batch_size": size.batch_size, "backbone": size.backbone} for kind in ("train", "eval")]


def measure_rows(method: str, precision: str, compile: bool, size: CheckSize) -> list[dict]:
    """Train and eval rows of one method: `measure_method` on synthetic batches with the method's recipe settings."""
    cfg = PerfConfig(method=method, backbone=size.backbone, backbone_kwargs=size.backbone_kwargs,
                     batch_size=size.batch_size, num_classes=NUM_CLASSES, steps=size.steps, warmup=size.warmup,
                     precision=precision, compile=compile, compile_backend=size.compile_backend,
                     **recipe_settings(method, size.backbone, {}))
    try:
        row = measure_method(cfg)
    finally:
        release_memory(compiled=compile)
    train, evaluation = method_keys(method, precision, compile, size)
    common = {"device": row["device"], "img_size": row["img_size"], "tuned_params": row["tuned_params"],
              "flops_per_img": row["flops_per_img"], "status": "ok"}
    eval_step_ms = 1000 * size.batch_size / row["eval_img_s"]
    return [train | common | {"img_per_s": row["train_img_s"], "step_ms": row["train_step_ms"],
                              "peak_mem_mb": row["peak_mem_mb"]},
            evaluation | common | {"img_per_s": row["eval_img_s"], "step_ms": eval_step_ms,
                                   "peak_mem_mb": row["eval_peak_mem_mb"]}]


def release_memory(compiled: bool) -> None:
    """Free the last measurement's model and graphs, so the next one's peak CUDA memory is its own (on a CPU the
    peak is the process's resident set whatever is freed, and a full collection costs a second there)."""
    if compiled:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def loader_rows(size: CheckSize, folder: Path, workdir: Path, device: torch.device) -> list[dict]:
    rows = loader_benchmark(folder, workdir / "loader-cache", workers=size.workers, batch_size=size.batch_size,
                            repeats=size.loader_repeats, device=device,
                            data_config=loader_data_config(size.backbone, **size.backbone_kwargs),
                            min_seconds=size.loader_min_seconds)
    summary = loader_summary(rows)
    build_s = rows["build_s"].dropna().iloc[0]
    keys = loader_keys(size)
    note = {"pil": f"median of {summary['repeats']} interleaved repeats",
            "cache": f"cache/PIL {summary['cache_ratio']:.2f}x; cache built in {build_s:.1f} s (not timed)"}
    return [key | {"img_per_s": summary[f"{key['loader']}_img_per_s"], "repeats": summary["repeats"],
                   "device": device_name(device), "img_size": rows["input_size"].iloc[0], "status": "ok",
                   "note": note[key["loader"]]} for key in keys]


def loader_keys(size: CheckSize) -> list[dict]:
    return [{"kind": "loader", "loader": name, "workers": size.workers, "batch_size": size.batch_size,
             "backbone": size.backbone} for name in ("pil", "cache")]


def end_to_end_key(size: CheckSize, precision: str) -> dict:
    return {"kind": "end_to_end", "method": END_TO_END_METHOD, "precision": precision, "compile": False,
            "batch_size": size.batch_size, "loader": "cache", "workers": size.workers, "backbone": size.backbone}


def end_to_end_rows(size: CheckSize, precision: str, folder: Path, workdir: Path, device: torch.device) -> list[dict]:
    """One run as `make bench DATASET=folder DATA_ROOT=<the JPEG folder> IMAGE_CACHE=1 ...` runs it (the pipeline's
    `run`, which the entry point calls after parsing): data checks, cache build, training with validation, test."""
    from benchmark.core.pipeline import run

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = RunConfig(method=END_TO_END_METHOD, dataset="folder", data_root=str(folder), train_fraction=1.0,
                    backbone=size.backbone, backbone_kwargs=dict(size.backbone_kwargs), pretrained=False,
                    epochs=size.end_to_end_epochs, warmup_epochs=0, batch_size=size.batch_size,
                    num_workers=size.workers, precision=precision, image_cache=True,
                    results_dir=str(workdir / "results"), force=True)
    try:
        with torch_flags_kept():
            result = run(cfg)
    finally:
        release_memory(compiled=False)
    if result.get("status") != "ok":
        raise RuntimeError(result.get("error", "the run failed"))
    trained = result["n_train"] * size.end_to_end_epochs
    note = (f"{size.end_to_end_epochs} epochs of {result['n_train']} images in {result['wall_seconds']:.1f} s (setup, "
            f"cache build, validation and test included); test top-1 {result['test_top1']:.1f}")
    return [end_to_end_key(size, precision) | {"img_per_s": trained / result["wall_seconds"],
                                               "peak_mem_mb": result["peak_memory_mb"], "device": device_name(device),
                                               "status": "ok", "note": note}]


@contextmanager
def torch_flags_kept() -> Iterator[None]:
    """The run's Trainer (deterministic=True) switches the whole process to deterministic algorithms and cuDNN's
    deterministic mode; the measurements after it must run as `make perf` runs them, with torch's defaults."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def check_plan(size: CheckSize, workdir: Path, device: torch.device, methods: list[str]) -> list[Measurement]:
    """The measurements in the order of the module docstring."""
    half = "bf16-mixed"
    folder = workdir / "jpeg"

    def method(name: str, precision: str = half, compile: bool = False) -> Measurement:
        return Measurement("compile" if compile else "eager", method_keys(name, precision, compile, size),
                           lambda: measure_rows(name, precision, compile, size))

    def with_folder(take: Callable[[], list[dict]]) -> Callable[[], list[dict]]:
        def first_write_the_folder() -> list[dict]:
            if not folder.is_dir():
                write_jpeg_folder(folder, n_train=size.loader_images, n_eval=max(size.loader_images // 8, 2))
            return take()
        return first_write_the_folder

    core = [name for name in CORE_METHODS if name in methods]
    return [*(method(name) for name in core), *(method(name, "32") for name in FP32_METHODS if name in methods),
            Measurement("loader", loader_keys(size), with_folder(lambda: loader_rows(size, folder, workdir, device))),
            Measurement("end_to_end", [end_to_end_key(size, half)],
                        with_folder(lambda: end_to_end_rows(size, half, folder, workdir, device))),
            *(method(name) for name in methods if name not in core),
            *(method(name, compile=True) for name in size.compile_methods if name in methods)]


# --- the budgeted runner ---------------------------------------------------------------------------------------
@contextmanager
def alarm_after(seconds: float) -> Iterator[None]:
    """Raise BudgetExhausted in the main thread after `seconds` (SIGALRM); elsewhere only the estimates guard."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise BudgetExhausted(f"the {seconds:.0f} s budget is spent")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_rows(path: Path, rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))
    return frame


def run_plan(plan: list[Measurement], out: Path, budget_s: float, priors: dict,
             clock: Callable[[], float] = time.monotonic) -> pd.DataFrame:
    """Take the plan's measurements in order within `budget_s` (see the module docstring); returns the rows."""
    deadline = clock() + budget_s
    longest: dict[str, float] = {}
    stamp = {"torch": torch.__version__, "git_commit": git_commit(), "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    taken: dict[int, list[dict]] = {}  # measurement index -> its rows; one assignment each, so an alarm splits none
    running = None

    def rows(unfinished: str = "skipped (budget)") -> list[dict]:
        return [row | stamp for index, measurement in enumerate(plan) for row in taken.get(index) or
                measurement.placeholders("stopped (budget)" if index == running else unfinished)]

    try:
        with alarm_after(budget_s):
            for index, measurement in enumerate(plan):
                left = deadline - clock()
                estimate = longest.get(measurement.group, priors.get(measurement.group, 0.0))
                if left < estimate or left <= 0:
                    taken[index] = measurement.placeholders("skipped (budget)")
                    print(f"skipped ({left:.0f} s left, ~{estimate:.0f} s needed): {describe(measurement)}", flush=True)
                    continue
                running, start = index, clock()
                try:
                    measured = measurement.take()
                except Exception as err:  # noqa: BLE001 — recorded as this measurement's rows; the plan goes on
                    measured = measurement.placeholders(f"failed: {type(err).__name__}: {str(err)[:300]}")
                seconds = clock() - start
                longest[measurement.group] = max(longest.get(measurement.group, 0.0), seconds)
                taken[index] = [row | {"measure_s": seconds} for row in measured]
                running = None
                write_rows(out, rows(unfinished="not reached yet"))
                print(f"[{index + 1}/{len(plan)}] {seconds:6.1f} s  {describe(measurement)}: {summary_of(measured)}",
                      flush=True)
    except BudgetExhausted:
        print(f"the {budget_s:.0f} s budget was spent" + (f" during {describe(plan[running])}: stopped"
                                                          if running is not None else ""), flush=True)
    return write_rows(out, rows())


def summary_of(rows: list[dict]) -> str:
    return ", ".join(f"{row['kind']} {row['img_per_s']:,.0f} img/s" if isinstance(row.get("img_per_s"), float)
                     and math.isfinite(row["img_per_s"]) else f"{row['kind']} {row['status']}" for row in rows)


def describe(measurement: Measurement) -> str:
    key = measurement.keys[0]
    if key["kind"] == "loader":
        return f"loader, PIL vs cache, {key['workers']} workers"
    compiled = ", compiled" if key.get("compile") else ""
    what = "end_to_end" if key["kind"] == "end_to_end" else "method"
    return f"{what} {key.get('method')} {key.get('precision', '')}{compiled}"


def check_size() -> CheckSize:
    """The GPU's sizes where one is visible, else the CPU form's."""
    return GPU_SIZE if torch.cuda.is_available() else CPU_SIZE


def run_check(out: str | Path, workdir: str | Path, size: CheckSize, budget_s: float | None = None,
              methods: list[str] | None = None) -> pd.DataFrame:
    """The whole check at `size` into `out` (see the module docstring); `workdir` holds the JPEG folder, the caches
    and the end-to-end run's results."""
    from methods import list_methods

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where measure_method and Lightning run
    plan = check_plan(size, Path(workdir), device, methods or list_methods())
    return run_plan(plan, Path(out), size.budget_s if budget_s is None else budget_s, size.priors)
