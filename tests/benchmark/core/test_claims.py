"""Run claims (benchmark/core/claims.py): a run is claimed before it trains, so two grids on one results folder split
the work. Claims held by other processes (real subprocesses, one killed with SIGKILL), by another host (a marker
written by hand), the heartbeat, the pipeline's use of the claim, per-attempt log folders, and two grids (and two
searches) on one folder: in threads of this process with the training faked (fast), and as two real
`python -m benchmark.grid` processes (slow)."""

from __future__ import annotations

import csv
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from benchmark.core import claims, pipeline
from benchmark.core.claims import RunClaim, attempt_name, claim_path
from benchmark.core.config import REPO_ROOT, RunConfig
from benchmark.core.store import atomic_write_json, read_result, result_path
from benchmark.core.trainer import loggers
from benchmark.core.validate import validate_config
from benchmark.run import main as run_main
from benchmark.sweeps.runner import run_grid
from benchmark.sweeps.search import SearchGrid, final_config, point_config, run_search, search_tag
from benchmark.sweeps.spec import GridSpec

RUN = "digits/vit_embedded_p7_28/linear/frac0.1_seed0"
# A child process that holds RUN's claim until it reads a line (then lets go) or is killed.
HOLDER = """
import sys
from benchmark.core.claims import RunClaim
claim = RunClaim(sys.argv[1], sys.argv[2])
assert claim.acquire(log_dir="logs/x/attempt-child")
print("held", flush=True)
sys.stdin.readline()
claim.release()
print("released", flush=True)
"""


@pytest.fixture
def holder_process(tmp_path):
    """A live process holding RUN's claim in tmp_path (default lease: 300 s, so nothing here can expire it)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), RUN], cwd=REPO_ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_a_claim_held_by_a_live_process_is_refused_with_its_owner_named(tmp_path, holder_process):
    claim = RunClaim(tmp_path, RUN)
    assert not claim.acquire()
    holder = claim.holder()
    assert (holder.pid, holder.host) == (holder_process.pid, socket.gethostname())
    assert holder.log_dir == "logs/x/attempt-child"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", holder.since)
    assert f"pid {holder_process.pid} on {socket.gethostname()} since {holder.since}" in holder.describe()

    holder_process.stdin.write("\n")  # the holder lets go: the claim is free to take
    holder_process.stdin.flush()
    assert holder_process.stdout.readline() == "released\n"
    assert claim.acquire()
    assert claim.holder().pid == os.getpid()
    claim.release()


def test_the_claim_of_a_process_killed_with_sigkill_is_taken_over_at_once(tmp_path, holder_process):
    """No handler runs on SIGKILL: the marker stays, naming a dead pid on this host. The lease is 300 s, so only the
    owner's death can free the claim now."""
    holder_process.kill()
    holder_process.wait()
    assert claim_path(tmp_path, RUN).is_file()
    claim = RunClaim(tmp_path, RUN)
    assert claim.acquire()
    assert claim.holder().pid == os.getpid()
    claim.release()
    assert not claim_path(tmp_path, RUN).exists()


def foreign_marker(results, seconds_since_heartbeat: float, lease: float) -> None:
    """A claim as filelock writes it for a process on host node-17, last refreshed `seconds_since_heartbeat` ago."""
    path = claim_path(results, RUN)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"filelock/2\npid=4242\nhost=node-17\nmode=lease\ntoken=ab12\nduration={lease!r}\n")
    then = time.time() - seconds_since_heartbeat
    os.utime(path, (then, then))


def test_a_claim_from_another_host_is_kept_while_its_heartbeat_is_fresh(tmp_path):
    foreign_marker(tmp_path, 0, lease=300.0)
    claim = RunClaim(tmp_path, RUN)
    assert not claim.acquire()  # pid 4242 on another host cannot be probed: its heartbeat says it lives
    holder = claim.holder()
    assert (holder.pid, holder.host, holder.since) == (4242, "node-17", None)
    assert holder.heartbeat_age_s < 300


