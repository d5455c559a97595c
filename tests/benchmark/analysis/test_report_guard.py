"""What the report reads: a point's seeds are averaged only over one recipe and one number of epochs (--recipe and
--epochs choose), and every run file it leaves out is counted on stderr and listed in skipped.csv. Run JSONs are
written by hand; nothing trains."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmark import report
from benchmark.analysis import ablations, aggregate
from benchmark.core.store import load_runs


def write_json(results: Path, name: str, **fields) -> Path:
    """A run record of full on digits at 10% (seed 0, recipe quick, 2 epochs), `fields` replacing any of it."""
    record = {"method": "full", "dataset": "digits", "backbone": "b", "train_fraction": 0.1, "shots": None, "seed": 0,
              "epochs": 2, "recipe": "quick", "train_on": "train", "pretrained": True, "options": "",
              "tuned_params": 1000, "total_params": 1000, "tuned_percent": 100.0, "val_top1": 50.0,
              "test_top1": 50.0, "status": "ok", "config": {"tag": ""}} | fields
    path = results / "runs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def run_report(capsys, results: Path, *flags: str) -> tuple[int, list[str], Path]:
    out = results.parent / "figures"
    code = report.main(["--results-dir", str(results), "--out", str(out), *flags])
    return code, capsys.readouterr().err.strip().splitlines(), out


@pytest.fixture
def mixed(tmp_path):
    """One cell, three seeds: 0 and 2 with the quick recipe for 2 epochs (29.0, 31.0), 1 with the paper's for 100
    epochs (97.5): averaged together they would read 52.5."""
    results = tmp_path / "results"
    write_json(results, "s0.json", seed=0, test_top1=29.0)
    write_json(results, "s1.json", seed=1, recipe="paper", epochs=100, test_top1=97.5)
    write_json(results, "s2.json", seed=2, test_top1=31.0)
    return results


def test_a_cell_mixing_recipes_is_refused_naming_it(mixed, capsys):
    code, err, out = run_report(capsys, mixed)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ")
    assert ("1 point mix them: digits / full @ 0.1: recipe quick (epochs 2) seeds 0, 2; recipe paper (epochs 100) "
            "seeds 1." in err[0])
    assert "RECIPE=<name>" in err[0] and "EPOCHS=<n>" in err[0]
    assert not (out / "table.csv").exists()
    with pytest.raises(ValueError, match="recipe paper"):
        aggregate.final_runs(load_runs(mixed))


@pytest.mark.parametrize(("flags", "mean", "seeds"), [(["--recipe", "quick"], (29.0 + 31.0) / 2, 2),
                                                      (["--recipe", "paper"], 97.5, 1),
                                                      (["--epochs", "100"], 97.5, 1)])
def test_recipe_and_epochs_filters_keep_the_matching_runs(mixed, capsys, flags, mean, seeds):
    code, err, out = run_report(capsys, mixed, *flags)
    assert code == 0 and err == []
    table = pd.read_csv(out / "table.csv").set_index("method")
    assert table.loc["full", "digits"] == pytest.approx(mean) and table.loc["full", "seeds"] == seeds


def test_a_cell_mixing_epochs_alone_is_refused(tmp_path, capsys):
    results = tmp_path / "results"
    write_json(results, "s0.json", seed=0, epochs=2, test_top1=40.0)
    write_json(results, "s1.json", seed=1, epochs=20, test_top1=80.0)
    code, err, _ = run_report(capsys, results)
    assert code == 2 and "recipe quick (epochs 2) seeds 0; recipe quick (epochs 20) seeds 1" in err[0]
    code, err, out = run_report(capsys, results, "--epochs", "20", "--recipe", "quick")
    assert code == 0 and pd.read_csv(out / "table.csv").set_index("method").loc["full", "digits"] == 80.0


def test_other_cells_may_differ_and_a_filter_matching_nothing_says_so(tmp_path, capsys):
    results = tmp_path / "results"
    write_json(results, "a.json", seed=0, test_top1=40.0)
    write_json(results, "b.json", seed=1, test_top1=44.0)
    write_json(results, "c.json", method="linear", seed=0, recipe="paper", epochs=100, test_top1=70.0)
    code, err, out = run_report(capsys, results)
    assert code == 0 and err == []
    assert pd.read_csv(out / "table.csv").set_index("method")["digits"].to_dict() == {"full": 42.0, "linear": 70.0}
    code, err, _ = run_report(capsys, results, "--recipe", "vtab")
    assert code == 2 and err == ["error: No finished runs match (status ok, pretrained, no tag, recipe vtab): run "
                                 "`make grid` first or widen the filters."]


@pytest.mark.parametrize(("point", "cell"), [({"shots": 4, "train_fraction": None}, "digits / full @ 4 shots"),
                                             ({"options": "prompt_length=5", "option/prompt_length": 5},
                                              "digits / full @ 0.1 [prompt_length=5]")])
def test_few_shot_and_option_grid_cells_are_guarded_too(tmp_path, capsys, point, cell):
    results = tmp_path / "results"
    if "options" in point:  # a grid sweeps an option over more than one value
        write_json(results, "other.json", seed=0, options="prompt_length=10", **{"option/prompt_length": 10})
    write_json(results, "s0.json", seed=0, **point)
    write_json(results, "s1.json", seed=1, recipe="paper", epochs=100, **point)
    summary = aggregate.load_summary(results)
    with pytest.raises(ValueError, match="recipe paper"):
        ablations.finished_runs(summary)
    code, err, _ = run_report(capsys, results)
    assert code == 2 and f"{cell}: recipe quick (epochs 2) seeds 0; recipe paper (epochs 100) seeds 1." in err[0]
    code, err, out = run_report(capsys, results, "--recipe", "quick")
    assert code == 0 and err == []
    data = pd.read_csv(out / ("shots_data.csv" if "shots" in point else "ablation_data.csv"))
    assert data["mean"].tolist() == [50.0] * len(data) and (data["n_seeds"] == 1).all()


def test_every_file_left_out_is_counted_named_and_listed(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    write_json(results, "a_ok0.json", seed=0, test_top1=40.0)
    write_json(results, "a_ok1.json", seed=1, test_top1=50.0)
    failed = write_json(results, "b_failed.json", seed=2, status="failed", error="RuntimeError: boom\n  at line 3")
    (results / "runs" / "c_cut.json").write_text('{"status": ')
    (results / "runs" / "d_list.json").write_text("[1, 2, 3]")
    (results / "runs" / "e_string.json").write_text('"ok"')
    locked = write_json(results, "f_locked.json", seed=3, test_top1=99.0)
    real = Path.read_bytes

    def read_bytes(self):  # as chmod 000 for a user; root would read it anyway
        if self.name == locked.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    code, err, out = run_report(capsys, results)
    runs = results / "runs"
    assert code == 0 and err == [
        f"Skipped 5 of 7 run files: 1 corrupt ({runs / 'c_cut.json'}), 2 not run records ({runs / 'd_list.json'}; "
        f"{runs / 'e_string.json'}), 1 unreadable ({locked}), 1 failed run ({failed}: RuntimeError: boom). All of "
        f"them: {out / 'skipped.csv'}"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["path", "reason", "detail"]
    assert dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"], strict=True)) == {
        "c_cut.json": "corrupt", "d_list.json": "not a run record", "e_string.json": "not a run record",
        "f_locked.json": "unreadable", "b_failed.json": "failed run"}
    assert skipped.set_index("reason").loc["failed run", "detail"] == "RuntimeError: boom\n  at line 3"
    assert pd.read_csv(out / "table.csv").set_index("method").loc["full", "digits"] == 45.0  # the two ok runs
    summary = pd.read_csv(results / "summary.csv")  # the failed run keeps its row there
    assert sorted(summary["status"]) == ["failed", "ok", "ok"]


def test_the_line_names_a_handful_and_counts_the_rest():
    skipped = pd.DataFrame([(f"r{i}.json", "failed run", f"E{i}") for i in range(4)]
                           + [("x.json", "corrupt", "JSONDecodeError"), ("y.json", "corrupt", "JSONDecodeError")],
                           columns=["path", "reason", "detail"])
    assert aggregate.skipped_line(skipped, 40, named=3) == (
        "Skipped 6 of 40 run files: 2 corrupt (x.json; y.json), 4 failed runs (r0.json: E0; 3 more)")


def test_a_summary_without_run_files_lists_its_failed_rows(tmp_path, capsys):
    results = tmp_path / "results"
    write_json(results, "ok.json", seed=0, test_top1=60.0)
    write_json(results, "no.json", seed=1, status="failed", error="ValueError: nan")
    aggregate.load_summary(results)
    for path in (results / "runs").iterdir():
        path.unlink()
    code, err, _ = run_report(capsys, results)
    assert code == 0 and err[0].startswith(
        f"Skipped 1 of 2 runs in {results / 'summary.csv'}: 1 failed run ({results / 'runs' / 'no.json'}: ValueError")


@pytest.mark.parametrize(("files", "message"), [
    ({}, "summary.csv does not exist"),
    ({"runs/a.json": b"[1]"}, "No run records in"),
    ({"runs/a.json": b'"a run"'}, "No run records in"),
    ({"runs/a.json": b'{"status": "ok", "method": "\xff"}'}, "No run records in"),
    ({"summary.csv": b"method,status\n\xff,ok\n"}, "summary.csv is not a summary table (UnicodeDecodeError"),
    ({"summary.csv": b"method,top1\nfull,1\n"}, "no run records with status, dataset, backbone, seed")])
def test_bad_input_is_one_line_without_a_traceback(tmp_path, capsys, files, message):
    results = tmp_path / "results"
    results.mkdir()
    for name, data in files.items():
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_bytes(data)
    code, err, _ = run_report(capsys, results)
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert len(err) == (2 if "runs/a.json" in files else 1)  # the Skipped line, then the error
