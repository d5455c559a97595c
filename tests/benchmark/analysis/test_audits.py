"""The evaluations from what runs keep (benchmark/analysis/audits.py): McNemar, ECE, per-class accuracy, the seed
ensemble and the selection audit on hand-made predictions and curves, each expected value worked out in the test;
and the report writing audits.md from a small fixture results folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.analysis import audits, outputs
from benchmark.core.artifacts import save_predictions
from tests.helpers.results import write_run


def binomial_two_sided(b: int, n: int) -> float:
    """Exact two-sided McNemar by hand: twice the smaller binomial tail at p = 1/2, capped at 1."""
    tail = sum(math.comb(n, k) for k in range(min(b, n - b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def outcomes(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * both + [True] * only_a + [False] * only_b + [False] * neither)
    b = np.array([True] * both + [False] * only_a + [True] * only_b + [False] * neither)
    return a, b


@pytest.mark.parametrize("only_a, only_b, expected", [
    (1, 5, 14 / 64),  # 2 * (C(6,0) + C(6,1)) / 2^6
    (0, 4, 2 / 16),  # 2 * (1/2)^4
    (5, 1, 14 / 64),  # symmetric
    (3, 3, 1.0),  # 2 * 42/64 > 1: capped
    (0, 0, 1.0),  # no discordant image: no evidence
])
def test_mcnemar_exact_p_value_by_hand(only_a, only_b, expected):
    correct, reference = outcomes(7, only_a, only_b, 2)  # concordant pairs never count
    b, c, p = audits.mcnemar(correct, reference)
    assert (b, c) == (only_a, only_b)
    assert p == pytest.approx(expected, rel=1e-12) and p == pytest.approx(binomial_two_sided(b, b + c))


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.65 (right), 0.75 (wrong); 15 bins of width 1/15: the two 0.9 share
    # bin [0.8667, 0.9333): |1/2 - 0.9| x 2/4; 0.65 alone: |1 - 0.65| / 4; 0.75 alone: |0 - 0.75| / 4
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.65, 0.35], [0.25, 0.75]])
    labels = torch.tensor([0, 0, 0, 0])
    expected = 0.4 * 2 / 4 + 0.35 / 4 + 0.75 / 4
    assert audits.expected_calibration_error(probs, labels) == pytest.approx(100 * expected, abs=1e-4)
    # 0.82 (right) and 0.88 (wrong) fall in two bins of 1/15 ([0.8, 0.867), [0.867, 0.933)): (0.18 + 0.88) / 2;
    # ten bins would put both in [0.8, 0.9): |0.5 - 0.85| = 0.35
    two = torch.tensor([[0.82, 0.18], [0.12, 0.88]])
    assert audits.expected_calibration_error(two, torch.tensor([0, 0])) == pytest.approx(100 * 0.53, abs=1e-4)


def test_class_accuracy_by_hand_and_nan_for_an_absent_class():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    labels = torch.tensor([0, 0, 1, 1, 1])  # class 0: 1 of 2; class 1: 2 of 3; class 2: no image
    accuracy = audits.class_accuracy(probs, labels)
    assert accuracy[:2].tolist() == pytest.approx([50.0, 200 / 3]) and math.isnan(accuracy[2])


# two seeds on 3 images, 2 classes (labels 0, 0, 1): each alone gets 2 of 3, their mean softmax all 3
SEED_A = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
SEED_B = np.array([[0.45, 0.55], [0.8, 0.2], [0.2, 0.8]])
LABELS = np.array([0, 0, 1])


def kept(probs: np.ndarray, ids=("a", "b", "c"), labels=LABELS) -> dict:
    return {"logits": np.log(probs).astype(np.float16), "labels": np.asarray(labels), "ids": np.asarray(ids)}


def test_seed_ensemble_is_the_mean_softmax():
    # mean softmax: (0.675, 0.325), (0.6, 0.4), (0.25, 0.75): all right
    assert audits.ensemble_top1([kept(SEED_A), kept(SEED_B)]) == pytest.approx(100.0)
    assert audits.ensemble_top1([kept(SEED_A)]) == pytest.approx(200 / 3)
    # 3 classes, label 0: the mean softmax (0.455, 0.325, 0.22) picks class 0; the mean of the logits (the product
    # of the probabilities: 0.009, 0.03, 0.0195) would pick class 1
    sure, unsure = np.array([[0.9, 0.05, 0.05]]), np.array([[0.01, 0.6, 0.39]])
    assert audits.ensemble_top1([kept(sure, ids=("x",), labels=[0]), kept(unsure, ids=("x",), labels=[0])]) == 100.0


def test_predictions_are_aligned_by_image_id_and_other_images_refused():
    shuffled = kept(SEED_B[[2, 0, 1]], ids=("c", "a", "b"), labels=LABELS[[2, 0, 1]])
    ours, _ = audits.aligned(shuffled, kept(SEED_A), "b.npz", "a.npz")
    assert ours["ids"].tolist() == ["a", "b", "c"] and ours["labels"].tolist() == LABELS.tolist()
    with pytest.raises(ValueError, match=r"'b.npz' and 'a.npz' hold different test images.*FORCE=1"):
        audits.aligned(kept(SEED_B, ids=("a", "b", "z")), kept(SEED_A), "b.npz", "a.npz")


def test_mcnemar_verdicts_count_seeds_below_alpha_by_direction():
    tests = pd.DataFrame({"dataset": "t", "method": "m", "train_fraction": 1.0, "seed": [0, 1, 2],
                          "only_method": [0, 6, 1], "only_full": [6, 0, 5], "p_value": [1 / 32, 1 / 32, 14 / 64]})
    final = pd.DataFrame({"dataset": "t", "method": ["m"] * 3 + ["full"] * 3, "train_fraction": 1.0,
                          "seed": [0, 1, 2] * 2, "test_top1": [70.0, 72.0, 71.0, 71.0, 71.0, 71.0]})
    cell = audits.versus_full_cells(tests, final).iloc[0]
    # seed 0 worse (p 1/32), seed 1 better (p 1/32), seed 2 not significant; differences -1, +1, 0: mean 0
    assert (cell["better"], cell["worse"], cell["seeds"], cell["max_p"]) == (1, 1, 3, 14 / 64)
    assert cell["diff"] == 0.0 and cell["vs_full"] == "tie"


def test_epoch_audit_by_hand():
    curves = {"val_top1": [50.0, 70.0, 65.0, 60.0], "test_top1": [40.0, 55.0, 62.0, 58.0]}
    assert audits.epoch_audit(curves) == {"last_epoch": 58.0, "val_best_epoch": 55.0, "best_test_epoch": 62.0}
    tie = {"val_top1": [70.0, 70.0], "test_top1": [30.0, 35.0]}  # the first epoch of the best val
    assert audits.epoch_audit(tie)["val_best_epoch"] == 30.0
    assert all(math.isnan(v) for v in audits.epoch_audit({"val_top1": [1.0]}).values())  # no AUDIT=1


def write_kept_run(results, method, seed, probs, *, test_top1, curves=None, ids=("a", "b", "c"), labels=LABELS,
                   fraction=1.0):
    relative = f"predictions/digits/{method}/frac{fraction:g}_seed{seed}.npz"
    save_predictions(results / relative, torch.log(torch.tensor(probs)), labels, list(ids))
    return write_run(results, method, "digits", fraction, seed, test_top1=test_top1, predictions=relative,
                     curves=curves or {"epoch": [0], "val_top1": [1.0], "train_loss": [1.0]})


@pytest.fixture
def kept_results(tmp_path):
    """Full and the adapter on digits at 100%, seeds 0 and 1, with predictions; the adapter with AUDIT=1 curves;
    Linear at 10% without any predictions."""
    results = tmp_path / "results"
    full = np.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])  # right, wrong, right
    write_kept_run(results, "full", 0, full, test_top1=200 / 3)
    write_kept_run(results, "full", 1, full, test_top1=200 / 3)
    write_kept_run(results, "adapter", 0, SEED_A, test_top1=58.0,
                   curves={"val_top1": [50.0, 70.0, 65.0, 60.0], "test_top1": [40.0, 55.0, 62.0, 58.0]})
    write_kept_run(results, "adapter", 1, SEED_B[[2, 0, 1]], test_top1=59.0, ids=("c", "a", "b"),
                   labels=LABELS[[2, 0, 1]], curves={"val_top1": [1.0, 2.0, 3.0], "test_top1": [50.0, 60.0, 59.0]})
    write_run(results, "linear", "digits", 0.1, 0, test_top1=30.0)
    return results


def test_selection_audit_by_hand(kept_results):
    from benchmark.analysis.aggregate import final_runs, load_summary

    audit = audits.selection_audit(final_runs(load_summary(kept_results)), kept_results).set_index("method")
    adapter = audit.loc["adapter"]
    # seed 0: reported 58, val-best epoch 1 -> 55, last 58, best 62; seed 1: reported 59, val-best = last 59, best 60
    assert adapter[["reported", "val_best_epoch", "last_epoch", "best_test_epoch"]].tolist() == [58.5, 57.0, 58.5, 61.0]
    assert (adapter["optimism"], adapter["max_optimism"], adapter["audited"], adapter["seeds"]) == (2.5, 4.0, 2, 2)
    full = audit.loc["full"]  # no AUDIT=1: the reported number only
    assert full["reported"] == pytest.approx(200 / 3) and full["audited"] == 0 and math.isnan(full["optimism"])


def test_mcnemar_and_prediction_tables_from_kept_runs(kept_results):
    from benchmark.analysis.aggregate import final_runs, load_summary

    final = final_runs(load_summary(kept_results))
    tests = audits.mcnemar_table(final, kept_results).sort_values("seed")
    # Full: right, wrong, right. the adapter seed 0 (SEED_A): right, wrong, right -> no discordant image, p 1;
    # seed 1 (SEED_B, stored shuffled): wrong, right, right -> only the adapter on b, only Full on a
    assert tests[["seed", "only_method", "only_full", "p_value"]].values.tolist() == [[0, 0, 0, 1.0], [1, 1, 1, 1.0]]
    assert tests["top1"].tolist() == pytest.approx([200 / 3, 200 / 3])
    cells = audits.versus_full_cells(tests, final).iloc[0]
    # paired by seed: 58 - 66.67 and 59 - 66.67 -> mean -8.17, t interval with 1 df: -8.17 +- 12.706 * 0.5
    assert cells["diff"] == pytest.approx(58.5 - 200 / 3)
    assert cells["diff_high"] == pytest.approx(58.5 - 200 / 3 + math.tan(math.pi * 0.475) * 0.5)
    assert (cells["better"], cells["worse"], cells["seeds"]) == (0, 0, 2)

    metrics, per_class = audits.prediction_metrics(final, kept_results)
    adapter = metrics.set_index("method").loc["adapter"]
    # each seed 2 of 3; per class: seed A class 0 1/2, class 1 1/1; seed B class 0 1/2, class 1 1/1
    assert adapter[["seeds", "top1", "class_mean", "worst_class"]].tolist() == pytest.approx([2, 200 / 3, 75.0, 50.0])
    assert (adapter["ensemble_top1"], adapter["ensemble_gain"]) == pytest.approx((100.0, 100 / 3))
    # ECE per seed by hand (bins of 1/15): A: 0.9 right, 0.6 wrong, 0.7 right -> (0.1 + 0.6 + 0.3) / 3;
    # B: 0.55 wrong, 0.8 right, 0.8 right -> 0.55 / 3 + |1 - 0.8| x 2 / 3
    ece_a, ece_b = (0.1 + 0.6 + 0.3) / 3, 0.55 / 3 + 0.2 * 2 / 3
    assert adapter["ece"] == pytest.approx(100 * (ece_a + ece_b) / 2, abs=0.05)  # float16 logits
    rows = per_class[per_class["method"] == "adapter"].set_index("class")
    assert rows["accuracy"].tolist() == [50.0, 100.0] and rows["n_images"].tolist() == [2, 1]
    assert "linear" not in set(metrics["method"])  # no predictions kept


def test_report_writes_the_audits(kept_results):
    written = outputs.write_report(kept_results)
    text = written["audits.md"].read_text()
    assert "1 of 5 runs kept no predictions" in text
    assert "2 of 3 cells have no per-epoch test top-1: it needs AUDIT=1" in text
    assert "| digits | Adapter | 100% | 58.50 | 57.00 | 58.50 | 61.00 | +2.50 / +4.00 | 2 of 2 |" in text
    assert "| digits | Adapter | 100% | s0: 0 / 0 (p 1); s1: 1 / 1 (p 1) | 0 / 0 of 2 | -8.17 [-14.52, -1.81] below |" \
        in text
    assert "| digits | Adapter | 100% | 2 | 66.67 | 75.00 | 50.00 |" in text and "| 100.00 (+33.33) |" in text
    for name in ("selection_audit", "mcnemar", "versus_full_images", "prediction_metrics", "per_class"):
        assert len(pd.read_csv(written[f"{name}.csv"])) > 0, name
    stored = json.loads(next((kept_results / "runs").rglob("frac1_seed0.json")).read_text())
    assert stored["predictions"].endswith(".npz")
