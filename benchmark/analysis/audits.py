"""Evaluations from what each run kept (issue 28): its per-epoch curves and its per-image test logits
(benchmark/core/artifacts.py). Reads results only; never builds a model.

- The selection audit: per method, dataset and fraction, the test top-1 the report shows (the last epoch of the run
  the protocol selected on val), the test top-1 at the epoch with the best val top-1, at the last epoch, and at the
  best test epoch, which is what choosing on the test set would claim; `optimism` is that claim minus the reported
  number, in points. Needs the per-epoch test top-1 that only AUDIT=1 runs record.
- McNemar's exact test against Full on the same test images, per seed (McNemar 1947; the exact form is the binomial
  test of the discordant pairs, b of b + c at p = 1/2: scipy.stats.binomtest), beside the seed-paired interval.
- From the logits: accuracy per class (torchmetrics MulticlassAccuracy, average="none"), its mean (balanced
  accuracy) and worst class, and the expected calibration error (Guo et al., ICML 2017,
  https://arxiv.org/abs/1706.04599: 15 equal-width confidence bins, torchmetrics MulticlassCalibrationError).
- The seed ensemble: the mean of the seeds' softmax, per cell (as PETL_Vision, https://arxiv.org/abs/2409.16434,
  ensembles its runs), beside the mean accuracy of the single seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from benchmark.analysis.stats import paired_difference, verdict
from benchmark.analysis.tables import difference_cell, markdown, number
from benchmark.core.artifacts import load_predictions
from methods.registry import label, table_order

CELL = ["dataset", "method", "train_fraction"]
ECE_BINS = 15  # Guo et al.'s bins, torchmetrics' default
REFERENCE = "full"


# --- what a run kept -----------------------------------------------------------------------------------------------
def run_file(results_dir: str | Path, path: str) -> Path:
    """A run's JSON: the summary's `path` where it exists, else the same file under `results_dir`/runs (a summary
    written from another working directory, or a results folder that moved)."""
    found = Path(path)
    if found.is_file() or "runs" not in found.parts:
        return found
    parts = found.parts
    return Path(results_dir, *parts[len(parts) - 1 - parts[::-1].index("runs"):])


def run_curves(results_dir: str | Path, row: pd.Series) -> dict:
    """The run's per-epoch curves ({} when its record has none, or cannot be read)."""
    if not isinstance(row.get("path"), str):
        return {}
    try:
        curves = json.loads(run_file(results_dir, row["path"]).read_text()).get("curves")
    except (OSError, ValueError):
        return {}
    return curves if isinstance(curves, dict) else {}


def has_predictions(row: pd.Series) -> bool:
    return isinstance(row.get("predictions"), str) and row["predictions"] != ""


def run_predictions(results_dir: str | Path, row: pd.Series) -> dict[str, np.ndarray]:
    return load_predictions(Path(results_dir) / row["predictions"])


# --- the selection audit -------------------------------------------------------------------------------------------
def epoch_audit(curves: dict) -> dict:
    """Test top-1 at the last epoch, at the first epoch of best val top-1 and at the best test epoch (NaN without
    per-epoch test top-1: a run made without AUDIT=1)."""
    test = [math.nan if v is None else float(v) for v in curves.get("test_top1") or []]
    if not test or all(math.isnan(v) for v in test):
        return {"last_epoch": math.nan, "val_best_epoch": math.nan, "best_test_epoch": math.nan}
    val = np.array([-math.inf if v is None else float(v) for v in curves.get("val_top1") or []])
    at_val = test[int(np.argmax(val))] if len(val) == len(test) and np.isfinite(val).any() else math.nan
    return {"last_epoch": test[-1], "val_best_epoch": at_val, "best_test_epoch": float(np.nanmax(test))}