def test_a_claim_from_another_host_without_heartbeat_for_a_lease_is_taken_over(tmp_path, capsys):
    """Its marker is an hour old and its lease 0.5 s (another setting than ours: this contender takes its terms):
    watched for one more lease, unchanged, it is taken over."""
    foreign_marker(tmp_path, 3600, lease=0.5)
    claim = RunClaim(tmp_path, RUN)
    assert claim.acquire()
    assert claim.holder().pid == os.getpid()
    said = capsys.readouterr().err
    assert "pid 4242 on node-17" in said and "looks abandoned" in said
    claim.release()


def test_the_heartbeat_moves_while_the_claim_is_held(tmp_path):
    claim = RunClaim(tmp_path, RUN, lease_seconds=3.0, heartbeat_seconds=0.1)
    assert claim.acquire()
    try:
        path = claim_path(tmp_path, RUN)
        first = path.stat().st_mtime_ns
        deadline = time.monotonic() + 30  # generous: a busy machine delays the thread, never by this much
        while path.stat().st_mtime_ns == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime_ns > first
    finally:
        claim.release()


def test_a_released_claim_can_be_taken_again_and_leaves_no_files(tmp_path):
    first, second = RunClaim(tmp_path, RUN), RunClaim(tmp_path, RUN)
    assert first.acquire(log_dir="logs/a")
    assert not second.acquire()  # this process holds it (another object): live, so refused
    assert second.holder().log_dir == "logs/a"
    first.release()
    assert not claim_path(tmp_path, RUN).exists() and not first.note_path.exists()
    assert second.holder() is None
    assert second.acquire()
    second.release()


# --- the pipeline's use of the claim --------------------------------------------------------------------------
@pytest.fixture
def training(monkeypatch):
    """Stands in for the costly part of `pipeline.run` (data, model, fit, test): writes an ok result (with its config,
    as a run's) and lists the runs it trained."""
    trained = []

    def train_and_record(cfg, run_id, trainer, path, started):
        trained.append(run_id)
        return fake_result(cfg)

    monkeypatch.setattr(pipeline, "train_and_record", train_and_record)
    return trained


VAL = {0.01: 50.0, 0.05: 70.0, 0.1: 60.0}  # a search point's val top-1 by lr: 0.05 wins


def fake_result(cfg: RunConfig) -> dict:
    """An ok result as a run writes it (with its config), val top-1 by lr (VAL), written once: atomically."""
    result = {"method": cfg.method, "seed": cfg.seed, "lr": cfg.lr, "status": "ok", "val_top1": VAL.get(cfg.lr, 50.0),
              "test_top1": 40.0, "wall_seconds": 0.0, "config": asdict(cfg)}
    atomic_write_json(result_path(cfg.results_dir, cfg.run_id()), result)
    return result


def test_run_on_a_claimed_run_returns_claimed_says_who_and_trains_nothing(tmp_path, training, capsys):
    cfg = RunConfig(method="linear", train_fraction=0.1, epochs=1, results_dir=str(tmp_path))
    claim = RunClaim(tmp_path, RUN)
    assert claim.acquire(log_dir="logs/elsewhere")
    try:
        result = pipeline.run(cfg)
        assert result["status"] == "claimed" and result["claimed_by"]["pid"] == os.getpid()
        assert training == [] and not result_path(tmp_path, RUN).exists()
        out = capsys.readouterr().out
        [line] = [line for line in out.splitlines() if line.startswith("Claimed")]
        assert f"pid {os.getpid()}" in line and f"its result will appear at {result_path(tmp_path, RUN)}" in line
        assert f"{tmp_path}/logs/elsewhere" in line
        # `python -m benchmark.run`: nothing to do here, exit 0
        assert run_main(["--method", "linear", "--epochs", "1", "--results-dir", str(tmp_path)]) == 0
        assert training == []
    finally:
        claim.release()
    assert pipeline.run(cfg)["status"] == "ok" and training == [RUN]  # released: this process trains it
    assert not claim_path(tmp_path, RUN).exists()  # and let go of it when done


