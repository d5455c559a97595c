"""The report from a small synthetic results set: all three outputs, the table's numbers, the selection columns."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from benchmark import report
from benchmark.analysis import aggregate, outputs, plots, tables
from benchmark.core.store import atomic_write_json, load_runs, write_summary
from tests.helpers.results import (
    BACKBONE,
    DATASETS,
    FRACTIONS,
    METHODS,
    synthetic_top1,
    write_run,
    write_synthetic_results,
)


@pytest.fixture
def results(tmp_path):
    n = write_synthetic_results(tmp_path / "results")
    return tmp_path / "results", n


def test_summary_has_one_row_per_run(results):
    results_dir, n = results
    frame = pd.read_csv(write_summary(results_dir))
    assert len(frame) == n
    assert set(frame["status"]) == {"ok", "failed"}
    assert (frame["tag"].fillna("") == "search_lr5_wd0").sum() == 1


def test_final_runs_drop_failed_search_and_prefer_selected(results):
    results_dir, _ = results
    final = aggregate.final_runs(load_runs(results_dir))
    assert (final["status"] == "ok").all()
    assert not final["tag"].fillna("").astype(str).str.startswith("search_").any()
    cell = final[(final.method == "vpt_deep") & (final.dataset == "digits") & (final.train_fraction == 1.0)]
    assert len(cell) == 2 and (cell["test_top1"] == 99.0).all() and (cell["train_on"] == "trainval").all()
    assert len(final) == len(METHODS) * len(DATASETS) * len(FRACTIONS) * 2


def test_report_writes_figures_and_tables(results):
    results_dir, _ = results
    written = outputs.write_report(results_dir)
    for name in ("fig3.png", "fig3.pdf", "params.png", "params.pdf", "zoo.png", "zoo.pdf", "table.md", "table.csv",
                 "fig3_table.md", "fig3_table.csv", "zoo_data.csv", "selected_hparams.csv"):
        assert written[name].is_file() and written[name].stat().st_size > 0, name
    assert written["fig3.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = pd.read_csv(written["table.csv"]).set_index("method")
    assert list(table.index) == ["full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"]
    expected = np.mean([synthetic_top1("linear", "fashion_heldout", 1.0, s) for s in (0, 1)])
    assert table.loc["linear", "fashion_heldout"] == pytest.approx(expected)
    assert table.loc["linear", "fashion_heldout_std"] == pytest.approx(np.std([0, 0.5], ddof=1))
    # VPT-deep beats Full on digits (the selected runs score 99; seeds 0, 1: differences 99 - 94 and 99 - 94.5,
    # interval 4.75 +- 12.706 * 0.25 > 0) and is below it on fashion_heldout (86 - 92 on both seeds).
    assert table.loc["vpt_deep", ["beats_full", "ties_full", "below_full", "tasks_compared"]].tolist() == [1, 0, 1, 2]
    assert table.loc["vpt_deep", "digits_vs_full"] == "beats" and table.loc["linear", "beats_full"] == 0

    text = written["table.md"].read_text()
    assert "| VPT-deep |" in text and "vs Full: beats / tie / below" in text and "± " in text
    assert "+4.75 [+1.57, +7.93] beats" in text  # 4.75 -+ 12.706 * 0.25
    assert "| 100% | 2.5↑ / 0.001 |" in text  # the chosen lr / wd, the lr marked as the top of its grid
    assert "↑ / ↓: the largest / smallest lr searched (1 of 1 choices)" in text
    by_fraction = written["fig3_table.md"].read_text()
    assert "| Method | 10% | 20% | 40% | 80% | 100% |" in by_fraction
    assert "; +4.75 [+1.57, +7.93] beats |" in by_fraction  # VPT-deep on digits at 100%, as in table.md
    hparams = pd.read_csv(written["selected_hparams.csv"])
    assert hparams[["method", "dataset", "lr", "weight_decay", "lr_edge"]].values.tolist() == [
        ["vpt_deep", "digits", 2.5, 0.001, "highest"]]


def test_fig3_curves_average_tasks_then_seeds(results):
    results_dir, _ = results
    curves = aggregate.fraction_curves(aggregate.final_runs(load_runs(results_dir)))
    row = curves[(curves.method == "adapter") & (curves.train_fraction == 0.2)].iloc[0]
    per_seed = [np.mean([synthetic_top1("adapter", d, 0.2, s) for d in DATASETS]) for s in (0, 1)]
    assert row["mean"] == pytest.approx(np.mean(per_seed))
    assert row["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert row["n_seeds"] == 2 and row["n_tasks"] == 2


def test_fig3_panels_shading_and_marker_sizes(results):
    results_dir, _ = results
    curves = aggregate.fraction_curves(aggregate.final_runs(load_runs(results_dir)))
    fig = plots.plot_fig3(curves)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["VPT-deep vs Linear", "VPT-deep vs Adapter", "VPT-deep vs Bias"]
    colors = [tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in axes[1].collections if len(c.get_paths())]
    from matplotlib.colors import to_rgb

    ahead, behind = (tuple(np.round(to_rgb(c), 3)) for c in (plots.AHEAD_COLOR, plots.BEHIND_COLOR))
    assert ahead in colors and behind in colors  # VPT-deep is ahead of Adapter at 10%, behind at 100%
    for ax in axes:  # VPT-shallow and Full in every panel: 4 lines per panel
        assert len(ax.get_lines()) == 4
    sizes = plots.marker_area([0.1, 1.0, 100.0])
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] - sizes[1] == pytest.approx(2 * (sizes[1] - sizes[0]))  # linear in log10(%)


def test_report_cli_errors_clearly_without_results(tmp_path, capsys):
    assert report.main(["--results-dir", str(tmp_path)]) == 2
    assert "make grid" in capsys.readouterr().err


def test_report_refuses_mixed_backbones(results):
    results_dir, _ = results
    other = json.loads(next((results_dir / "runs").rglob("*.json")).read_text()) | {"backbone": "vit_other"}
    atomic_write_json(results_dir / "runs" / "x" / "other.json", other)
    with pytest.raises(ValueError, match="BACKBONE="):
        aggregate.final_runs(load_runs(results_dir))
    assert len(aggregate.final_runs(load_runs(results_dir), backbone=BACKBONE)) == 120


def test_table_averages_vtab_groups(tmp_path):
    results = tmp_path / "results"
    scores = {("full", "vtab/cifar"): 60.0, ("full", "vtab/dtd"): 70.0, ("full", "vtab/eurosat"): 90.0,
              ("vpt_deep", "vtab/cifar"): 78.0, ("vpt_deep", "vtab/dtd"): 66.0, ("vpt_deep", "vtab/eurosat"): 95.0}
    for (method, dataset), top1 in scores.items():
        write_run(results, method, dataset, 1.0, 0, test_top1=top1)
    table = aggregate.results_table(aggregate.final_runs(load_runs(results))).set_index("method")
    assert table.loc["vpt_deep", "Natural mean"] == pytest.approx(72.0)
    assert table.loc["vpt_deep", "Specialized mean"] == pytest.approx(95.0)
    assert table.loc["full", "mean"] == pytest.approx(np.mean([60, 70, 90]))
    # one seed: no interval, so no task can beat Full; all three are untested (n=1)
    assert table.loc["vpt_deep", ["beats_full", "untested_full", "tasks_compared"]].tolist() == [0, 3, 3]
    hparams = aggregate.selected_hparams(aggregate.final_runs(load_runs(results)))
    text = tables.table_markdown(table.reset_index(), hparams)
    assert "| Natural mean | Specialized mean | Mean | PPT | vs Full: beats / tie / below |" in text
    # PPT: 0.7967 x exp(-log10(7400 / 1e7 + 1)) = 0.7964
    assert "| VPT-deep | 0.74 | 78.00 | 66.00 | 95.00 | 72.00 | 95.00 | 79.67 | 0.80 | n=1 |" in text
    assert "mean of 1 seed (n=1: no confidence interval)" in text


# --- aggregation from a hand-made summary.csv, every expected number worked out by hand -------------------------
HAND_SUMMARY = """method,dataset,backbone,train_fraction,seed,status,pretrained,tag,train_on,tuned_percent,test_top1,\
selected_lr,selected_weight_decay,selected_val_top1
full,task_a,B,1.0,0,ok,True,,train,100.0,60.0,,,
full,task_a,B,1.0,1,ok,True,,train,100.0,62.0,,,
full,task_b,B,1.0,0,ok,True,,train,100.0,80.0,,,
full,task_b,B,1.0,1,ok,True,,train,100.0,80.0,,,
full,task_a,B,0.1,0,ok,True,,train,100.0,20.0,,,
full,task_b,B,0.1,0,ok,True,,train,100.0,40.0,,,
linear,task_a,B,1.0,0,ok,True,,train,0.5,61.0,,,
linear,task_a,B,1.0,1,ok,True,,train,0.5,61.0,,,
linear,task_b,B,1.0,0,ok,True,,train,0.5,85.0,,,
linear,task_b,B,1.0,1,ok,True,,train,0.5,87.0,,,
linear,task_b,B,1.0,1,ok,True,,trainval,0.5,89.0,0.5,0.001,88.0
linear,task_a,B,1.0,0,ok,False,,train,0.5,5.0,,,
linear,task_a,B,1.0,0,ok,True,search_lr1_wd0,train,0.5,99.0,,,
linear,task_a,B,1.0,2,failed,True,,train,0.5,1.0,,,
linear,task_a,B,0.1,0,ok,True,,train,0.5,30.0,,,
linear,task_a,B,0.1,1,ok,True,,train,0.5,34.0,,,
linear,task_b,B,0.1,0,ok,True,,train,0.5,50.0,,,
linear,task_b,B,0.1,1,ok,True,,train,0.5,54.0,,,
"""


@pytest.fixture
def hand_final(tmp_path):
    (tmp_path / "summary.csv").write_text(HAND_SUMMARY)
    return aggregate.final_runs(aggregate.load_summary(tmp_path))


def test_final_runs_from_a_hand_made_summary(hand_final):
    """Scratch, tagged and failed rows go; the selected (trainval) run replaces the fixed-recipe one of its cell."""
    assert len(hand_final) == 14
    cell = hand_final[(hand_final.method == "linear") & (hand_final.dataset == "task_b")
                      & (hand_final.train_fraction == 1.0)].sort_values("seed")
    assert cell["test_top1"].tolist() == [85.0, 89.0] and cell["train_on"].tolist() == ["train", "trainval"]


def test_table_numbers_by_hand(hand_final):
    table = aggregate.results_table(hand_final).set_index("method")
    assert list(table.index) == ["full", "linear"] and (table["train_fraction"] == 1.0).all()  # the largest
    # full: task_a (60, 62) -> 61 +- sqrt(2); task_b (80, 80) -> 80 +- 0; mean over tasks 70.5
    assert table.loc["full", ["task_a", "task_b", "mean"]].tolist() == [61.0, 80.0, 70.5]
    assert table.loc["full", "task_a_std"] == pytest.approx(2 ** 0.5) and table.loc["full", "task_b_std"] == 0.0
    # linear: task_a (61, 61) -> 61; task_b (85, 89 selected) -> 87 +- sqrt(8); mean 74
    assert table.loc["linear", ["task_a", "task_b", "mean"]].tolist() == [61.0, 87.0, 74.0]
    assert table.loc["linear", "task_b_std"] == pytest.approx(8 ** 0.5)
    # paired by seed against Full: task_a differences (1, -1) -> 0 +- 12.706 * 1; task_b (5, 9) -> 7 +- 12.706 * 2:
    # both intervals hold 0, so two ties (the means alone, 87 > 80, would have called task_b a win)
    assert table.loc["linear", ["beats_full", "ties_full", "below_full", "tasks_compared"]].tolist() == [0, 2, 0, 2]
    assert table.loc["linear", "task_b_diff"] == 7.0 and table.loc["linear", "task_b_diff_n"] == 2
    assert table.loc["linear", "tuned_percent"] == 0.5 and table.loc["full", "seeds"] == 2

    tenth = aggregate.results_table(hand_final, fraction=0.1).set_index("method")
    assert tenth.loc["full", ["task_a", "task_b", "mean", "seeds"]].tolist() == [20.0, 40.0, 30.0, 1]
    assert tenth.loc["linear", ["task_a", "task_b", "mean"]].tolist() == [32.0, 52.0, 42.0]
    assert tenth.loc["linear", ["beats_full", "untested_full"]].tolist() == [0, 2]  # Full has one seed at 10%
    assert tenth.loc["linear", "task_a_vs_full"] == "n=1" and np.isnan(tenth.loc["linear", "task_a_diff_low"])
    with pytest.raises(ValueError, match="No results at train fraction 0.5"):
        aggregate.results_table(hand_final, fraction=0.5)

    text = tables.table_markdown(table.reset_index(), aggregate.selected_hparams(hand_final))
    assert ("Test top-1 (%) at 100% of the training data, mean ± half-width of the 95% confidence interval over 2 "
            "seeds (Student t") in text
    # half-widths: 12.706 x sem, sem = std / sqrt(2): full task_a 12.706 x 1, linear task_b 12.706 x 2; no
    # tuned_params in this summary, so no PPT
    assert "| Linear | 0.5 | 61.00 ± 0.00 | 87.00 ± 25.41 | 74.00 | – | 0 / 2 / 0 |" in text
    assert "| Full | 100 | 61.00 ± 12.71 | 80.00 ± 0.00 | 70.50 | – | – |" in text
    assert "| Linear | +0.00 [-12.71, +12.71] tie | +7.00 [-18.41, +32.41] tie |" in text
    assert text.endswith("| Method | Fraction | task_b |\n|:---|---:|---:|\n| Linear | 100% | 0.5 / 0.001 |\n")


def test_fraction_tables_by_hand(hand_final):
    """The table at every fraction, stacked; as Markdown one table per task, a column per fraction."""
    stacked = aggregate.fraction_tables(hand_final)
    assert stacked[["method", "train_fraction"]].values.tolist() == [["full", 0.1], ["linear", 0.1],
                                                                       ["full", 1.0], ["linear", 1.0]]
    text = tables.fractions_markdown(stacked)
    assert "over 2 seeds" in text
    # task_a at 10%: Full one seed (20); linear (30, 34) -> 32 +- 12.706 x 2, paired with Full on seed 0 only:
    # 30 - 20 = +10 (n=1). At 100%: Full (60, 62) -> 61 +- 12.71; linear (61, 61), differences (1, -1) -> 0 +- 12.71
    assert "**task_a**\n\n| Method | 10% | 100% |" in text
    assert "| Full | 20.00 (n=1) | 61.00 ± 12.71 |" in text
    assert "| Linear | 32.00 ± 25.41; +10.00 (n=1) | 61.00 ± 0.00; +0.00 [-12.71, +12.71] tie |" in text
    # task_b: Full 40 (n=1) | 80 +- 0; linear (50, 54) -> 52 +- 25.41, +10 (n=1) | 87 +- 25.41, +7 [-18.41, +32.41]
    assert "| Linear | 52.00 ± 25.41; +10.00 (n=1) | 87.00 ± 25.41; +7.00 [-18.41, +32.41] tie |" in text


def test_fig3_curves_by_hand(hand_final):
    """Per seed the mean over tasks, then mean and std (ddof 1) over seeds; one seed -> std 0."""
    curves = aggregate.fraction_curves(hand_final).set_index(["method", "train_fraction"])
    # linear 1.0: seeds (61 + 85) / 2 = 73, (61 + 89) / 2 = 75; linear 0.1: 40, 44; full 1.0: 70, 71; full 0.1: 30
    expected = {("linear", 1.0): (74.0, 2 ** 0.5, 2), ("linear", 0.1): (42.0, 8 ** 0.5, 2),
                ("full", 1.0): (70.5, 0.5 ** 0.5, 2), ("full", 0.1): (30.0, 0.0, 1)}
    for key, (mean, std, seeds) in expected.items():
        row = curves.loc[key]
        assert (row["mean"], row["n_seeds"], row["n_tasks"]) == (mean, seeds, 2), key
        assert row["std"] == pytest.approx(std), key
    assert curves.loc[("linear", 1.0), "tuned_percent"] == 0.5


def test_marker_area_is_linear_in_log_percent_between_the_bounds():
    # 1e-3 % -> 10, 100 % -> 190; 0.1 % is 2/5 of the way in log10: 10 + 0.4 * 180 = 82; outside: clipped
    np.testing.assert_allclose(plots.marker_area([1e-3, 0.1, 100.0, 1e-5, 1e3]), [10.0, 82.0, 190.0, 10.0, 190.0])


def test_zoo_points_by_hand(hand_final):
    """One point per (task, method) at the fraction asked (default the largest): mean and std (ddof 1) over seeds."""
    points = aggregate.zoo_points(hand_final).set_index(["dataset", "method"])
    # task_b linear at 100%: seeds 85 and 89 (the selected trainval run) -> 87 +- sqrt(8); full task_a 60, 62
    expected = {("task_a", "full"): (61.0, 2 ** 0.5, 100.0), ("task_b", "full"): (80.0, 0.0, 100.0),
                ("task_a", "linear"): (61.0, 0.0, 0.5), ("task_b", "linear"): (87.0, 8 ** 0.5, 0.5)}
    assert sorted(points.index) == sorted(expected)
    for key, (mean, std, percent) in expected.items():
        assert points.loc[key, "mean"] == mean and points.loc[key, "tuned_percent"] == percent, key
        assert points.loc[key, "std"] == pytest.approx(std), key
    assert (points["train_fraction"] == 1.0).all() and (points["n_seeds"] == 2).all()
    tenth = aggregate.zoo_points(hand_final, fraction=0.1).set_index(["dataset", "method"])
    assert tenth.loc[("task_a", "linear"), "mean"] == 32.0 and tenth.loc[("task_b", "full"), "n_seeds"] == 1
    assert list(aggregate.zoo_points(hand_final)["method"]) == ["full", "linear", "full", "linear"]  # Table 1 order


def test_a_crowded_zoo_panel_gets_a_larger_canvas_and_no_label_overlaps():
    from methods.registry import list_methods
    n = plots.CROWDED + 1
    points = pd.DataFrame({"dataset": "task_a", "method": list_methods()[:n], "tuned_percent": 1 + 0.01 * np.arange(n),
                           "mean": 80.0, "n_seeds": 1, "train_fraction": 1.0})
    fig = plots.plot_zoo(points)
    assert tuple(fig.get_size_inches()) == (9.5, 8)  # one panel, more than CROWDED points
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == n and not [1 for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_zoo_figure_one_panel_per_task_every_method_labelled(hand_final):
    fig = plots.plot_zoo(aggregate.zoo_points(hand_final))
    assert tuple(fig.get_size_inches()) == (13, 5.5)  # 6.5 x 5.5 per panel: 2 points each
    assert [ax.get_title() for ax in fig.axes] == ["task_a", "task_b"]
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
    # each label's line ends at its point (tuned %, mean top-1): task_a full 61, linear 61; task_b full 80, linear 87
    ends = {ax.get_title(): {t.get_text(): tuple(line.get_path().vertices[-1]) for t, line in
                             zip(ax.texts, ax.patches, strict=True)} for ax in fig.axes}
    expected = {"task_a": {"Full": (100.0, 61.0), "Linear": (0.5, 61.0)},
                "task_b": {"Full": (100.0, 80.0), "Linear": (0.5, 87.0)}}
    assert ends.keys() == expected.keys()
    for task, labels in expected.items():
        assert ends[task].keys() == labels.keys()
        for name, point in labels.items():
            assert ends[task][name] == pytest.approx(point), (task, name)
