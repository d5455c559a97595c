"""The leaderboard on hand examples: the Pareto front, the t interval and the paired difference, the suite and group
means, the budgets and their unequal mark, the sort order, the costs from perf.csv; then the report end to end."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from benchmark import report
from benchmark.analysis import leaderboard as lb
from benchmark.analysis.aggregate import final_runs, load_summary
from benchmark.core.store import atomic_write_json
from tests.helpers.results import BACKBONE, synthetic_top1, write_run

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student t quantile 0.975 by degrees of freedom (tables)


def scores(values: dict[str, list[float]]) -> pd.Series:
    """{method: [score of seed 0, seed 1, ...]} as the (method, seed)-indexed Series a board reads."""
    return pd.Series({(m, s): v for m, vs in values.items() for s, v in enumerate(vs)}).rename_axis(["method", "seed"])


def test_pareto_front_is_the_upper_left_envelope_of_a_hand_example():
    points = pd.DataFrame({"x": [1, 2, 3, 3, 0.5, 4], "y": [70, 80, 75, 85, 60, 84]}, index=list("ABCDEF"))
    # C is beaten by B (fewer params, higher top-1) and by D; F by D; E, A, B, D each beat all cheaper points
    assert list(points.index[lb.pareto_front(points, "x", "y")]) == ["A", "B", "D", "E"]


def test_pareto_front_keeps_one_of_equal_x_the_higher():
    points = pd.DataFrame({"x": [1.0, 1.0, 2.0], "y": [70.0, 72.0, 71.0]}, index=list("abc"))
    assert list(points.index[lb.pareto_front(points, "x", "y")]) == ["b"]


def test_board_interval_is_the_t_formula_and_the_difference_is_paired_by_seed():
    board = lb.board(scores({"full": [60, 70, 80], "vpt_deep": [61, 71.5, 81], "linear": [70, 72, 77]}))
    linear = board.set_index("method").loc["linear"]
    s = math.sqrt(((70 - 73) ** 2 + (72 - 73) ** 2 + (77 - 73) ** 2) / 2)  # sample std, ddof 1
    half = T_975[2] * s / math.sqrt(3)
    assert (linear["mean"], linear["n_seeds"]) == (pytest.approx(73.0), 3)
    assert (linear["ci_low"], linear["ci_high"]) == (pytest.approx(73 - half), pytest.approx(73 + half))
    vpt = board.set_index("method").loc["vpt_deep"]
    diffs = np.array([1.0, 1.5, 1.0])  # paired by seed; its own interval (± 24.8) would hold Full's mean
    half = T_975[2] * diffs.std(ddof=1) / math.sqrt(3)
    mean = diffs.mean()
    assert vpt["diff"] == pytest.approx(mean)
    assert (vpt["diff_low"], vpt["diff_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert vpt["vs_full"] == "beats" and linear["vs_full"] == "tie"


def test_board_sorts_by_mean_ties_in_table_order_and_ranks():
    board = lb.board(scores({"vpt_deep": [80, 82], "linear": [90, 90], "full": [70, 74], "bias": [80, 82]}))
    # bias and vpt_deep tie at 81: Table 1's order (bias before vpt_deep) breaks it
    assert list(board["method"]) == ["linear", "bias", "vpt_deep", "full"]
    assert list(board["rank"]) == [1, 2, 3, 4]


VTAB_HAND = {"vtab/cifar": 60.0, "vtab/dtd": 70.0, "vtab/eurosat": 90.0, "vtab/dmlab": 40.0, "vtab/kitti": 50.0}
FGVC_HAND = {"cub": 80.0, "cars": 90.0}


def hand_runs(top1: dict[str, float], method: str = "full", seed: int = 0) -> list[dict]:
    return [{"method": method, "seed": seed, "dataset": d, "test_top1": v} for d, v in top1.items()]


def test_suite_group_and_overall_means_by_hand():
    wide, members = lb.scope_scores(pd.DataFrame(hand_runs(VTAB_HAND | FGVC_HAND | {"digits": 99.0})))
    row = wide.loc[("full", 0)]
    natural, specialized, structured = (60 + 70) / 2, 90.0, (40 + 50) / 2
    vtab = (natural + specialized + structured) / 3  # 66.67, not the task mean 62: the paper's mean of groups
    assert row["VTAB-1k Natural (2 tasks)"] == pytest.approx(65.0)
    assert row["VTAB-1k Structured (2 tasks)"] == pytest.approx(45.0)
    assert row["VTAB-1k (5 tasks, mean of 3 groups)"] == pytest.approx(vtab)
    assert row["FGVC (2 tasks)"] == pytest.approx(85.0)
    assert row[lb.OVERALL] == pytest.approx((vtab + 85.0 + 99.0) / 3)  # a suite counts once, a loose dataset once
    assert members["FGVC (2 tasks)"] == ["cub", "cars"] and row["vtab/dtd"] == 70.0


def test_a_seed_missing_a_task_of_a_suite_has_no_suite_score():
    runs = hand_runs(FGVC_HAND, seed=0) + hand_runs({"cub": 70.0}, seed=1)
    wide, _ = lb.scope_scores(pd.DataFrame(runs))
    assert wide.loc[("full", 0), "FGVC (2 tasks)"] == pytest.approx(85.0)
    assert math.isnan(wide.loc[("full", 1), "FGVC (2 tasks)"])
    assert wide.loc[("full", 1), "cub"] == 70.0


def budget_rows(points: list[int], epochs: list[int], search: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"search": search or ["full"] * len(points), "points": points, "epochs": epochs})


def test_unequal_budget_mark_is_every_row_off_the_most_common_budget():
    marks = lb.mark_unequal(budget_rows([6, 9, 6, 6, 0], [20, 20, 20, 40, 20]))
    assert list(marks) == [False, True, False, True, True]
    assert list(lb.mark_unequal(budget_rows([6, 6], [20, 20], ["full", "halving"]))) == [False, True]
    # a tie between two budgets: the best-ranked row's is the reference
    assert list(lb.mark_unequal(budget_rows([9, 6, 6, 9], [20] * 4))) == [False, True, True, False]


def test_no_two_adjacent_rows_with_unequal_budgets_are_both_unmarked():
    for budgets in itertools.product([6, 9, 12], repeat=4):
        rows = budget_rows(list(budgets), [20] * 4)
        marks = lb.mark_unequal(rows)
        for i in range(3):
            assert budgets[i] == budgets[i + 1] or marks[i] or marks[i + 1], budgets


def run_row(method: str, tag: str = "", status: str = "ok", n_train: int = 100, epochs: int = 20, **extra) -> dict:
    return {"dataset": "digits", "method": method, "train_fraction": 0.1, "backbone": BACKBONE, "recipe": "quick",
            "tag": tag, "status": status, "n_train": n_train, "epochs": epochs, "shots": np.nan, "options": ""} | extra


def test_cell_budgets_from_run_records_and_budget_records():
    finals = [run_row(m, n_train=120, seed=s, search_points=6 if m == "lora" else np.nan)
              for m in ("lora", "linear", "full") for s in (0, 1)]
    points = [run_row("lora", tag=f"search_lr{i}_wd0") for i in range(5)] + [run_row("lora", "search_lr9", "failed")]
    points += [run_row("linear", tag=f"search_lr{i}_wd0") for i in range(4)]
    points += [run_row("lora", tag="search_lr7_wd0", options="r=4")]  # an option grid's point: another cell
    final = pd.DataFrame(finals)
    record = {"dataset": "digits", "method": "full", "train_fraction": 0.1, "backbone": BACKBONE, "recipe": "quick",
              "shots": None, "options": "", "search": "halving", "points": 8, "epochs": 20, "search_images": 7000,
              "final_images": 4800}
    budgets = lb.cell_budgets(pd.DataFrame(finals + points), final, [record]).set_index("method")
    # lora: its finals say 6 points; images: 5 finished points x 100 x 20 + 2 finals x 120 x 20
    assert budgets.loc["lora", ["search", "points", "epochs", "images_seen"]].tolist() == ["full", 6, 20, 14800]
    assert budgets.loc["linear", ["points", "images_seen"]].tolist() == [4, 4 * 2000 + 4800]  # counted
    assert budgets.loc["full", ["search", "points", "images_seen"]].tolist() == ["halving", 8, 11800]  # the record


def test_scope_budget_sums_images_and_spans_points():
    budgets = pd.DataFrame({"dataset": ["a", "b", "a"], "method": ["lora", "lora", "full"], "search": "full",
                            "points": [6, 9, 6], "epochs": [20, 20, 20], "images_seen": [100.0, 50.0, 100.0]})
    assert lb.scope_budget(budgets, "lora", ["a", "b"]) == {"search": "full", "points": "6–9", "epochs": "20",
                                                            "images_seen": 150.0}
    assert math.isnan(lb.scope_budget(budgets, "full", ["a", "b"])["images_seen"])  # b unknown: no total


def write_wall_time_results(results) -> None:
    """Hand wall times: vpt_deep searched two points and a halving rung (plus a failed point), no record; linear's
    budget record says 5 s of search and 15 s of finals (its runs' 100 s each are not read); Full never searched."""
    for tag, seconds in (("search_lr0.01_wd0", 10.0), ("search_lr0.05_wd0", 20.0), ("search_lr0.01_wd0_e5", 6.0)):
        write_run(results, "vpt_deep", "digits", 0.1, 0, tag=tag, wall_seconds=seconds, n_train=100, epochs=20)
    write_run(results, "vpt_deep", "digits", 0.1, 0, tag="search_lr9_wd0", status="failed", wall_seconds=1000.0)
    for method, seconds in (("vpt_deep", (30.0, 40.0)), ("linear", (100.0, 100.0)), ("full", (50.0, 50.0))):
        for seed, wall in enumerate(seconds):
            write_run(results, method, "digits", 0.1, seed, train_on="trainval", wall_seconds=wall, n_train=120,
                      epochs=20)
    atomic_write_json(results / "budget" / "linear.json", {
        "dataset": "digits", "method": "linear", "train_fraction": 0.1, "backbone": BACKBONE, "shots": None,
        "options": "", "search": "full", "points": 6, "epochs": 20, "search_images": 0, "final_images": 0,
        "search_wall_seconds": 5.0, "final_wall_seconds": 15.0})


def test_wall_time_per_method_search_and_finals_by_hand(tmp_path):
    results = tmp_path / "results"
    write_wall_time_results(results)
    summary = load_summary(results)
    written, tables = lb.write_leaderboard(final_runs(summary), summary, results, results)
    table = pd.read_csv(written["leaderboard_wall_time.csv"]).set_index("method")
    whole = 36 + 70 + 100 + 20  # vpt_deep 10 + 20 + 6 searching (the failed point is no finished run) + 30 + 40
    expected = {"vpt_deep": (36, 70, 106), "full": (0, 100, 100), "linear": (5, 15, 20),
                lb.WALL_TOTAL: (41, 185, whole)}
    assert list(table.index) == list(expected)  # most costly first, then the total
    for method, seconds in expected.items():
        assert table.loc[method, ["search_seconds", "final_seconds", "total_seconds"]].tolist() == list(seconds)
        assert table.loc[method, "share_percent"] == pytest.approx(100 * seconds[2] / whole)
    assert tables["leaderboard_wall_time"]["total_seconds"].iloc[-1] == whole  # the table the W&B run logs
    text = written["leaderboard.md"].read_text()
    assert "## Wall time" in text and "| VPT-deep | 36 s | 1.17 min | 1.77 min | 46.9% |" in text


def test_labels_of_crowded_points_do_not_overlap():
    rows = pd.DataFrame({"method": ["full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"],
                         "tuned_percent": [0.100, 0.101, 0.102, 0.103, 10, 100], "mean": [80, 80.01, 80.02, 80, 70, 90],
                         "ci_low": np.nan, "ci_high": np.nan, "n_seeds": 1, "unequal_budget": False})
    rows["label"] = rows["method"] + " with a long label"
    fig = lb.plot_front(rows, "tuned_percent", "x", "title", smaller_is_better=True)  # unadjusted: 6 overlaps
    assert tuple(fig.get_size_inches()) == (8, 5.5)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == 6
    assert not [(a, b) for a, b in itertools.combinations(range(6), 2) if boxes[a].overlaps(boxes[b])]



def test_dozens_of_labels_in_one_spot_do_not_overlap_on_a_larger_canvas():
    """30 points within 0.03% of each other: adjustText alone leaves overlaps here; separate_labels leaves none."""
    from methods.registry import list_methods
    n = 30
    rows = pd.DataFrame({"method": list_methods()[:n], "tuned_percent": 1 + 0.001 * np.arange(n),
                         "mean": 80 + 0.001 * np.arange(n), "ci_low": np.nan, "ci_high": np.nan, "n_seeds": 1,
                         "unequal_budget": False})
    rows.loc[n - 1, ["tuned_percent", "mean"]] = [100, 90]
    rows["label"] = rows["method"] + " with a long label"
    fig = lb.plot_front(rows, "tuned_percent", "x", "title", smaller_is_better=True)
    assert tuple(fig.get_size_inches()) == (12, 8)  # more than plots.CROWDED (24) points
    fig.canvas.draw()  # the final layout: labels inside the axes leave it as it was when they were placed
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    inside = fig.axes[0].get_window_extent(renderer).padded(1e-6)  # a label moved to an edge: float round-off
    assert len(boxes) == n
    assert not [(a, b) for a, b in itertools.combinations(range(n), 2) if boxes[a].overlaps(boxes[b])]
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)