def selection_audit(final: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """Per cell (dataset, method, fraction): the reported test top-1 and the epoch audit, each a mean over the
    seeds that were audited, `optimism` = best test epoch - reported (mean over those seeds, points), and how many
    of the cell's seeds recorded per-epoch test top-1 (`audited` of `seeds`)."""
    rows = []
    for _, run in final.iterrows():
        audit = epoch_audit(run_curves(results_dir, run))
        rows.append({k: run[k] for k in CELL} | {"seed": run["seed"], "reported": float(run["test_top1"])} | audit)
    per_run = pd.DataFrame(rows, columns=[*CELL, "seed", "reported", "last_epoch", "val_best_epoch",
                                          "best_test_epoch"])
    per_run["optimism"] = per_run["best_test_epoch"] - per_run["reported"]
    per_run["audited"] = per_run["best_test_epoch"].notna()
    cells = []
    for key, runs in per_run.groupby(CELL, sort=True):
        audited = runs[runs["audited"]]
        means = {c: float(audited[c].mean()) if len(audited) else math.nan
                 for c in ("reported", "val_best_epoch", "last_epoch", "best_test_epoch", "optimism")}
        means["reported"] = float(runs["reported"].mean()) if audited.empty else means["reported"]
        cells.append(dict(zip(CELL, key, strict=True)) | means | {
            "max_optimism": float(audited["optimism"].max()) if len(audited) else math.nan,
            "audited": int(len(audited)), "seeds": int(len(runs))})
    return pd.DataFrame(cells, columns=[*CELL, "reported", "val_best_epoch", "last_epoch", "best_test_epoch",
                                        "optimism", "max_optimism", "audited", "seeds"])


# --- McNemar against Full ------------------------------------------------------------------------------------------
def mcnemar(correct: np.ndarray, reference_correct: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p): b images only `correct` gets right, c only the reference gets right, and the exact two-sided
    McNemar p-value, the binomial test of b successes in b + c trials at 1/2 (1.0 when no image is discordant)."""
    b = int(np.sum(correct & ~reference_correct))
    c = int(np.sum(~correct & reference_correct))
    return b, c, 1.0 if b + c == 0 else float(scipy.stats.binomtest(b, b + c, 0.5).pvalue)


def aligned(predictions: dict, reference: dict, path: str, reference_path: str) -> tuple[dict, dict]:
    """Both runs' predictions in the reference's image order; ValueError naming both files when they did not score
    the same test images."""
    ids, reference_ids = predictions["ids"], reference["ids"]
    if len(ids) != len(reference_ids) or set(ids.tolist()) != set(reference_ids.tolist()):
        raise ValueError(f"Predictions {path!r} and {reference_path!r} hold different test images ({len(ids)} and "
                         f"{len(reference_ids)} ids): they are not the same test split; rerun the older run with "
                         "FORCE=1, or compare runs of one dataset and data root.")
    if np.array_equal(ids, reference_ids):
        return predictions, reference
    order = pd.Index(ids).get_indexer(reference_ids)
    return {key: value[order] for key, value in predictions.items()}, reference


def correct_of(predictions: dict) -> np.ndarray:
    return predictions["logits"].astype(np.float32).argmax(axis=1) == predictions["labels"]


def mcnemar_table(final: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """Per method other than Full, dataset, fraction and seed that both ran with predictions: b, c, the exact
    p-value, and both accuracies on those images."""
    with_predictions = final[final.apply(has_predictions, axis=1)] if len(final) else final
    reference = with_predictions[with_predictions["method"] == REFERENCE].set_index(
        ["dataset", "train_fraction", "seed"])
    rows = []
    for _, run in with_predictions[with_predictions["method"] != REFERENCE].iterrows():
        key = (run["dataset"], run["train_fraction"], run["seed"])
        if key not in reference.index:
            continue
        other = reference.loc[key]
        ours, theirs = aligned(run_predictions(results_dir, run), run_predictions(results_dir, other),
                               run["predictions"], other["predictions"])
        correct, reference_correct = correct_of(ours), correct_of(theirs)
        b, c, p = mcnemar(correct, reference_correct)
        rows.append({k: run[k] for k in CELL} | {
            "seed": run["seed"], "n_images": len(correct), "top1": 100 * correct.mean(),
            "full_top1": 100 * reference_correct.mean(), "only_method": b, "only_full": c, "p_value": p})
    return pd.DataFrame(rows, columns=[*CELL, "seed", "n_images", "top1", "full_top1", "only_method", "only_full",
                                       "p_value"])


def versus_full_cells(tests: pd.DataFrame, final: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per cell of `mcnemar_table`: the seeds tested, how many of them McNemar calls different at `alpha` (and in
    which direction), the largest p-value, and beside it the seed-paired difference to Full with its t interval
    and verdict (benchmark/analysis/stats.py)."""
    rows = []
    for key, seeds in tests.groupby(CELL, sort=True):
        point = dict(zip(CELL, key, strict=True))
        scores = [final[(final["dataset"] == point["dataset"]) & (final["method"] == m)
                        & np.isclose(final["train_fraction"], point["train_fraction"])].set_index("seed")["test_top1"]
                  for m in (point["method"], REFERENCE)]
        difference = paired_difference(*scores)
        significant = seeds["p_value"] < alpha
        rows.append(point | {"seeds": len(seeds), "better": int((significant & (seeds["only_method"]
                                                                                 > seeds["only_full"])).sum()),
                             "worse": int((significant & (seeds["only_method"] < seeds["only_full"])).sum()),
                             "max_p": float(seeds["p_value"].max()), "diff": difference.mean,
                             "diff_low": difference.low, "diff_high": difference.high,
                             "vs_full": verdict(difference)})
    return pd.DataFrame(rows, columns=[*CELL, "seeds", "better", "worse", "max_p", "diff", "diff_low", "diff_high",
                                       "vs_full"])


# --- per-class accuracy, calibration, the seed ensemble ------------------------------------------------------------
def probabilities(predictions: dict) -> torch.Tensor:
    return torch.softmax(torch.from_numpy(predictions["logits"].astype(np.float32)), dim=1)


def class_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C,) accuracy per class in %; NaN for a class with no test image."""
    accuracy = MulticlassAccuracy(probs.shape[1], average="none")(probs, labels) * 100
    present = torch.bincount(labels, minlength=probs.shape[1]) > 0
    return torch.where(present, accuracy, torch.nan)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in %: the mean over images of |accuracy - confidence| of their confidence bin (top-label, L1)."""
    return float(MulticlassCalibrationError(probs.shape[1], n_bins=bins, norm="l1")(probs, labels)) * 100


