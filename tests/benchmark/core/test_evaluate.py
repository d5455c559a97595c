"""`python -m benchmark.evaluate` and what it rests on (issue 28): every method's checkpoint rebuilds the model it
was saved from (the zoo contract, on the tiny ViT), a finished run re-scores its recorded test top-1 exactly, the
merged export is a plain timm model with the trained logits, a peft tuner's adapter loads with peft's own API, a
DDP run's test predictions come back in test-set order, and bad input is refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
import types

import lightning as L
import numpy as np
import peft
import pytest
import timm
import torch
from safetensors.torch import load_file

from benchmark.core.artifacts import (
    checkpoint_metadata,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    save_peft_adapter,
)
from benchmark.core.config import RunConfig
from benchmark.core.distributed import gather_in_test_order
from benchmark.core.errors import ConfigError
from benchmark.core.export import plain_state_dict
from benchmark.core.pipeline import build_model, run
from benchmark.core.rebuild import rebuild
from benchmark.evaluate import main
from methods import get_method_class, list_methods
from methods.base import MergeForEvalTuning
from methods.peft_tuners import PeftTuning
from tests.helpers.data import FOLDER_CLASSES, make_folder
from tests.helpers.models import TINY_METHOD_OPTIONS, TINY_VIT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
VIT_METHODS = [m for m in list_methods() if "vit" in get_method_class(m).families]
TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=TINY_VIT)


def tiny_config(method: str, tmp_path, **settings) -> RunConfig:
    """A resolved config given in full (no recipe read: a new method's recipe entry is no concern here)."""
    return RunConfig(method=method, method_options=TINY_METHOD_OPTIONS.get((method, "vit"), {}),
                     results_dir=str(tmp_path), recipe="quick", optimizer="sgd", lr=0.1, weight_decay=0.0, epochs=1,
                     warmup_epochs=0.0, batch_size=4, head_init="pytorch", **TINY, **settings)


def trained(cfg: RunConfig, num_classes: int = 3):
    """The model a run with `cfg` builds (seeded as a run seeds), every tuned tensor moved away from its init."""
    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg, num_classes)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def save(cfg: RunConfig, model, classes=("a", "b", "c")):
    source = types.SimpleNamespace(num_classes=len(classes), class_names=list(classes))
    path = checkpoint_path(cfg.results_dir, cfg.run_id())
    save_checkpoint(path, model, checkpoint_metadata(cfg, model, source, 50.0, None))
    return path


@pytest.mark.parametrize("method", VIT_METHODS)
def test_every_method_rebuilds_from_its_checkpoint(method, tmp_path):
    """The zoo contract: a checkpoint holds exactly the tensors that train (their count is tuned_params), and the
    model rebuilt from it gives the saved model's logits bit for bit (so the same top-1 on any test set)."""
    cfg = tiny_config(method, tmp_path)
    model = trained(cfg)
    path = save(cfg, model)
    tensors, meta = load_checkpoint(path, 3)
    assert {n for n in tensors if n not in meta["buffers"]} == {n for n, p in model.named_parameters()
                                                                if p.requires_grad}
    assert sum(t.numel() for n, t in tensors.items() if n not in meta["buffers"]) == model.tuned_params
    rebuilt, _ = rebuild(path, 3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), model(images))


def test_a_checkpoint_on_another_backbone_is_refused(tmp_path):
    """Random-init backbones differ by seed: the rebuilt frozen tensors are not the run's, and that is refused."""
    cfg = tiny_config("lora", tmp_path)
    model = trained(cfg)
    path = save(RunConfig(**{**vars(cfg), "seed": 1}), model)  # the metadata says seed 1: another backbone
    with pytest.raises(ConfigError, match=r"was trained on another backbone than the vit_tiny_patch16_224") as err:
        rebuild(path, 3)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


MERGING = {"lora", "ssf", "repadapter"}  # the merge-for-eval methods: they must export
# In the fast suite: the merging methods, plain ones, refused ones and peft tuners of three kinds (low-rank, a fixed
# frozen random projection, an orthogonal rotation); every method in `make test-slow`.
FAST = MERGING | {"full", "bias", "vpt_deep", "adapter", "dora", "vera", "boft"}


def fast_or_slow(methods: list[str]) -> list:
    return [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in methods]