def write_results(results) -> None:
    """Six methods x two tasks x three seeds at 100%, a linear search point, a failed run."""
    for method, dataset, seed in itertools.product(("full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"),
                                                   ("digits", "fashion_heldout"), (0, 1, 2)):
        write_run(results, method, dataset, 1.0, seed, n_train=100, epochs=20)
    write_run(results, "linear", "digits", 1.0, 0, tag="search_lr5_wd0", n_train=100, epochs=20)
    write_run(results, "bias", "digits", 1.0, 7, status="failed")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The leaderboard's files from fixture results, as the report writes them (without the rest of the report)."""
    results = tmp_path_factory.mktemp("leaderboard") / "results"
    write_results(results)
    summary = load_summary(results)
    return lb.write_leaderboard(final_runs(summary), summary, results, results)[0]


def test_leaderboard_ranks_the_overall_board_by_the_hand_computed_means(written):
    frame = pd.read_csv(written["leaderboard.csv"])
    overall = frame[frame["scope"] == lb.OVERALL]
    expected = {m: np.mean([synthetic_top1(m, d, 1.0, s) for d in ("digits", "fashion_heldout") for s in (0, 1, 2)])
                for m in overall["method"]}
    assert overall["mean"].tolist() == pytest.approx([expected[m] for m in overall["method"]])
    assert overall["method"].tolist() == sorted(expected, key=expected.get, reverse=True)
    assert set(frame["scope"]) == {lb.OVERALL, "digits", "fashion_heldout"}
    # the linear probe searched one point on digits: not the others' budget, and marked
    marked = frame[frame["unequal_budget"]]
    assert set(zip(marked["scope"], marked["method"], strict=True)) == {(lb.OVERALL, "linear"), ("digits", "linear")}
    text = written["leaderboard.md"].read_text()
    assert f"Linear {lb.UNEQUAL_MARK}" in text and "| 1 | Full |" in text


def test_leaderboard_writes_its_figures(written):
    for name in ("leaderboard_params_frac1.png", "leaderboard_params_frac1.pdf"):
        assert written[name].read_bytes()[:4] in (b"\x89PNG", b"%PDF")
    assert "leaderboard_cost_frac1.png" not in written  # no perf.csv: no throughput to draw


@pytest.mark.slow  # the whole report (Fig. 3, zoo, audits) and a W&B run: ~20 s
def test_report_option_writes_the_leaderboard_and_logs_it_to_wandb_offline(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc-absent"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    write_results(tmp_path / "results")
    assert report.main(["--results-dir", str(tmp_path / "results"), "--leaderboard=1", "--wandb=1"]) == 0
    assert (tmp_path / "results" / "figures" / "leaderboard.md").is_file()
    (run_dir,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    assert list((media / "table").glob("leaderboard_[0-9]*.table.json"))
    assert list((media / "table").glob("leaderboard_wall_time_*.table.json"))
    assert list((media / "images").glob("leaderboard_params_frac1_*.png"))
