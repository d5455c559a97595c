"""`make gpu-check` (benchmark.gpu_check): its plan covers every registered method, its CPU form runs end to end into
a CSV of the promised shape, and its budget stops it cleanly with every finished row kept. No speed thresholds."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pandas as pd
import pytest
import torch

from benchmark import gpu_check
from benchmark.costs import device_check
from benchmark.costs.device_check import (
    COLUMNS,
    CORE_METHODS,
    CPU_SIZE,
    FP32_METHODS,
    GPU_SIZE,
    Measurement,
    check_plan,
    run_check,
    run_plan,
)
from methods import list_methods


def expected_counts(methods: list[str], compile_methods) -> dict[str, int]:
    """Rows per kind: each method in bf16, the fp32 pair, the compiled ones (train and eval each); two loaders (PIL,
    cache); one end-to-end run."""
    per_kind = len(methods) + len([m for m in FP32_METHODS if m in methods]) + len(
        [m for m in compile_methods if m in methods])
    return {"train": per_kind, "eval": per_kind, "loader": 2, "end_to_end": 1}


def key_counts(plan) -> dict[str, int]:
    return pd.Series([key["kind"] for m in plan for key in m.keys]).value_counts().to_dict()


@pytest.mark.parametrize("size", [GPU_SIZE, CPU_SIZE], ids=["gpu", "cpu"])
def test_plan_covers_every_registered_method(tmp_path, size):
    methods = list_methods()
    plan = check_plan(size, tmp_path, device=None, methods=methods)
    assert key_counts(plan) == expected_counts(methods, size.compile_methods)
    bf16_eager = [k["method"] for m in plan for k in m.keys if k["kind"] == "train" and k["precision"] == "bf16-mixed"
                  and not k["compile"]]
    assert sorted(bf16_eager) == sorted(methods)
    assert bf16_eager[: len(CORE_METHODS)] == list(CORE_METHODS)  # what matters most is measured first
    fp32 = [k["method"] for m in plan for k in m.keys if k["kind"] == "train" and k["precision"] == "32"]
    assert fp32 == list(FP32_METHODS)
    groups = [m.group for m in plan]
    assert groups.index("loader") < groups.index("end_to_end") < len(CORE_METHODS) + len(FP32_METHODS) + 2
    assert groups[-len(size.compile_methods):] == ["compile"] * len(size.compile_methods)


def test_gpu_sizes_are_the_issues():
    assert (GPU_SIZE.backbone, GPU_SIZE.batch_size, GPU_SIZE.workers) == ("vit_base_patch16_224", 128, 8)
    assert GPU_SIZE.compile_methods[:2] == ("full", "vpt_deep") and GPU_SIZE.budget_s + 60 <= 8 * 60


def check_frame(frame: pd.DataFrame, methods: list[str], compile_methods) -> None:
    assert list(frame.columns) == COLUMNS
    assert frame["kind"].value_counts().to_dict() == expected_counts(methods, compile_methods)
    assert (frame["status"] == "ok").all(), frame.loc[frame["status"] != "ok", ["kind", "method", "status"]]
    assert all(math.isfinite(v) and v > 0 for v in frame["img_per_s"])
    assert all(math.isfinite(v) and v > 0 for v in frame["measure_s"])
    with_memory = frame[frame["kind"] != "loader"]
    assert all(math.isfinite(v) and v > 0 for v in with_memory["peak_mem_mb"])
    models = frame[frame["kind"].isin(["train", "eval"])]
    assert all(math.isfinite(v) and v > 0 for v in models["step_ms"]) and (models["tuned_params"] > 0).all()
    assert (models["img_size"].astype(int) == CPU_SIZE.backbone_kwargs["img_size"]).all()  # the tiny ViT was built
    assert set(frame.loc[frame["kind"] == "loader", "loader"]) == {"pil", "cache"}
    assert set(frame.loc[frame["compile"] == True, "method"]) == set(compile_methods) & set(methods)  # noqa: E712


def test_cpu_form_runs_end_to_end_into_the_csv(tmp_path):
    """Three methods (two with fp32 rows, one compiled), the loader pair and the end-to-end run: every row measured,
    positive and finite, and the file on disk is the frame returned."""
    methods = ["full", "linear", "vpt_deep"]
    out = tmp_path / "gpu_check.csv"
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # torch's default, as `make gpu-check` starts
    try:
        frame = run_check(out, tmp_path / "work", CPU_SIZE, methods=methods)
        # the end-to-end run's Trainer (deterministic=True) must not leave the measurements after it deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
    check_frame(frame, methods, CPU_SIZE.compile_methods)
    on_disk = pd.read_csv(out)
    assert len(on_disk) == len(frame) and list(on_disk.columns) == COLUMNS
    assert on_disk.loc[on_disk["kind"] == "end_to_end", "method"].item() == "vpt_deep"


@pytest.mark.slow
def test_cpu_form_measures_every_registered_method(tmp_path):
    methods = list_methods()
    frame = run_check(tmp_path / "gpu_check.csv", tmp_path / "work", CPU_SIZE)
    check_frame(frame, methods, CPU_SIZE.compile_methods)


def test_entry_point_rejects_unknown_methods_and_a_bad_budget(capsys):
    assert gpu_check.main(["--methods", "vpt_deeep"]) == 2
    assert "unknown method(s) ['vpt_deeep']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # argparse's exit: the flag's own check, before anything runs
        gpu_check.main(["--budget-s", "0"])
    assert stopped.value.code == 2
    assert "BUDGET_S must be a positive number of seconds" in capsys.readouterr().err


# --- the budget ------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake(group: str, name: str, seconds: float, clock: FakeClock, seen: list | None = None, out=None) -> Measurement:
    def take():
        if seen is not None:  # the finished rows on disk when this measurement started
            seen.append(int(pd.read_csv(out)["status"].eq("ok").sum()) if out.is_file() else 0)
        clock.now += seconds
        return [{"kind": "train", "method": name, "img_per_s": 1.0, "status": "ok"}]

    return Measurement(group, [{"kind": "train", "method": name}], take)


def test_a_measurement_that_would_not_fit_is_skipped_and_the_csv_grows_as_it_goes(tmp_path):
    """Budget 100 s; the eager group's estimate is its prior (10 s), then its longest so far. a (20 s) and b (30 s)
    fit; c (25 s) starts with 50 s left against an estimate of 30 s; then 25 s are left, less than either estimate:
    d (eager, longest 30 s) and e (compile, prior 50 s) are skipped without being started. Each measurement starts
    with the rows before it on disk (the others marked as not reached), as a kill would leave them."""
    clock, seen, out = FakeClock(), [], tmp_path / "check.csv"
    plan = [fake("eager", "a", 20, clock, seen, out), fake("eager", "b", 30, clock, seen, out),
            fake("eager", "c", 25, clock, seen, out), fake("eager", "d", 1, clock, seen, out),
            fake("compile", "e", 1, clock, seen, out)]
    frame = run_plan(plan, out, budget_s=100, priors={"eager": 10, "compile": 50}, clock=clock)
    assert frame["status"].tolist() == ["ok", "ok", "ok", "skipped (budget)", "skipped (budget)"]
    assert frame["measure_s"].tolist()[:3] == [20, 30, 25] and seen == [0, 1, 2]
    assert pd.read_csv(out)["method"].tolist() == ["a", "b", "c", "d", "e"]


def test_a_killed_check_leaves_its_finished_rows_and_marks_the_rest(tmp_path):
    """The file after the second of three measurements, as a SIGKILL during the third would leave it."""
    clock, out, on_disk = FakeClock(), tmp_path / "check.csv", []
    plan = [fake("eager", "a", 1, clock), fake("eager", "b", 1, clock),
            Measurement("eager", [{"kind": "train", "method": "c"}],
                        lambda: on_disk.append(pd.read_csv(out)) or [{"kind": "train", "method": "c", "status": "ok"}])]
    run_plan(plan, out, budget_s=100, priors={}, clock=clock)
    assert on_disk[0]["status"].tolist() == ["ok", "ok", "not reached yet"]
    assert on_disk[0]["img_per_s"].tolist()[:2] == [1.0, 1.0]


def test_a_first_measurement_longer_than_its_prior_is_refused_when_the_prior_does_not_fit(tmp_path):
    clock = FakeClock()
    plan = [fake("eager", "a", 1, clock), fake("compile", "big", 1, clock)]
    frame = run_plan(plan, tmp_path / "c.csv", budget_s=30, priors={"eager": 1, "compile": 60}, clock=clock)
    assert frame["status"].tolist() == ["ok", "skipped (budget)"]


def test_the_deadline_stops_an_overrunning_measurement_and_keeps_the_rows_before_it(tmp_path):
    """A real alarm: the second measurement would sleep 30 s in a 1 s budget; it is stopped at the deadline, the third
    is not started, and the script returns well before the sleep would have ended."""
    started = []

    def quick():
        started.append("quick")
        return [{"kind": "train", "method": "quick", "img_per_s": 5.0, "status": "ok"}]

    def sleeper():
        started.append("sleeper")
        time.sleep(30)
        return []

    plan = [Measurement("eager", [{"kind": "train", "method": "quick"}], quick),
            Measurement("eager", [{"kind": "train", "method": "sleeper"}], sleeper),
            Measurement("eager", [{"kind": "eval", "method": "never"}], lambda: started.append("never") or [])]
    begin = time.monotonic()
    frame = run_plan(plan, tmp_path / "c.csv", budget_s=1.0, priors={})
    assert time.monotonic() - begin < 10 and started == ["quick", "sleeper"]
    assert frame["status"].tolist() == ["ok", "stopped (budget)", "skipped (budget)"]
    assert pd.read_csv(tmp_path / "c.csv")["img_per_s"].iloc[0] == 5.0


def test_a_failing_measurement_is_recorded_and_the_plan_goes_on(tmp_path):
    def broken():
        raise RuntimeError("CUDA out of memory")

    clock = FakeClock()
    plan = [Measurement("eager", [{"kind": "train", "method": "boom"}, {"kind": "eval", "method": "boom"}], broken),
            fake("eager", "after", 1, clock)]
    frame = run_plan(plan, tmp_path / "c.csv", budget_s=100, priors={}, clock=clock)
    assert frame["status"].tolist()[:2] == ["failed: RuntimeError: CUDA out of memory"] * 2
    assert frame["status"].iloc[2] == "ok" and frame["method"].tolist() == ["boom", "boom", "after"]


def test_a_spent_budget_skips_everything_cleanly(tmp_path):
    plan = check_plan(replace(CPU_SIZE), tmp_path, device=None, methods=["full", "vpt_deep"])
    frame = run_plan(plan, tmp_path / "c.csv", budget_s=0, priors=CPU_SIZE.priors)
    assert (frame["status"] == "skipped (budget)").all()
    assert frame["kind"].value_counts().to_dict() == expected_counts(["full", "vpt_deep"], CPU_SIZE.compile_methods)


def test_budget_exhausted_is_not_an_exception_a_run_would_record():
    assert not issubclass(device_check.BudgetExhausted, Exception)