def ensemble_top1(runs: list[dict]) -> float:
    """Top-1 (%) of the mean of the runs' softmax (all in one image order)."""
    mean = torch.stack([probabilities(run) for run in runs]).mean(dim=0)
    return float((mean.argmax(dim=1) == torch.from_numpy(runs[0]["labels"])).float().mean()) * 100


def prediction_metrics(final: pd.DataFrame, results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per cell: top-1, balanced accuracy, worst class, ECE as means over the seeds with predictions, and the
    seed ensemble's top-1 with the gain over the mean single seed; per cell and class: accuracy, mean over seeds)."""
    cells, classes = [], []
    with_predictions = final[final.apply(has_predictions, axis=1)] if len(final) else final
    for key, runs in with_predictions.groupby(CELL, sort=True):
        loaded = [(run["predictions"], run_predictions(results_dir, run)) for _, run in runs.iterrows()]
        first_path, first = loaded[0]
        loaded = [aligned(p, first, path, first_path)[0] for path, p in loaded]
        labels = torch.from_numpy(first["labels"])
        per_class = torch.stack([class_accuracy(probabilities(p), labels) for p in loaded])
        top1 = [100 * float(correct_of(p).mean()) for p in loaded]
        single = float(np.mean(top1))
        ensemble = ensemble_top1(loaded) if len(loaded) > 1 else math.nan
        cells.append(dict(zip(CELL, key, strict=True)) | {
            "seeds": len(loaded), "top1": single,
            "class_mean": float(np.nanmean(per_class.nanmean(dim=1).numpy())),
            "worst_class": float(np.nanmean([np.nanmin(row) for row in per_class.numpy()])),
            "ece": float(np.mean([expected_calibration_error(probabilities(p), labels) for p in loaded])),
            "ensemble_top1": ensemble, "ensemble_gain": ensemble - single})
        mean_per_class = per_class.nanmean(dim=0)
        classes += [dict(zip(CELL, key, strict=True)) | {"class": c, "n_images": int((labels == c).sum()),
                                                          "accuracy": float(mean_per_class[c])}
                    for c in range(len(mean_per_class))]
    return (pd.DataFrame(cells, columns=[*CELL, "seeds", "top1", "class_mean", "worst_class", "ece", "ensemble_top1",
                                         "ensemble_gain"]),
            pd.DataFrame(classes, columns=[*CELL, "class", "n_images", "accuracy"]))


# --- the report's part ---------------------------------------------------------------------------------------------
def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(table_order(frame["method"].unique()))}
    return frame.assign(rank=frame["method"].map(rank)).sort_values(["dataset", "train_fraction", "rank"],
                                                                     kind="stable").drop(columns="rank")


def cell_columns(frame: pd.DataFrame) -> dict:
    return {"Task": frame["dataset"].tolist(), "Method": [label(m) for m in frame["method"]],
            "Fraction": [f"{100 * f:g}%" for f in frame["train_fraction"]]}


