"""The `make mutation` harness (tests/mutation/run.py): its up-front checks and the apply step, on temp files.

It never runs pytest itself here: the real runs are `make mutation`'s job (docs/mutation.md).
"""

from __future__ import annotations

import textwrap

import pytest

from tests.mutation import run as harness

SOURCE = "def bound(fan_in, fan_out):\n    return (6.0 / (fan_in + fan_out)) ** 0.5\n"


@pytest.fixture
def repo(tmp_path):
    """A tiny stand-in repo with one source file and one test file."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "init.py").write_text(SOURCE)
    (root / "tests").mkdir()
    (root / "tests" / "test_init.py").write_text("def test_nothing():\n    pass\n")
    return root


def mutant_file(tmp_path, text: str, name: str = "mutants_x.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_valid_mutant_is_read_with_its_fields(tmp_path, repo):
    path = mutant_file(tmp_path, """\
        - id: init-sqrt3
          file: pkg/init.py
          find: "6.0 /"
          replace: "3.0 /"
          rule: "Xavier bound sqrt(6 / (fan_in + fan_out))"
          tests: [tests/test_init.py]
        """)
    (mutant,) = harness.load_mutants([path], repo)
    assert (mutant.id, mutant.file, mutant.find, mutant.replace) == ("init-sqrt3", "pkg/init.py", "6.0 /", "3.0 /")
    assert mutant.tests == ("tests/test_init.py",) and mutant.source == str(path)


@pytest.mark.parametrize(("find", "count"), [("fan_in", 2), ("fan_out", 2), ("sqrt(", 0), ("6.0", 1)])
def test_find_must_occur_exactly_once(tmp_path, repo, find, count):
    """"fan_in" appears in the signature and the body (2), "sqrt(" nowhere (0): both rejected, the mutant named."""
    path = mutant_file(tmp_path, f"""\
        - id: the-mutant
          file: pkg/init.py
          find: "{find}"
          replace: "x"
          rule: "r"
        """)
    if count == 1:
        assert [m.id for m in harness.load_mutants([path], repo)] == ["the-mutant"]
        return
    with pytest.raises(harness.MutantError) as err:
        harness.load_mutants([path], repo)
    assert "'the-mutant'" in str(err.value) and f"occurs {count} times" in str(err.value)


def test_overlapping_occurrences_count_twice():
    assert harness.occurrences("aaa", "aa") == 2 and harness.occurrences("abc", "d") == 0


def test_duplicate_ids_are_rejected_across_files(tmp_path, repo):
    entry = """\
        - id: same-id
          file: pkg/init.py
          find: "6.0"
          replace: "3.0"
          rule: "r"
        """
    first, second = mutant_file(tmp_path, entry, "mutants_a.yaml"), mutant_file(tmp_path, entry, "mutants_b.yaml")
    with pytest.raises(harness.MutantError) as err:
        harness.load_mutants([first, second], repo)
    assert "'same-id': duplicate id (also mutants_a.yaml[0])" in str(err.value)


def test_every_problem_is_listed_at_once(tmp_path, repo):
    """Missing file, missing key, unknown key, bad id, missing test path and a syntax-error replacement: all named."""
    path = mutant_file(tmp_path, """\
        - {id: no-file, file: pkg/absent.py, find: "a", replace: "b", rule: "r"}
        - {id: no-rule, file: pkg/init.py, find: "6.0", replace: "3.0"}
        - {id: typo-key, file: pkg/init.py, find: "6.0", replace: "3.0", rule: "r", test: [tests/test_init.py]}
        - {id: Not_Kebab, file: pkg/init.py, find: "6.0", replace: "3.0", rule: "r"}
        - {id: no-test, file: pkg/init.py, find: "6.0", replace: "3.0", rule: "r", tests: [tests/test_absent.py]}
        - {id: syntax, file: pkg/init.py, find: "return (", replace: "return ((", rule: "r"}
        - {id: escapes, file: ../outside.py, find: "a", replace: "b", rule: "r"}
        """)
    with pytest.raises(harness.MutantError) as err:
        harness.load_mutants([path], repo)
    lines = str(err.value).splitlines()
    expected = {"'no-file'": "not a file inside the repo", "'no-rule'": "missing key 'rule'",
                "'typo-key'": "unknown key 'test'", "'Not_Kebab'": "kebab-case", "'no-test'": "does not exist",
                "'syntax'": "syntax error", "'escapes'": "not a file inside the repo"}
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in lines), (name, lines)
    assert len(lines) == len(expected)


def test_a_file_that_is_not_a_list_is_rejected(tmp_path, repo):
    with pytest.raises(harness.MutantError, match="must be a YAML list"):
        harness.load_mutants([mutant_file(tmp_path, "id: lonely\n")], repo)


def test_invalid_mutants_exit_2_before_anything_runs(tmp_path, capsys):
    """main() checks first: an unmatched `find` in the real repo's file ends with status 2 and the mutant named."""
    path = mutant_file(tmp_path, """\
        - id: stale-find
          file: methods/vpt.py
          find: "this text is in no source file"
          replace: "x"
          rule: "r"
        """)
    assert harness.main(["--files", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nothing ran" in err and "'stale-find'" in err and "occurs 0 times in methods/vpt.py" in err


def test_apply_changes_only_the_copy_and_only_that_text(tmp_path, repo):
    copy = tmp_path / "copy"
    (copy / "pkg").mkdir(parents=True)
    (copy / "pkg" / "init.py").write_text(SOURCE)
    mutant = harness.Mutant("init-sqrt3", "pkg/init.py", "6.0 /", "3.0 /", "r")
    harness.apply(mutant, copy)
    assert (copy / "pkg" / "init.py").read_text() == ("def bound(fan_in, fan_out):\n"
                                                      "    return (3.0 / (fan_in + fan_out)) ** 0.5\n")
    assert (repo / "pkg" / "init.py").read_text() == SOURCE
    with pytest.raises(harness.MutantError, match="no longer occurs exactly once"):
        harness.apply(mutant, copy)  # already applied: its `find` is gone


def test_repo_files_leave_out_the_venv_and_include_the_harness():
    files = harness.repo_files()
    assert "tests/mutation/run.py" in files and "pyproject.toml" in files
    assert not any(f == ".venv" or f.startswith(".venv/") for f in files)


def test_first_failure_is_read_from_pytests_short_summary():
    output = ("....F\n=========================== short test summary info ============================\n"
              "FAILED tests/methods/test_methods.py::test_vpt_init_bound[grey] - AssertionError: 0.1 != 0.2\n"
              "!!!!!!!!!!!!!!!!!!!!!!!!!! stopping after 1 failures !!!!!!!!!!!!!!!!!!!!!!!!!!!\n")
    assert harness.first_failure(output) == "tests/methods/test_methods.py::test_vpt_init_bound[grey]"
    assert harness.first_failure("ERROR tests/test_x.py - ImportError\n") == "tests/test_x.py"
    assert harness.first_failure("5 passed in 1.2s\n") == ""


def test_changed_selects_the_mutants_of_files_that_differ_from_the_base(tmp_path, monkeypatch, capsys):
    """`make mutation CHANGED=1`: only mutants of files changed since HEAD (edited, staged or new) are planted."""
    import subprocess

    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    for name in ("a.py", "b.py"):
        (root / "pkg" / name).write_text(SOURCE)
    git = ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    (root / "pkg" / "b.py").write_text(SOURCE + "# edited\n")
    (root / "pkg" / "c.py").write_text(SOURCE)
    monkeypatch.setattr(harness, "ROOT", root)
    assert harness.changed_files("HEAD") == {"pkg/b.py", "pkg/c.py"}
    entries = "".join(f'- id: m-{name}\n  file: pkg/{name}.py\n  find: "6.0 /"\n  replace: "3.0 /"\n  rule: r\n'
                      for name in ("a", "b", "c"))
    path = mutant_file(tmp_path, entries)
    assert harness.main(["--files", str(path), "--changed", "1", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["m-b", "m-c"]
    with pytest.raises(harness.MutantError, match="--changed nope"):
        harness.changed_files("nope")