def test_run_reads_the_result_again_once_claimed(tmp_path, training, monkeypatch, capsys):
    """Another process finished the run and let go between this one's look at the store and its claim: the result
    it wrote is returned as found, nothing trains."""
    real_acquire = RunClaim.acquire

    def finished_just_before(claim, log_dir=None):
        atomic_write_json(result_path(tmp_path, RUN), {"status": "ok", "val_top1": 61.0, "test_top1": 60.0})
        return real_acquire(claim, log_dir)

    monkeypatch.setattr(RunClaim, "acquire", finished_just_before)
    result = pipeline.run(RunConfig(method="linear", train_fraction=0.1, epochs=1, results_dir=str(tmp_path)))
    assert training == [] and result["test_top1"] == 60.0 and isinstance(result, pipeline.FoundResult)
    assert "finished meanwhile by another process" in capsys.readouterr().out
    assert not claim_path(tmp_path, RUN).exists()

    result_path(tmp_path, RUN).unlink()  # a grid counts such a run as done, not as trained by it
    runner = run_grid(GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(epochs=1, results_dir=str(tmp_path))),
                      out=io.StringIO())
    assert training == [] and runner.counts == {"ok": 0, "skipped": 1, "failed": 0, "claimed": 0}


def test_only_rank_zero_claims_a_ddp_run(tmp_path, training, monkeypatch):
    """A rank other than 0 is a re-launched copy of rank 0, which holds the run's claim for all of them: it trains."""
    monkeypatch.setattr(pipeline, "make_trainer", lambda cfg: SimpleNamespace(is_global_zero=False, world_size=2))
    claim = RunClaim(tmp_path, RUN)
    assert claim.acquire()  # rank 0's
    try:
        assert pipeline.run(RunConfig(method="linear", results_dir=str(tmp_path)))["status"] == "ok"
        assert training == [RUN]
    finally:
        claim.release()