def audit_markdown(audit: pd.DataFrame) -> list[str]:
    text = ["## Selection audit", "",
            "Test top-1 (%), mean over the audited seeds: the number the report shows (the last epoch of the run the "
            "protocol selected), the test top-1 at the epoch of best val top-1, at the last epoch, and at the best "
            "test epoch (what selecting on the test set would claim). Optimism: best test epoch - reported, in "
            "points (mean / largest over seeds)."]
    missing = int((audit["audited"] == 0).sum())
    if missing:
        text += ["", f"{missing} of {len(audit)} cells have no per-epoch test top-1: it needs AUDIT=1 "
                 "(rerun them with AUDIT=1 FORCE=1); their columns are –."]
    audit = ordered(audit)
    shown = pd.DataFrame(cell_columns(audit) | {
        "Reported": audit["reported"].map(number), "Val-best epoch": audit["val_best_epoch"].map(number),
        "Last epoch": audit["last_epoch"].map(number), "Best test epoch": audit["best_test_epoch"].map(number),
        "Optimism": [f"{mean:+.2f} / {high:+.2f}" if not pd.isna(mean) else "–"
                     for mean, high in zip(audit["optimism"], audit["max_optimism"], strict=True)],
        "Audited": [f"{a} of {s}" for a, s in zip(audit["audited"], audit["seeds"], strict=True)]})
    return [*text, "", markdown(shown)]


def mcnemar_markdown(tests: pd.DataFrame, cells: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    text = ["## Against Full on the same test images", "",
            "Per seed, b / c: test images only the method / only Full classifies correctly, and the exact McNemar "
            "p-value (binomial test of b in b + c at 1/2). Beside it the difference to Full paired by seed: mean "
            f"[95% t interval] and verdict. Significant: seeds with p < {alpha:g}, better / worse than Full."]
    if cells.empty:
        return [*text, "", "No method shares predictions with a Full run of the same task, fraction and seed."]
    cells = ordered(cells)
    per_seed = {key: "; ".join(f"s{int(r.seed)}: {r.only_method} / {r.only_full} (p {r.p_value:.2g})"
                               for r in runs.sort_values("seed").itertuples())
                for key, runs in tests.groupby(CELL, sort=True)}
    shown = pd.DataFrame(cell_columns(cells) | {
        "McNemar b / c (p)": [per_seed[tuple(row)] for row in cells[CELL].itertuples(index=False)],
        "Significant": [f"{b} / {w} of {n}" for b, w, n in zip(cells["better"], cells["worse"], cells["seeds"],
                                                               strict=True)],
        "Paired by seed": [difference_cell(d, lo, hi, v) for d, lo, hi, v in
                           zip(cells["diff"], cells["diff_low"], cells["diff_high"], cells["vs_full"], strict=True)]})
    return [*text, "", markdown(shown)]


def metrics_markdown(metrics: pd.DataFrame) -> list[str]:
    text = ["## Per class, calibration and the seed ensemble", "",
            f"From the saved test logits, means over seeds: top-1, the mean of the per-class accuracies (balanced "
            f"accuracy), the worst class, the expected calibration error ({ECE_BINS} confidence bins, %), and the "
            "top-1 of the seeds' ensemble (mean softmax) with its gain over the mean single seed. Per class: "
            "per_class.csv."]
    if metrics.empty:
        return [*text, "", "No run kept its predictions (runs made before they were kept, or over several processes)."]
    metrics = ordered(metrics)
    shown = pd.DataFrame(cell_columns(metrics) | {
        "Seeds": metrics["seeds"], "Top-1": metrics["top1"].map(number),
        "Class mean": metrics["class_mean"].map(number), "Worst class": metrics["worst_class"].map(number),
        "ECE": metrics["ece"].map(number),
        "Ensemble": [f"{number(e)} ({g:+.2f})" if not pd.isna(e) else "– (1 seed)"
                     for e, g in zip(metrics["ensemble_top1"], metrics["ensemble_gain"], strict=True)]})
    return [*text, "", markdown(shown)]


def audit_frames(final: pd.DataFrame, results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Every table of this module, by the name of its CSV."""
    tests = mcnemar_table(final, results_dir)
    metrics, per_class = prediction_metrics(final, results_dir)
    return {"selection_audit": selection_audit(final, results_dir), "mcnemar": tests,
            "versus_full_images": versus_full_cells(tests, final), "prediction_metrics": metrics,
            "per_class": per_class}


def audits_markdown(frames: dict[str, pd.DataFrame], final: pd.DataFrame) -> str:
    missing = int((~final.apply(has_predictions, axis=1)).sum()) if len(final) else 0
    text = ["# Audits from what the runs kept", "",
            "Each table is computed from the runs' saved curves and test logits (benchmark/analysis/audits.py, "
            "docs/statistics.md); nothing is retrained."]
    if missing:
        text += ["", f"{missing} of {len(final)} runs kept no predictions (made before runs kept them, or over "
                 "several processes): they are left out of the last two tables."]
    text += ["", *audit_markdown(frames["selection_audit"]), "",
             *mcnemar_markdown(frames["mcnemar"], frames["versus_full_images"]), "",
             *metrics_markdown(frames["prediction_metrics"])]
    return "\n".join(text) + "\n"
