"""W&B without an API key: a run logs offline (files under WANDB_DIR/wandb) and never waits for a login;
the sweep config covers the grid."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from pathlib import Path

import pytest
import yaml

from benchmark.core import tracking
from benchmark.core.config import RunConfig
from tests.helpers.results import write_synthetic_results

BLOCK = 32 * 1024  # LevelDB log block size


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No key anywhere (env, ~/.netrc), W&B files and settings inside tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_BASE_URL", "WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc-absent"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_mode_is_offline_without_a_key_and_explicit_mode_wins(no_wandb_key, monkeypatch):
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file: W&B's 7-byte header, then LevelDB's log format (32 KiB blocks
    of chunks: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4), each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_run_with_wandb_logs_offline_grouped_tagged_with_final_numbers(no_wandb_key):
    from benchmark.core.pipeline import run

    cfg = RunConfig(method="linear", dataset="digits", epochs=2, results_dir=str(no_wandb_key / "results"),
                    wandb=True)
    result = run(cfg)
    assert result["status"] == "ok"

    runs = list((no_wandb_key / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((no_wandb_key / "wandb_dir").rglob("*"))
    data_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.time() + 60  # wandb-core flushes the file in its own process, shortly after finish()
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(data_file)) and time.time() < deadline:
        time.sleep(0.2)
    records = wandb_records(data_file)
    by_type = lambda kind: [r for r in records if r.WhichOneof("record_type") == kind]
    (info,) = (r.run for r in by_type("run"))
    assert (info.project, info.run_group, info.job_type) == ("vpt-bench", "digits", "train")
    assert info.tags[0] == "linear"
    config = {u.key: json.loads(u.value_json) for u in info.config.update}
    assert config["method"] == "linear" and config["train_fraction"] == 0.1 and config["seed"] == 0
    extra = {u.key: json.loads(u.value_json) for r in by_type("config") for u in r.config.update}
    assert extra["tuned_params"] == result["tuned_params"] and extra["total_params"] == result["total_params"]
    summary = {u.key: json.loads(u.value_json) for r in by_type("summary") for u in r.summary.update if u.key}
    assert summary["test_top1"] == pytest.approx(result["test_top1"])
    assert summary["tuned_params"] == result["tuned_params"]
    logged = {item.key or "/".join(item.nested_key) for r in by_type("history") for item in r.history.item}
    assert {"train/loss", "train/acc", "val/acc", "test/acc"} <= logged  # per-epoch metrics via Lightning
    assert by_type("exit") and by_type("exit")[0].exit.exit_code == 0
    # the checkpoint as a model Artifact of this run: one file whose md5 (W&B's digest, base64) is the file's
    (artifact,) = (r.artifact for r in by_type("artifact"))
    assert (artifact.name, artifact.type) == (f"digits-{cfg.resolved().backbone}-linear-frac0.1_seed0", "model")
    (entry,) = artifact.manifest.contents
    checkpoint = no_wandb_key / "results" / result["checkpoint"]
    assert entry.path == checkpoint.name
    assert entry.digest == base64.b64encode(hashlib.md5(checkpoint.read_bytes()).digest()).decode()
    metadata = json.loads(artifact.metadata)
    assert metadata["checkpoint_sha256"] == result["checkpoint_sha256"] and metadata["method"] == "linear"
    import wandb

    assert wandb.run is None  # closed, so the next run of a grid starts its own


def test_artifact_names_are_the_checkpoint_path_in_wandb_characters():
    assert tracking.artifact_name("checkpoints/vtab/dtd/vit_b/lora/frac1_seed2_p5.safetensors") == \
        "vtab-dtd-vit_b-lora-frac1_seed2_p5"
    assert tracking.artifact_name("checkpoints/folder/x:y z/full/frac0.5_seed0.safetensors") == \
        "folder-x_y_z-full-frac0.5_seed0"


def test_run_tags_group_by_dataset_and_tag_by_method():
    cfg = RunConfig(method="vpt_deep", dataset="digits", train_fraction=0.2, recipe="quick", tag="search_lr1_wd0")
    assert tracking.run_tags(cfg)[0] == "vpt_deep" and "search" in tracking.run_tags(cfg)


def test_sweep_config_covers_the_grid(tmp_path):
    from benchmark.sweep import main

    out = tmp_path / "sweep.yaml"
    assert main(["--methods", "linear,vpt_deep", "--fractions", "0.1 1.0", "--seeds", "0,1", "--datasets", "digits",
                 "--epochs", "5", "--out", str(out), "--project", "p"]) == 0
    sweep = yaml.safe_load(out.read_text())
    assert sweep["method"] == "grid" and sweep["project"] == "p"
    assert sweep["parameters"] == {"method": {"values": ["linear", "vpt_deep"]}, "dataset": {"values": ["digits"]},
                                   "fraction": {"values": [0.1, 1.0]}, "seed": {"values": [0, 1]}}
    assert sweep["command"] == ["${env}", "python", "-m", "benchmark.run", "--wandb", "--epochs", "5", "${args}"]
    # what the agent runs parses: ${args} becomes --name=value pairs
    from benchmark.run import config_from_args

    cfg = config_from_args(["--wandb", "--epochs", "5", "--method=vpt_deep", "--dataset=digits", "--fraction=1.0",
                            "--seed=1"])
    assert (cfg.method, cfg.train_fraction, cfg.seed, cfg.epochs, cfg.wandb) == ("vpt_deep", 1.0, 1, 5, True)


def test_sweep_refuses_search(tmp_path, capsys):
    from benchmark.sweep import main

    assert main(["--search", "--out", str(tmp_path / "s.yaml")]) == 2
    assert "SEARCH=1" in capsys.readouterr().err and not (tmp_path / "s.yaml").exists()


def test_report_with_wandb_logs_figures_and_tables_offline(no_wandb_key):
    from benchmark.analysis.outputs import write_report

    write_synthetic_results(no_wandb_key / "results")
    write_report(no_wandb_key / "results", use_wandb=True)
    (run_dir,) = (no_wandb_key / "wandb_dir" / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    assert {p.name.split("_")[0] for p in (media / "images").glob("*.png")} == {"fig3", "params", "zoo"}
    tables = {p.name.rsplit("_", 2)[0] for p in (media / "table").glob("*.table.json")}
    assert tables == {"table", "fig3_table", "fig3_data", "zoo_data", "selected_hparams", "selection_audit", "mcnemar",
                      "versus_full_images", "prediction_metrics", "per_class"}
    table = json.loads(next((media / "table").glob("table_*.table.json")).read_text())
    assert "beats_full" in table["columns"] and len(table["data"]) == 6
