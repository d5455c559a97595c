"""Intervals over seeds, the paired difference to Full, the beats / tie / below rule and PPT, each expected value
worked out in the test from the t quantile formula on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from benchmark.analysis import aggregate, plots, stats, tables

# Student t quantiles t_{0.975, df} from their closed forms (independent of scipy): df 1 is the Cauchy,
# tan(pi (p - 1/2)); df 2 is (2p - 1) / sqrt(2 p (1 - p)). Printed t tables (e.g. NIST/SEMATECH e-Handbook of
# Statistical Methods, 1.3.6.7.2) give 12.706 and 4.303.
P = 0.975
T1 = math.tan(math.pi * (P - 0.5))
T2 = (2 * P - 1) / math.sqrt(2 * P * (1 - P))


def test_t_quantiles_match_the_printed_table():
    assert round(T1, 3) == 12.706 and round(T2, 3) == 4.303
    assert T2 == pytest.approx(4.302652729911275, rel=1e-9)


def test_t_interval_by_hand_three_and_two_values():
    # 60, 62, 67: mean 63, sample std sqrt((9 + 1 + 16) / 2) = sqrt(13), sem sqrt(13 / 3), df 2
    interval = stats.t_interval([60.0, 62.0, 67.0])
    half = T2 * math.sqrt(13 / 3)
    assert (interval.mean, interval.n) == (63.0, 3)
    assert (interval.low, interval.high) == pytest.approx((63 - half, 63 + half))
    assert interval.half_width == pytest.approx(half)
    # 70, 72: mean 71, std sqrt(2), sem 1, df 1
    pair = stats.t_interval([70.0, 72.0])
    assert (pair.low, pair.high) == pytest.approx((71 - T1, 71 + T1))


def test_one_seed_has_no_interval_and_no_verdict():
    interval = stats.t_interval([80.0])
    assert (interval.mean, interval.n) == (80.0, 1) and math.isnan(interval.low) and math.isnan(interval.high)
    assert stats.verdict(interval) == "n=1"
    assert stats.t_interval([5.0, 5.0]) == stats.Interval(5.0, 5.0, 5.0, 2)  # no spread: the point itself


@pytest.mark.parametrize("low, high, expected", [(0.1, 2.0, "beats"), (0.0, 2.0, "tie"), (-1.0, 1.0, "tie"),
                                                  (-2.0, 0.0, "tie"), (-2.0, -0.1, "below")])
def test_verdict_needs_the_whole_interval_on_one_side_of_zero(low, high, expected):
    assert stats.verdict(stats.Interval((low + high) / 2, low, high, 3)) == expected


def test_paired_difference_aligns_seeds_not_positions():
    """Seeds in a different order and a seed only one method has: pairs are (seed 0, 0), (1, 1), (2, 2)."""
    scores = pd.Series([71.5, 61.0, 81.0, 99.0], index=[1, 0, 2, 3])
    full = pd.Series([60.0, 70.0, 80.0], index=[0, 1, 2])
    difference = stats.paired_difference(scores, full)
    # differences 1, 1.5, 1: mean 7/6, std sqrt(1/12), sem sqrt(1/36) = 1/6
    assert difference.n == 3 and difference.mean == pytest.approx(7 / 6)
    assert (difference.low, difference.high) == pytest.approx((7 / 6 - T2 / 6, 7 / 6 + T2 / 6))


def seed_frame(scores: dict[str, list[float]], dataset: str = "task", fraction: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame([{"method": method, "dataset": dataset, "train_fraction": fraction, "seed": seed,
                          "test_top1": top1, "tuned_percent": 1.0, "tuned_params": 2_000_000}
                         for method, values in scores.items() for seed, top1 in enumerate(values)])


def test_paired_and_unpaired_conclusions_differ():
    """Seed-to-seed noise of 10 points that both methods share: the unpaired intervals overlap (a tie by eye), the
    paired one is above 0 (a win)."""
    table = aggregate.results_table(seed_frame({"full": [60.0, 70.0, 80.0], "vpt_deep": [61.0, 71.5, 81.0]}))
    full, vpt = table.set_index("method").loc["full"], table.set_index("method").loc["vpt_deep"]
    # unpaired: 70 +- 4.303 * 10 / sqrt(3) and 71.17 +- ...: each holds the other's mean
    assert full["task_ci_high"] == pytest.approx(70 + T2 * 10 / math.sqrt(3))
    assert vpt["task_ci_low"] < full["task"] < vpt["task"] < full["task_ci_high"]
    assert vpt["task_diff_low"] == pytest.approx(7 / 6 - T2 / 6) and vpt["task_diff_low"] > 0
    assert vpt["task_vs_full"] == "beats" and vpt["beats_full"] == 1 and vpt["ties_full"] == 0


def test_difference_below_full_and_the_counts():
    frame = pd.concat([seed_frame({"full": [80.0, 82.0], "linear": [70.0, 73.0]}, "a"),
                       seed_frame({"full": [50.0, 60.0], "linear": [52.0, 59.0]}, "b"),
                       seed_frame({"full": [40.0], "linear": [45.0]}, "c")])
    row = aggregate.results_table(frame).set_index("method").loc["linear"]
    # a: differences -10, -9 -> -9.5 +- T1 * 0.5 (below); b: 2, -1 -> 0.5 +- T1 * 1.5 (tie); c: one seed
    assert (row["a_diff_low"], row["a_diff_high"]) == pytest.approx((-9.5 - T1 / 2, -9.5 + T1 / 2))
    assert [row["a_vs_full"], row["b_vs_full"], row["c_vs_full"]] == ["below", "tie", "n=1"]
    counts = ["beats_full", "ties_full", "below_full", "untested_full", "tasks_compared"]
    assert row[counts].tolist() == [0, 1, 1, 1, 3]
    text = tables.table_markdown(aggregate.results_table(frame), pd.DataFrame())
    assert f"| Linear | 1 | 71.50 ± {T1 * 1.5:.2f} | 55.50 ± {T1 * 3.5:.2f} | 45.00 (n=1) |" in text
    assert f"| Linear | -9.50 [{-9.5 - T1 / 2:+.2f}, {-9.5 + T1 / 2:+.2f}] below |" in text
    assert "+5.00 (n=1) |" in text and "| 0 / 1 / 1 (+1 n=1) |" in text


def test_ppt_by_hand_on_one_row():
    # mean top-1 80 %, 2,000,000 tuned parameters: 0.80 x exp(-log10(2e6 / 1e7 + 1)) = 0.80 x exp(-log10 1.2)
    expected = 0.80 * math.exp(-math.log10(1.2))
    assert stats.ppt(80.0, 2_000_000) == pytest.approx(expected)
    table = aggregate.results_table(seed_frame({"full": [79.0, 81.0]})).set_index("method")
    assert table.loc["full", "ppt"] == pytest.approx(expected)
    # V-PETL Bench's README, FGVC: VPT-Deep mean 89.10 with 0.85M parameters has PPT 0.86
    assert round(stats.ppt(89.10, 850_000), 2) == 0.86


def test_fig3_band_is_the_interval_and_says_so():
    frame = seed_frame({m: [70.0, 72.0] for m in ("full", "linear", "vpt_deep")})
    curves = aggregate.fraction_curves(pd.concat([frame, frame.assign(train_fraction=0.1)]))
    row = curves.iloc[0]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((71 - T1, 71 + T1)) and row["n_seeds"] == 2
    fig = plots.plot_fig3(curves)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "band: 95% CI over 2 seeds (Student t)" in labels
    bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection) and len(c.get_paths())
             and np.ptp(c.get_paths()[0].vertices[:, 1]) > 10]
    assert bands, "no interval band drawn"
    y = bands[0].get_paths()[0].vertices[:, 1]
    assert (y.min(), y.max()) == pytest.approx((71 - T1, 71 + T1))


def test_zoo_points_carry_the_interval():
    points = aggregate.zoo_points(seed_frame({"full": [60.0, 62.0, 67.0]})).iloc[0]
    half = T2 * math.sqrt(13 / 3)
    assert (points["ci_low"], points["ci_high"]) == pytest.approx((63 - half, 63 + half))