@pytest.mark.parametrize("method", fast_or_slow(VIT_METHODS))
def test_a_merged_export_is_a_plain_timm_model_with_the_trained_logits(method, tmp_path):
    """Every method either exports (a state dict timm's own model loads strictly, giving the trained logits) or is
    refused in one line; the merge-for-eval methods and peft's tuners export."""
    cls = get_method_class(method)
    assert issubclass(cls, MergeForEvalTuning) == (method in MERGING)
    model = trained(tiny_config(method, tmp_path))
    try:
        state = plain_state_dict(model, method, "vit_tiny_patch16_224", TINY_VIT)
    except ConfigError as err:
        assert "\n" not in str(err) and "--export merged" in str(err)
        assert not issubclass(cls, MergeForEvalTuning), str(err)
        assert not issubclass(cls, PeftTuning) or "peft does not merge" in str(err), str(err)  # peft's own limit
        return
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY_VIT).eval()
    plain.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), rtol=1e-5, atol=1e-5)
    if method in MERGING:  # the update folded: no tensor of the method's own is left
        assert not any(("lora_" in k or "ssf_" in k or "adapter" in k) for k in state)


@pytest.mark.parametrize("method", fast_or_slow([m for m in VIT_METHODS
                                                 if issubclass(get_method_class(m), PeftTuning)]))
def test_a_peft_tuner_saves_an_adapter_that_peft_loads(method, tmp_path):
    """adapter_config.json + adapter_model.safetensors: PeftModel.from_pretrained on a fresh timm model with the same
    pretrained weights gives the trained logits."""
    model = trained(tiny_config(method, tmp_path))
    assert save_peft_adapter(tmp_path / "adapter", model, "vit_tiny_patch16_224")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and config["base_model_name_or_path"] == "vit_tiny_patch16_224"
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k for k in saved if k.startswith("base_model.model.head.")} == {"base_model.model.head.weight",
                                                                             "base_model.model.head.bias"}
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY_VIT)
    frozen = {k.replace(".base_layer", ""): v for k, v in model.backbone.state_dict().items()}
    fresh.load_state_dict({k: frozen[k] for k in fresh.state_dict()}, strict=True)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=1e-6, atol=1e-6)


def test_a_method_that_is_no_peft_tuner_writes_no_adapter(tmp_path):
    assert not save_peft_adapter(tmp_path / "adapter", trained(tiny_config("lora", tmp_path)), "x")
    assert not (tmp_path / "adapter").exists()


def test_ddp_predictions_are_gathered_in_test_order():
    """Three processes, ten test images: process r scored images r, r + 3, ... (each_example_once); rows name their
    image (row i = [i, -i]), so the gathered order is checked against the identity."""
    n, world = 10, 3
    shares = [list(range(r, n, world)) for r in range(world)]  # 4, 3, 3 images
    logits = [torch.tensor([[float(i), -float(i)] for i in share]) for share in shares]
    labels = [torch.tensor([i % 2 for i in share]) for share in shares]

    def fake_all_gather(rank):
        def all_gather(mine):  # what Lightning's all_gather returns: every process's share, padded to 4, stacked
            if mine.dim() == 2:
                padded = [torch.cat([p, torch.zeros(4 - len(p), 2)]) for p in logits]
            else:
                padded = [torch.cat([p, torch.full((4 - len(p),), -1)]) for p in labels]
            assert torch.equal(mine, padded[rank])
            return torch.stack(padded)
        return all_gather

    for rank in range(world):
        got_logits, got_labels = gather_in_test_order(fake_all_gather(rank), logits[rank], labels[rank], world, rank,
                                                      n)
        assert got_logits[:, 0].tolist() == list(range(n)) and got_logits[:, 1].tolist() == [-i for i in range(n)]
        assert got_labels.tolist() == [i % 2 for i in range(n)]
    one = gather_in_test_order(None, logits[0], labels[0], 1, 0, 4)  # one process: as is
    assert one[0] is logits[0] and one[1] is labels[0]


# --- the entry point on a finished run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One run of a peft tuner (DoRA) on the tiny ViT over a class-folder dataset: (results folder, record path)."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_folder(root / "data", {"train": 4, "val": 1, "test": 3})
    cfg = RunConfig(method="dora", dataset="folder", data_root=str(data), train_fraction=1.0, epochs=1,
                    warmup_epochs=0, batch_size=4, results_dir=str(root / "results"), **TINY)
    result = run(cfg)
    assert result["status"] == "ok", result.get("error")
    return root / "results", root / "results" / "runs" / f"{cfg.resolved().run_id()}.json", data


