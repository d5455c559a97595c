"""make perf's rows read back: the costs per method (eval speed relative to Full's, merged where the method merges,
the configuration that measured most methods, rows of other options left out) and the merge fact."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmark.costs import perf_rows
from tests.helpers.results import BACKBONE


def write_perf(path, rows: list[tuple]) -> None:
    """perf.csv rows (method, batch_size, eval_img_s, options), as `make perf` writes them."""
    frame = pd.DataFrame([{"method": m, "backbone": BACKBONE, "batch_size": b, "img_size": 28, "device": "cpu x2",
                           "precision": "32", "compile": False, "checkpointing": False, "method_options": options,
                           "train_img_s": 2 * eval_img_s, "peak_mem_mb": 1000.0, "eval_img_s": eval_img_s}
                          for m, b, eval_img_s, options in rows])
    frame.to_csv(path, index=False)


def test_costs_eval_speed_relative_to_full_merged_where_the_method_merges(tmp_path):
    vpt = json.dumps({"prompt_length": 10})  # the quick recipe's VPT options: what plain `make perf` measures
    write_perf(tmp_path / "perf.csv", [("full", 64, 1000.0, "{}"), ("lora", 64, 800.0, "{}"),
                                       ("adapter", 64, 500.0, "{}"), ("vpt_deep", 64, 900.0, vpt),
                                       ("vpt_deep", 64, 10.0, json.dumps({"prompt_length": 50})),  # other options
                                       ("lora", 8, 1.0, "{}")])  # a configuration that measured fewer methods
    costs = perf_rows.method_costs(tmp_path / "perf.csv", BACKBONE, ["full", "lora", "adapter", "vpt_deep"])
    assert costs["eval_vs_plain"].to_dict() == pytest.approx({"full": 1.0, "lora": 0.8, "adapter": 0.5,
                                                              "vpt_deep": 0.9})
    assert costs["merged"].to_dict() == {"full": False, "lora": True, "adapter": False, "vpt_deep": False}
    assert perf_rows.method_costs(tmp_path / "absent.csv", BACKBONE, ["full"]).empty


def test_merging_is_the_class_fact_and_its_switch():
    assert perf_rows.merges("lora") and perf_rows.merges("ssf")
    assert not perf_rows.merges("adapter") and not perf_rows.merges("unknown_method")
    assert not perf_rows.merges("lora", json.dumps({"merge_for_eval": False}))
