"""Run claims: which process trains a run, so that two grids on one results folder (two `make grid`s, a grid and a
SLURM array, `make bench` twice) split the work instead of both training every run and colliding on its files.

A run is claimed before it trains: `<results>/claims/<run_id>.lock`, created atomically, holds its owner (pid, host,
a process start token, a lease token) and is refreshed (its mtime touched) by a heartbeat thread while the run
trains; `<run_id>.owner.json` beside it adds when the claim was taken and the attempt's log folder, for messages.
Another process that finds the claim held by a live owner leaves the run to it. The claim is released (both files
removed) when the run ends, ok or failed.

Why filelock's SoftFileLease: the results folder may be on NFS or a cluster filesystem shared by SLURM array tasks on
several hosts.
- fcntl/flock locks (filelock's UnixFileLock) are not dependable there: some mounts make them node-local or refuse
  them (Lustre without `-o flock`, NFS with `nolock`), and a lock of a crashed node is freed only when the server's
  lock manager notices. They also name no owner.
- A lease is a marker file made with O_EXCL (atomic on NFSv3+) that names its owner. A dead owner on this host (a
  grid killed with SIGKILL) is recognised by its pid and start time and taken over at once. An owner on another
  host cannot be probed: it is taken over once its marker has not been refreshed for LEASE_SECONDS, measured by
  the contender's own monotonic clock, so clocks that disagree between hosts do not matter.
- SoftFileLock / StrictSoftFileLock have no heartbeat: a dead owner on another host would block the run forever
  (strict), or an age limit (`lifetime`) would take a long run away from its live owner.
A lease can be taken from a live owner whose heartbeat stalls for a whole lease (a process suspended for longer);
then two processes train the run. That costs time, not correctness: each attempt logs to its own folder
(`attempt_name`) and results are written atomically, so the last to finish leaves a whole result.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import SoftFileLease, Timeout

from benchmark.core.store import atomic_write_json, read_result, results_path

# A live owner refreshes its marker every HEARTBEAT_SECONDS; a peer takes over a marker left unrefreshed for
# LEASE_SECONDS. The lease is far above the heartbeat plus NFS's attribute cache (up to 60 s, acregmax): a peer on
# another host may see a refresh that late, and must not mistake a live owner for a dead one.
LEASE_SECONDS = 300.0
HEARTBEAT_SECONDS = 60.0
POLL_SECONDS = 2.0  # how often a process waiting for a claim (a search's point) tries it
CLAIMS_DIR = "claims"


def claim_path(results_dir: str | Path, run_id: str) -> Path:
    return results_path(results_dir, CLAIMS_DIR, f"{run_id}.lock")


def attempt_name() -> str:
    """This attempt's log folder name, `attempt-<UTC time>-<host>-<pid>`: two processes (or two attempts of one
    process, microseconds apart) never share one, so no two write the same metrics.csv."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
    return f"attempt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}-{host}-{os.getpid()}"


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: from its marker (pid, host, last heartbeat) and, when its note matches, the note's
    `since` (UTC, when claimed) and `log_dir` (the attempt's log folder)."""

    pid: int
    host: str
    heartbeat_age_s: float | None
    since: str | None = None
    log_dir: str | None = None

    def describe(self) -> str:
        since = f" since {self.since}" if self.since else ""
        beat = f", heartbeat {self.heartbeat_age_s:.0f}s ago" if self.heartbeat_age_s is not None else ""
        return f"pid {self.pid} on {self.host}{since}{beat}"

    def record(self) -> dict:
        return asdict(self)


class RunClaim:
    """The claim of one run in a results folder. `acquire()` once; `release()` when the run ends (any way)."""

    def __init__(self, results_dir: str | Path, run_id: str, *, lease_seconds: float = LEASE_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.path = claim_path(results_dir, run_id)
        self.note_path = self.path.with_name(self.path.name.removesuffix(".lock") + ".owner.json")
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.lease: SoftFileLease | None = None  # while held
        self.refused_by: Holder | None = None  # who held it when `acquire` was refused

    @property
    def held(self) -> bool:
        return self.lease is not None and self.lease.is_locked

    def contender(self) -> SoftFileLease:
        """A lease object for this path on the terms of its current holder: every contender must agree on the lease
        duration (filelock refuses otherwise), and a holder started with another LEASE_SECONDS must not block the run
        forever."""
        lease = self.lease_of(self.lease_seconds)
        owner = lease.owner
        if owner is not None and owner.mode == "lease" and owner.lease_duration not in (None, self.lease_seconds):
            lease = self.lease_of(owner.lease_duration)
        return lease

    def lease_of(self, seconds: float) -> SoftFileLease:
        return SoftFileLease(self.path, lease_duration=seconds, heartbeat_interval=min(self.heartbeat_seconds,
                             seconds / 3), thread_local=False, on_compromise=self.lost)

    def acquire(self, log_dir: str | None = None) -> bool:
        """True when this process now holds the claim (a free one, or a dead owner's taken over), False when a live
        process holds it (`refused_by` says who). A holder whose heartbeat has stopped for a whole lease is confirmed
        stale by watching its marker for one more lease (filelock's monotonic check) and then taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):  # a marker being written or let go between the try and the look: try again
            time.sleep(0.02 * attempt)
            lease = self.contender()
            try:
                lease.acquire(blocking=False)  # a dead owner on this host is taken over here
                break
            except Timeout:
                self.refused_by = self.holder()
            if self.refused_by is None:
                continue
            age = self.refused_by.heartbeat_age_s
            if age is None or age < lease.lease_duration:
                return False
            print(f"The claim of {self.run_id} by {self.refused_by.describe()} looks abandoned: watching it for "
                  f"{lease.lease_duration:.0f}s before taking it over.", file=sys.stderr, flush=True)
            try:
                lease.acquire(timeout=lease.lease_duration + self.heartbeat_seconds,
                              poll_interval=min(1.0, lease.lease_duration / 10))
                break
            except Timeout:
                return False
        else:
            return False
        self.refused_by = None
        self.lease = lease
        note = {"pid": os.getpid(), "host": socket.gethostname(), "token": lease.token,
                "since": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC", "log_dir": log_dir}
        with suppress(OSError):  # the note only improves messages
            atomic_write_json(self.note_path, note)
        return True

    def holder(self) -> Holder | None:
        """The current holder, or None when the claim is free (or its marker unreadable)."""
        owner = SoftFileLease(self.path, thread_local=False).owner
        if owner is None:
            return None
        try:
            age = max(0.0, time.time() - self.path.stat().st_mtime)
        except OSError:
            age = None
        note = read_result(self.note_path) or {}
        if note.get("token") != owner.token or owner.token is None:  # a previous holder's note
            note = {}
        return Holder(pid=owner.pid, host=note.get("host") or owner.hostname, heartbeat_age_s=age,
                      since=note.get("since"), log_dir=note.get("log_dir"))

    def release(self) -> None:
        """Remove the note and the marker (nothing when not held). Never raises: a run's result matters more."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        try:
            note = read_result(self.note_path) or {}
            if note.get("token") == lease.token:
                self.note_path.unlink(missing_ok=True)
            lease.release()
        except (OSError, RuntimeError) as err:
            print(f"Could not release the claim {self.path}: {err}; a later run takes it over once this process "
                  "has exited.", file=sys.stderr)

    def wait_released(self) -> None:
        """Block until no live process holds the claim: its holder released it, died, or left it unrefreshed for a
        lease. (Takes the free claim and gives it back at once.)"""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        poll_seconds = POLL_SECONDS
        lease = self.contender()
        while True:
            try:
                lease.acquire(timeout=max(poll_seconds, lease.lease_duration + self.heartbeat_seconds),
                              poll_interval=poll_seconds)
            except Timeout:
                lease = self.contender()  # the holder may have changed, with other terms
                continue
            lease.release()
            return

    def lost(self, compromise) -> None:
        print(f"Warning: the claim of {self.run_id} was lost ({compromise.reason}): another process may train this "
              "run too; each logs to its own folder and the last to finish writes the result.", file=sys.stderr)