def evaluate_cli(capsys, *args) -> tuple[int, dict | None, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def test_evaluate_reproduces_the_recorded_test_top1_and_exports(finished, capsys, tmp_path):
    results, record_path, _ = finished
    record = json.loads(record_path.read_text())
    out = tmp_path / "plain.safetensors"
    code, found, _ = evaluate_cli(capsys, "--run", record_path, "--export", "merged", "--output", out)
    assert code == 0 and found["reproduced"] is True and found["test_top1"] == record["test_top1"]
    # the export: timm's own model with the plain state dict scores the same test images as the rebuilt model
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY_VIT).eval()
    plain.load_state_dict(load_file(out), strict=True)
    model, _ = rebuild(results / record["checkpoint"], 3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model.eval()(images), rtol=1e-5, atol=1e-5)
    # the run kept its adapter in peft's format beside the checkpoint
    adapter = results / record["checkpoint"].replace(".safetensors", ".peft")
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # a checkpoint given directly: the same score
    code, again, _ = evaluate_cli(capsys, "--run", results / record["checkpoint"])
    assert code == 0 and again["test_top1"] == record["test_top1"] and again["reproduced"] is True


def copied_run(finished, tmp_path):
    """A copy of the finished run's results folder (refusal tests change files in it)."""
    results, record_path, _ = finished
    shutil.copytree(results, tmp_path / "results")
    return tmp_path / "results", tmp_path / "results" / record_path.relative_to(results)


def edit_record(path, **changes):
    record = json.loads(path.read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            record["config"][key[7:]] = value
        else:
            record[key] = value
    path.write_text(json.dumps(record))


def refused(capsys, path, *args, match: str) -> str:
    code, _, err = evaluate_cli(capsys, "--run", path, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


@pytest.mark.parametrize("change, match", [
    ({"config.method_options": {"rank": 4}}, "has method_options"),
    ({"num_classes": 7}, "has 3 classes, its run"),
    ({"checkpoint_sha256": "0" * 64}, "is not the file its run"),
    ({"config.backbone": "vit_small_patch16_224"}, "has backbone 'vit_tiny_patch16_224'"),
])
def test_a_checkpoint_that_is_not_the_runs_is_refused(finished, capsys, tmp_path, change, match):
    results, record_path = copied_run(finished, tmp_path)
    edit_record(record_path, **change)
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    err = refused(capsys, record_path, "--export", "merged", match=match)
    assert "checkpoints/" in err and "FORCE=1" in err
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before  # nothing written


def test_a_missing_or_truncated_checkpoint_is_refused(finished, capsys, tmp_path):
    results, record_path = copied_run(finished, tmp_path)
    checkpoint = results / json.loads(record_path.read_text())["checkpoint"]
    blob = checkpoint.read_bytes()
    checkpoint.write_bytes(blob[: len(blob) // 2])
    refused(capsys, record_path, match="is truncated or not a vpt-bench checkpoint")
    checkpoint.unlink()
    refused(capsys, record_path, match=f"Checkpoint '{checkpoint}' cannot be read")
    edit_record(record_path, checkpoint=None)
    refused(capsys, record_path, match="kept no checkpoint (it ran with CHECKPOINT=0)")
    refused(capsys, results / "runs" / "nothing.json", match="cannot be read")


def test_predictions_of_other_images_are_refused(finished, capsys, tmp_path):
    results, record_path = copied_run(finished, tmp_path)
    where = results / json.loads(record_path.read_text())["predictions"]
    with np.load(where) as kept:
        logits, labels, ids = kept["logits"], kept["labels"], kept["ids"]
    np.savez_compressed(where, logits=logits, labels=labels, ids=np.asarray([f"x{i}" for i in ids]))
    err = refused(capsys, record_path, match=f"Predictions file '{where}' holds 9 image ids, this test set 9, 9 of")
    assert "DATA_ROOT=" in err


def test_another_dataset_is_scored_only_with_the_runs_classes(finished, capsys, tmp_path):
    results, record_path, data = finished
    other = make_folder(tmp_path / "other", {"train": 2, "val": 1, "test": 2})
    code, found, _ = evaluate_cli(capsys, "--run", record_path, "--data-root", other)  # same class names
    assert code == 0 and found["dataset"] == "folder" and "reproduced" not in found  # not the run's test set
    renamed = tmp_path / "renamed"
    shutil.copytree(other, renamed)
    for split in ("train", "val", "test"):
        (renamed / split / FOLDER_CLASSES[0]).rename(renamed / split / "yak")
    code, _, err = evaluate_cli(capsys, "--run", record_path, "--data-root", renamed)
    assert code == 2 and "has the classes" in err and "EXTRA_TEST=" in err, err
