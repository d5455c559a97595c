"""A synthetic results folder: every paper method x fraction x dataset x seed with a made-up but shaped accuracy,
plus the noise a report must ignore (a search point, a failed run) and one cell's selection-protocol finals."""

from __future__ import annotations

import itertools

import numpy as np

from benchmark.core.store import atomic_write_json, result_path

METHODS = {"full": 100.0, "linear": 0.11, "bias": 0.9, "adapter": 2.5, "vpt_shallow": 0.12, "vpt_deep": 0.74}
FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.0)
DATASETS = ("digits", "fashion_heldout")
BACKBONE = "vit_embedded_p7_28"


def synthetic_top1(method: str, dataset: str, fraction: float, seed: int) -> float:
    """A made-up but shaped accuracy: grows with data; VPT-deep ahead of linear, behind adapter at 100%."""
    base = {"full": 80, "linear": 70, "bias": 74, "adapter": 76, "vpt_shallow": 72, "vpt_deep": 78}[method]
    slope = {"adapter": 14, "full": 12}.get(method, 8)
    return base + slope * np.log10(fraction * 10) + (2 if dataset == "digits" else 0) + 0.5 * seed


def write_run(results_dir, method, dataset, fraction, seed, *, tag="", status="ok", train_on="train", **extra):
    tuned_percent = METHODS[method]
    top1 = synthetic_top1(method, dataset, fraction, seed)
    result = {"method": method, "dataset": dataset, "backbone": BACKBONE, "train_fraction": fraction, "seed": seed,
              "train_on": train_on, "pretrained": True, "status": status, "tuned_params": int(tuned_percent * 1e4),
              "total_params": 1_000_000, "tuned_percent": tuned_percent, "val_top1": top1 - 1, "test_top1": top1,
              "lr": 0.5, "weight_decay": 0.0, "config": {"tag": tag}} | extra
    if status != "ok":
        result = {k: v for k, v in result.items() if not k.endswith("top1")} | {"error": "RuntimeError: boom"}
    name = f"frac{fraction:g}_seed{seed}{'_trainval' if train_on == 'trainval' else ''}{'_' + tag if tag else ''}"
    atomic_write_json(result_path(results_dir, f"{dataset}/{BACKBONE}/{method}/{name}"), result)
    return result


def write_synthetic_results(results_dir, seeds=(0, 1), selected: bool = True) -> int:
    """Every method x fraction x dataset x seed, plus noise the report must ignore; returns the number of runs."""
    n = 0
    for method, dataset, fraction, seed in itertools.product(METHODS, DATASETS, FRACTIONS, seeds):
        write_run(results_dir, method, dataset, fraction, seed)
        n += 1
    write_run(results_dir, "linear", "digits", 0.1, 0, tag="search_lr5_wd0", val_top1=99.0, test_top1=1.0)
    write_run(results_dir, "bias", "digits", 0.1, 7, status="failed")
    n += 2
    if selected:  # the selection protocol's final runs for one cell: replace the fixed-recipe runs there
        for seed in seeds:
            write_run(results_dir, "vpt_deep", "digits", 1.0, seed, train_on="trainval", test_top1=99.0,
                      selected_lr=2.5, selected_weight_decay=0.001, selected_val_top1=97.0,
                      selected_lr_edge="highest")
            n += 1
    return n
