"""`make mutation`: plant one-line bugs, one at a time, each in a throw-away copy of the repo, and see whether
the fast test suite notices.

Every `tests/mutation/mutants_*.yaml` (or the files given with --files, which may lie outside the repo) is a
YAML list of mutants: {id, file, find, replace, rule, tests?} (docs/mutation.md). All of them are checked before
anything runs. Then, per mutant: copy the repo's files (`git ls-files --cached --others --exclude-standard`) to a
temp dir, make it a git repo (the results record `git rev-parse HEAD`), link the .venv, replace `find` by
`replace`, run the mutant's own `tests` first (a quick kill) and then the whole fast suite, both with `-x`.
Killed = pytest exits non-zero; survived = it passes; a mutant that runs past --timeout counts as killed.

    .venv/bin/python tests/mutation/run.py [--jobs 2] [--only id1,id2] [--files a.yaml,/abs/hidden.yaml] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PYTEST = [sys.executable, "-m", "pytest", "-m", "not slow", "-x", "-q", "-p", "no:cacheprovider"]
REQUIRED = ("id", "file", "find", "replace", "rule")
ID_PATTERN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
NO_TESTS_COLLECTED = 5  # pytest's exit status when a mutant's `tests` hold no fast test: not a kill


class MutantError(ValueError):
    """One or more mutant files are invalid; the message lists every problem, one per line."""


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    rule: str
    tests: tuple[str, ...] = ()
    source: str = ""  # the YAML file it came from


@dataclass
class Outcome:
    id: str
    status: str  # killed | survived | timeout
    seconds: float
    first_failure: str = ""  # the test pytest named first, when it did
    returncode: int | None = None
    phase: str = ""  # "own tests" or "full suite": which pytest run decided


# --- reading and checking ---------------------------------------------------------------------------------------
def occurrences(text: str, find: str) -> int:
    """How often `find` occurs in `text`, overlapping ones included ("aa" twice in "aaa")."""
    count, start = 0, text.find(find)
    while start != -1:
        count, start = count + 1, text.find(find, start + 1)
    return count


def check_entry(entry, where: str, root: Path) -> list[str]:
    """Problems with one YAML entry (empty if none)."""
    if not isinstance(entry, dict):
        return [f"{where}: each entry must be a mapping with keys {', '.join(REQUIRED)}, got {entry!r}"]
    name = f"{where}: mutant {entry.get('id', '<no id>')!r}"
    errors = [f"{name}: missing key {key!r}" for key in REQUIRED if key not in entry]
    errors += [f"{name}: unknown key {key!r} (allowed: {', '.join(REQUIRED)}, tests)"
               for key in entry if key not in (*REQUIRED, "tests")]
    errors += [f"{name}: {key!r} must be a non-empty string" for key in REQUIRED
               if key in entry and not (isinstance(entry[key], str) and entry[key])]
    if errors:
        return errors
    if not ID_PATTERN.fullmatch(entry["id"]):
        errors.append(f"{name}: id must be kebab-case (lowercase letters, digits, single dashes)")
    tests = entry.get("tests", [])
    if not (isinstance(tests, list) and all(isinstance(t, str) for t in tests)):
        return errors + [f"{name}: 'tests' must be a list of test paths"]
    errors += [f"{name}: test path {t!r} does not exist" for t in tests if not (root / t.split("::")[0]).exists()]
    path = root / entry["file"]
    if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts or not path.is_file():
        return errors + [f"{name}: file {entry['file']!r} is not a file inside the repo"]
    text = path.read_text()
    count = occurrences(text, entry["find"])
    if count != 1:
        errors.append(f"{name}: 'find' occurs {count} times in {entry['file']} (must be exactly once): "
                      f"{entry['find']!r}")
    elif entry["find"] == entry["replace"]:
        errors.append(f"{name}: 'replace' equals 'find': nothing would change")
    elif path.suffix == ".py":
        try:  # a mutant is a plausible bug, never a syntax error (that would be killed at import, proving nothing)
            compile(text.replace(entry["find"], entry["replace"]), entry["file"], "exec")
        except SyntaxError as err:
            errors.append(f"{name}: the replacement makes {entry['file']} a syntax error: {err.msg}")
    return errors


def load_mutants(paths: list[Path], root: Path = ROOT) -> list[Mutant]:
    """Every mutant of `paths`, checked against the files under `root`; raises MutantError listing all problems."""
    errors, mutants, seen = [], [], {}
    for path in paths:
        try:
            entries = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            errors.append(f"{path}: cannot read it as YAML: {err}")
            continue
        if not isinstance(entries, list):
            errors.append(f"{path}: must be a YAML list of mutants")
            continue
        for index, entry in enumerate(entries):
            problems = check_entry(entry, f"{path.name}[{index}]", root)
            errors += problems
            if problems:
                continue
            where = f"{path.name}[{index}]"
            if entry["id"] in seen:
                errors.append(f"{where}: mutant {entry['id']!r}: duplicate id (also {seen[entry['id']]})")
                continue
            seen[entry["id"]] = where
            mutants.append(Mutant(entry["id"], entry["file"], entry["find"], entry["replace"], entry["rule"],
                                  tuple(entry.get("tests", [])), str(path)))
    if errors:
        raise MutantError("\n".join(errors))
    return mutants


def apply(mutant: Mutant, copy_root: Path) -> None:
    """Plant `mutant` in the copy at `copy_root` (its one occurrence of `find` becomes `replace`)."""
    path = copy_root / mutant.file
    text = path.read_text()
    if occurrences(text, mutant.find) != 1:
        raise MutantError(f"mutant {mutant.id!r}: 'find' no longer occurs exactly once in {mutant.file}")
    path.write_text(text.replace(mutant.find, mutant.replace, 1))


# --- the throw-away copy ------------------------------------------------------------------------------------------
def repo_files(root: Path = ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files; never the .venv (in a worktree it is an unignored symlink)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    return [f for f in listed if f and f != ".venv" and not f.startswith(".venv/") and (root / f).is_file()]


def make_copy(dest: Path, files: list[str], root: Path = ROOT) -> None:
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    venv = root / ".venv"
    if venv.exists():  # reused, never copied: the interpreter is sys.executable anyway; tests may name .venv
        (dest / ".venv").symlink_to(venv.resolve(), target_is_directory=True)
    git = ["git", "-c", "user.name=mutation", "-c", "user.email=mutation@localhost", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "unmutated copy"]):
        subprocess.run(git + command, cwd=dest, check=True, capture_output=True)


# --- running ------------------------------------------------------------------------------------------------------
RUNNING: set[subprocess.Popen] = set()
STOPPING = threading.Event()


def pytest(args: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    """(exit status, output) of one pytest run; (None, output) past `timeout`. Its whole process group is killed
    on timeout, so tests' own child processes cannot keep running (or keep the pipe open)."""
    proc = subprocess.Popen(PYTEST + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    RUNNING.add(proc)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill(proc)
        return None, proc.communicate()[0]
    except BaseException:  # Ctrl-C while waiting: the group is in its own session and did not see it
        kill(proc)
        raise
    finally:
        RUNNING.discard(proc)


def kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def first_failure(output: str) -> str:
    """The first test pytest's short summary names as failed or erroring (from -ra), else ''."""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else ""


def evaluate(mutant: Mutant | None, files: list[str], timeout: float) -> Outcome:
    """Plant `mutant` (None: the unmutated baseline) in a fresh copy and run its tests, then the fast suite."""
    started, name = time.monotonic(), mutant.id if mutant else "(baseline)"
    with tempfile.TemporaryDirectory(prefix="vpt-mutant-") as tmp:
        copy_root, cache = Path(tmp) / "repo", Path(tmp) / "cache"
        make_copy(copy_root, files)
        if mutant:
            apply(mutant, copy_root)
        env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
        env |= {"VPT_BENCH_CACHE": str(cache),  # "images that decoded" are remembered there: never share them
                "PYTHONPATH": os.pathsep.join(filter(None, [str(copy_root), env.get("PYTHONPATH")]))}
        phases = [("own tests", list(mutant.tests))] if mutant and mutant.tests else []
        for phase, args in phases + [("full suite", [])]:
            if STOPPING.is_set():
                break
            code, out = pytest(args, copy_root, env, timeout - (time.monotonic() - started))
            if code is None:
                return Outcome(name, "timeout", time.monotonic() - started, first_failure(out), None, phase)
            if code != 0 and not (phase == "own tests" and code == NO_TESTS_COLLECTED):
                return Outcome(name, "killed", time.monotonic() - started, first_failure(out), code, phase)
    return Outcome(name, "survived", time.monotonic() - started, "", 0, "full suite")


def describe(outcome: Outcome) -> str:
    if outcome.status == "timeout":
        return f"past the timeout, in its {outcome.phase}"
    if outcome.status == "survived":
        return "the fast suite passed"
    by = outcome.first_failure or f"pytest exit {outcome.returncode}, no test named"
    return f"{outcome.phase}: {by}" + (f" (pytest exit {outcome.returncode})" if outcome.returncode not in (1, None)
                                       else "")


def summarise(mutants: list[Mutant], outcomes: list[Outcome], min_rate: float) -> dict:
    killed = sum(o.status in ("killed", "timeout") for o in outcomes)
    by_id = {m.id: m for m in mutants}
    return {"total": len(outcomes), "killed": killed, "timeouts": sum(o.status == "timeout" for o in outcomes),
            "kill_rate": killed / len(outcomes) if outcomes else 1.0, "min_rate": min_rate,
            "survivors": [{"id": o.id, "file": by_id[o.id].file, "rule": by_id[o.id].rule}
                          for o in outcomes if o.status == "survived"],
            "mutants": [vars(o) | {"file": by_id[o.id].file, "source": by_id[o.id].source} for o in outcomes]}


def run_all(mutants: list[Mutant], files: list[str], jobs: int, timeout: float) -> list[Outcome]:
    outcomes, width = [], max(len(m.id) for m in mutants)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(evaluate, m, files, timeout) for m in mutants]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                o = future.result()
                outcomes.append(o)
                print(f"[{done}/{len(mutants)}] {o.status:8s} {o.id:{width}s} {o.seconds:6.1f} s  {describe(o)}",
                      flush=True)
        except KeyboardInterrupt:
            STOPPING.set()
            for future in futures:
                future.cancel()
            for proc in list(RUNNING):
                kill(proc)
            raise
    order = {m.id: i for i, m in enumerate(mutants)}
    return sorted(outcomes, key=lambda o: order[o.id])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", action="append", default=[],
                        help="mutant YAML files, comma-separated or repeated (default: tests/mutation/mutants_*.yaml); "
                             "may lie outside the repo (a reviewers' hidden set)")
    parser.add_argument("--only", default="", help="comma-separated mutant ids to run")
    parser.add_argument("--jobs", type=int, default=1, help="mutants in parallel, each in its own copy (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per mutant; past it the mutant counts as killed by timeout (default 600)")
    parser.add_argument("--min-rate", type=float, default=0.9, help="exit 1 below this kill rate (default 0.9)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the first run of the unmutated suite (which must pass, else every mutant "
                             "would count as killed)")
    parser.add_argument("--changed", metavar="BASE", help="only the mutants of files that differ from the git "
                        "revision BASE (committed since, staged, unstaged or new); 1 means HEAD: `make mutation "
                        "CHANGED=1` checks the modules an uncommitted change touches")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def changed_files(base: str) -> set[str]:
    """Repository paths that differ from the revision `base`: committed since, staged, unstaged, or untracked."""
    git = ["git", "-C", str(ROOT)]
    try:
        diff = subprocess.run([*git, "diff", "--name-only", base], capture_output=True, text=True, check=True).stdout
        new = subprocess.run([*git, "ls-files", "--others", "--exclude-standard"], capture_output=True, text=True,
                             check=True).stdout
    except subprocess.CalledProcessError as err:
        raise MutantError(f"--changed {base}: git cannot compare with it ({err.stderr.strip()})") from None
    return set(diff.split()) | set(new.split())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [Path(p).expanduser().absolute() for f in args.files for p in f.split(",") if p.strip()]
    paths = paths or sorted((ROOT / "tests" / "mutation").glob("mutants_*.yaml"))
    try:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing or not paths:
            raise MutantError(f"no such mutant file(s): {', '.join(missing)}" if missing else "no mutant files found")
        mutants = load_mutants(paths, ROOT)
        only = [i.strip() for i in args.only.split(",") if i.strip()]
        unknown = sorted(set(only) - {m.id for m in mutants})
        if unknown:
            raise MutantError(f"--only names unknown mutant(s): {', '.join(unknown)}")
        mutants = [m for m in mutants if not only or m.id in only]
        if args.changed:
            touched = changed_files("HEAD" if args.changed.strip() in ("1", "true", "yes") else args.changed.strip())
            mutants = [m for m in mutants if m.file in touched]
            if not mutants:
                print(f"mutation: no mutant plants a bug in the changed files ({', '.join(sorted(touched)) or 'none'})")
                return 0
        if not mutants:
            raise MutantError("the mutant files hold no mutants")
    except MutantError as err:
        print(f"mutation: invalid mutants, nothing ran:\n{err}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id:32s} {m.file:32s} {m.rule}")
        return 0
    files = repo_files()
    ignored = [f"{m.id!r} ({m.file})" for m in mutants if m.file not in set(files)]
    if ignored:  # a gitignored file is not copied, so the mutant could not be planted
        print(f"mutation: invalid mutants, nothing ran:\nmutants of files git ignores: {', '.join(ignored)}",
              file=sys.stderr)
        return 2
    print(f"mutation: {len(mutants)} mutants from {', '.join(p.name for p in paths)}, {args.jobs} at a time, "
          f"timeout {args.timeout:.0f} s each", flush=True)
    try:
        if not args.no_baseline:
            base = evaluate(None, files, args.timeout)
            print(f"baseline: unmutated fast suite {base.status.replace('survived', 'passed')} in {base.seconds:.1f} s"
                  + ("" if base.status == "survived" else f" ({describe(base)})"), flush=True)
            if base.status != "survived":
                hint = " (a busy machine? raise --timeout)" if base.status == "timeout" else ""
                print(f"mutation: the unmutated suite must pass first; nothing was measured{hint}", file=sys.stderr)
                return 2
        outcomes = run_all(mutants, files, args.jobs, args.timeout)
    except KeyboardInterrupt:
        print("mutation: interrupted", file=sys.stderr)
        return 130
    summary = summarise(mutants, outcomes, args.min_rate)
    print(f"\nkill rate: {summary['killed']}/{summary['total']} = {100 * summary['kill_rate']:.1f}% "
          f"({summary['timeouts']} by timeout; required {100 * args.min_rate:.0f}%)")
    for s in summary["survivors"]:
        print(f"  survived {s['id']} ({s['file']}): {s['rule']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["kill_rate"] >= args.min_rate else 1


if __name__ == "__main__":
    sys.exit(main())