def test_two_attempts_log_to_different_folders(tmp_path):
    """Two attempts of one run (two loggers of this process, and another process's attempt name) never share a
    folder, so never a metrics.csv."""
    cfg = RunConfig(method="linear", train_fraction=0.1, results_dir=str(tmp_path))
    first, second = loggers(cfg)[0], loggers(cfg)[0]
    child = subprocess.run([sys.executable, "-c", "from benchmark.core.claims import attempt_name; "
                            "print(attempt_name())"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    names = {os.path.basename(first.log_dir), os.path.basename(second.log_dir), child.stdout.strip()}
    assert len(names) == 3 and all(name.startswith("attempt-") for name in names)
    assert re.fullmatch(rf"attempt-\d{{8}}T\d{{6}}\.\d{{6}}Z-.+-{os.getpid()}", attempt_name())
    for n, logger in enumerate((first, second)):
        assert os.path.dirname(logger.log_dir) == str(tmp_path / "logs" / cfg.run_id())
        logger.log_metrics({"value": n}, step=0)
        logger.save()
    assert [[row["value"] for row in csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv")))]
            for logger in (first, second)] == [["0"], ["1"]]


# --- two grids on one folder ----------------------------------------------------------------------------------
def in_threads(*targets) -> None:
    """Run each target in its own thread at once; re-raise the first error."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as err:  # noqa: BLE001 — re-raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if errors:
        raise errors[0]


def both_training_at_once(monkeypatch) -> None:
    """Wraps the fake training so that each thread's first run waits until the other thread trains one too: at that
    moment the two hold two different runs, or (without claims) the same one twice."""
    barrier, first_done = threading.Barrier(2, timeout=60), threading.local()
    fake = pipeline.train_and_record

    def train_and_record(cfg, run_id, trainer, path, started):
        if not getattr(first_done, "value", False):
            first_done.value = True
            barrier.wait()
        return fake(cfg, run_id, trainer, path, started)

    monkeypatch.setattr(pipeline, "train_and_record", train_and_record)


def test_two_grids_on_one_folder_train_every_run_once(tmp_path, training, monkeypatch):
    """Two grids over the same 4 runs at once (threads of this process, training faked): every run is trained by one
    of them, the other counts it as claimed (or done, when it gets there after the end); no failure."""
    both_training_at_once(monkeypatch)
    spec = GridSpec(["linear", "bias"], [0.1], [0, 1], ["digits"], RunConfig(epochs=1, results_dir=str(tmp_path)))
    runners, outs = {}, {name: io.StringIO() for name in "ab"}
    in_threads(*(lambda name=name: runners.setdefault(name, run_grid(spec, out=outs[name])) for name in "ab"))

    assert sorted(training) == sorted(set(training)) and len(training) == 4  # each run trained exactly once
    for name, runner in runners.items():
        assert runner.counts["failed"] == 0 and runner.counts["ok"] >= 1, outs[name].getvalue()
        assert runner.done == 4 and sum(runner.counts.values()) == 4
    assert runners["a"].counts["ok"] + runners["b"].counts["ok"] == 4
    claimed = [line for out in outs.values() for line in out.getvalue().splitlines() if " claimed " in line]
    assert claimed and all(f"trained by pid {os.getpid()} on " in line for line in claimed)
    assert sum(runner.counts["claimed"] for runner in runners.values()) == len(claimed)
    assert not list((tmp_path / "claims").rglob("*.lock"))  # every claim let go


@pytest.fixture
def searched(monkeypatch, training):
    """The fake training (a search point's val top-1 by its lr); waits for claims polled fast."""
    monkeypatch.setattr(claims, "POLL_SECONDS", 0.05)
    return training


def check_one_search_over_two_processes(results, runners, trained, method) -> None:
    """3 points and 1 final, each trained once, by either search; the final chose lr 0.05 in both views."""
    points = [f"digits/vit_embedded_p7_28/{method}/frac0.1_seed0_{search_tag(lr, 0.0)}" for lr in VAL]
    final = f"digits/vit_embedded_p7_28/{method}/frac0.1_seed0_trainval"
    assert sorted(trained) == sorted(points + [final])  # every run once, none twice
    assert read_result(result_path(results, final))["selected_lr"] == 0.05
    for runner in runners.values():
        assert runner.counts["failed"] == 0 and runner.done == 4
    assert sum(runner.counts["ok"] for runner in runners.values()) == 4


def test_two_searches_on_one_folder_train_each_point_and_final_once(tmp_path, searched, monkeypatch):
    """Points trained one run each (bias): the searches split them, each waits for the points the other holds before
    choosing (a choice needs every point), then they split the finals."""
    both_training_at_once(monkeypatch)
    spec = GridSpec(["bias"], [0.1], [0], ["digits"], RunConfig(epochs=1, results_dir=str(tmp_path)))
    grid = SearchGrid(lrs=tuple(VAL), weight_decays=(0.0,))
    runners = {}
    in_threads(*(lambda name=name: runners.setdefault(name, run_search(spec, grid, out=io.StringIO()))
                 for name in "ab"))
    check_one_search_over_two_processes(tmp_path, runners, searched, "bias")


def test_two_searches_with_one_pass_heads_train_each_point_once(tmp_path, searched, monkeypatch):
    """The linear probe's points train as the heads of one pass (benchmark/sweeps/heads.py, faked here): the pass
    claims every point it trains; the other search finds them claimed and waits for them."""
    from benchmark.sweeps import heads

    someone_waits, first_done = threading.Event(), threading.local()
    real_wait = RunClaim.wait_released

    def wait_released(claim):
        someone_waits.set()
        return real_wait(claim)

    def train_heads(first, configs, one_pass, started):
        if not getattr(first_done, "value", False):  # hold the first pass until the other search waits for it
            first_done.value = True
            someone_waits.wait(timeout=10)
        searched.extend(cfg.run_id() for cfg in configs)
        return [fake_result(cfg) for cfg in configs]

    monkeypatch.setattr(RunClaim, "wait_released", wait_released)
    monkeypatch.setattr(heads, "train_heads", train_heads)
    spec = GridSpec(["linear"], [0.1], [0], ["digits"], RunConfig(epochs=1, results_dir=str(tmp_path)))
    grid = SearchGrid(lrs=tuple(VAL), weight_decays=(0.0,))
    runners = {}
    in_threads(*(lambda name=name: runners.setdefault(name, run_search(spec, grid, out=io.StringIO()))
                 for name in "ab"))
    assert someone_waits.is_set()
    check_one_search_over_two_processes(tmp_path, runners, searched, "linear")


def test_a_final_without_its_record_made_with_the_chosen_settings_is_that_final(tmp_path, training):
    """A search writes a final's result, then adds its selection record. Another search on the folder that looks in
    between must take that result for the final it would train (same lr, wd, every setting) and add the record, not
    train it again; a final made with another lr is trained again."""
    cell = RunConfig(method="bias", epochs=1, results_dir=str(tmp_path))
    spec, grid = GridSpec(["bias"], [0.1], [0], ["digits"], cell), SearchGrid(lrs=tuple(VAL), weight_decays=(0.0,))
    for lr in VAL:
        fake_result(validate_config(point_config(cell, lr, 0.0, 0)))
    fake_result(validate_config(final_config(cell, 0.05, 0.0, 0)))  # the final of the choice, its record not yet added
    runner = run_search(spec, grid, out=io.StringIO())
    final = result_path(tmp_path, "digits/vit_embedded_p7_28/bias/frac0.1_seed0_trainval")
    assert training == [] and runner.counts["skipped"] == 4 and read_result(final)["selected_lr"] == 0.05

    fake_result(validate_config(final_config(cell, 0.1, 0.0, 0)))  # made with another lr, no record
    assert run_search(spec, grid, out=io.StringIO()).counts["ok"] == 1
    assert training == ["digits/vit_embedded_p7_28/bias/frac0.1_seed0_trainval"]
    assert read_result(final)["lr"] == 0.05 and read_result(final)["selected_lr"] == 0.05


@pytest.mark.slow  # two fresh Python processes training 4 real runs between them (~40 s on 2 cores)
def test_two_grid_processes_on_one_folder_train_every_run_once(tmp_path):
    """The fault of issue 26: two `python -m benchmark.grid` on one results folder. Each run is trained once (4 result
    files, 4 `ok` lines over both grids' output), both exit 0, no failure; every attempt has its own log folder."""
    results = tmp_path / "results"
    command = [sys.executable, "-m", "benchmark.grid", "--methods", "linear,bias", "--fractions", "0.1", "--seeds",
               "0,1", "--datasets", "digits", "--epochs", "1", "--results-dir", str(results)]
    outputs = [open(tmp_path / f"out{n}.txt", "w+") for n in range(2)]
    grids = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
             for out in outputs]
    try:
        codes = [grid.wait(timeout=600) for grid in grids]
    finally:
        for grid in grids:
            if grid.poll() is None:
                grid.kill()
    texts = [(tmp_path / f"out{n}.txt").read_text() for n in range(2)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    lines = [line for text in texts for line in text.splitlines() if line.startswith("[grid ")]
    assert sum(" ok " in line for line in lines) == 4 and not any(" failed " in line for line in lines)
    runs = sorted((results / "runs").rglob("*.json"))
    assert len(runs) == 4 and all(read_result(path)["status"] == "ok" for path in runs)
    logs = sorted((results / "logs").rglob("metrics.csv"))
    assert len(logs) == 4 and {str(path.parent.relative_to(results)) for path in logs} == \
        {read_result(path)["log_dir"] for path in runs}
    assert not list((results / "claims").rglob("*.lock"))
