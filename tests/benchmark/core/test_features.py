"""The linear probe's feature cache: same accuracy as without it, keyed on everything the features depend on,
never used where it would change results."""

from __future__ import annotations

import csv
import hashlib

import lightning as L
import pytest
import torch

from backbones import data_config
from benchmark.core.config import RunConfig
from benchmark.core.features import CachedFeatureDataModule, cached_datamodule, can_cache, tensor_digest
from benchmark.core.pipeline import run
from methods import OptimConfig, create_method
from tests.helpers.data import PatternDataModule, make_vtab
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import setup_probe


class AugmentingPatterns(PatternDataModule):
    deterministic_train_transform = False


def fit_and_test(model, datamodule, fit_metrics: dict | None = None) -> tuple[float, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    trainer.fit(model, datamodule=datamodule)
    if fit_metrics is not None:
        fit_metrics.update(trainer.callback_metrics)
    accuracy = trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]
    return accuracy, model.backbone.head.weight.detach().clone()


def accuracy_by_hand(model, loader) -> float:
    model.eval()
    with torch.inference_mode():
        pairs = [(model(x).argmax(dim=1), y) for x, y in loader]
    return torch.cat([p for p, _ in pairs]).eq(torch.cat([y for _, y in pairs])).float().mean().item()


def test_logged_epoch_accuracies_are_the_accuracies_over_the_whole_split():
    """val/acc and test/acc (computed once per epoch from the steps' updates) equal the fraction of correct
    predictions over the whole split, counted by hand; the metrics start again at zero every epoch."""
    model, datamodule = setup_probe()
    metrics = {}
    test_acc, _ = fit_and_test(model, datamodule, metrics)
    assert datamodule.eval_batch_size < len(datamodule.splits["val"].labels)  # several batches are combined
    assert metrics["val/acc"].item() == pytest.approx(accuracy_by_hand(model, datamodule.val_dataloader()))
    assert test_acc == pytest.approx(accuracy_by_hand(model, datamodule.test_dataloader()))
    assert model.val_acc.update_count == 0 and model.test_acc.update_count == 0  # reset after each epoch


def test_cached_probe_matches_uncached_accuracy(tmp_path):
    plain_acc, plain_head = fit_and_test(*setup_probe())
    model, datamodule = setup_probe()
    cached = cached_datamodule(model, datamodule, tmp_path)
    cached_acc, cached_head = fit_and_test(model, cached)
    assert plain_acc > 0.5  # the probe learned something, so equality is not trivially 1/3 == 1/3
    assert abs(cached_acc - plain_acc) <= 1e-4
    torch.testing.assert_close(cached_head, plain_head, rtol=1e-4, atol=1e-5)


def test_cached_features_are_what_the_head_reads(tmp_path):
    model, datamodule = setup_probe()
    images, _ = next(iter(datamodule.test_dataloader()))
    expected = model.eval()(images)
    cached = cached_datamodule(model, datamodule, tmp_path)
    features, _ = next(iter(cached.test_dataloader()))
    torch.testing.assert_close(model(features), expected, rtol=1e-5, atol=1e-6)
    assert len(cached.features["train"]) == datamodule.n_train and cached.n_train == datamodule.n_train


def test_second_run_reads_the_cache(tmp_path):
    first = cached_datamodule(*setup_probe(), tmp_path)
    second = cached_datamodule(*setup_probe(), tmp_path)
    assert first.hits == dict.fromkeys(("train", "val", "test"), False)
    assert second.hits == dict.fromkeys(("train", "val", "test"), True)
    for split in ("train", "val", "test"):
        torch.testing.assert_close(second.features[split].tensors[0], first.features[split].tensors[0])


@pytest.mark.parametrize("change", ["weights", "fraction", "seed", "transform", "data", "precision"])
def test_any_change_invalidates(tmp_path, change):
    cached_datamodule(*setup_probe(), tmp_path)
    kwargs, precision = {}, None
    if change == "fraction":
        kwargs = {"train_fraction": 0.8}
    elif change == "seed":
        kwargs = {"seed": 1}
    elif change == "transform":
        kwargs = {"mean": (0.4, 0.4, 0.4)}
    elif change == "data":
        kwargs = {"datamodule_cls": type("ShiftedPatterns", (PatternDataModule,), {"offset": 3})}
    elif change == "precision":
        precision = "bf16-mixed"
    model, datamodule = setup_probe(**kwargs)
    if change == "weights":
        with torch.no_grad():
            model.backbone.blocks[0].mlp.fc1.weight[0, 0] += 1e-3
    hits = cached_datamodule(model, datamodule, tmp_path, precision=precision).hits
    expected_train_hit = False
    expected_eval_hit = change in ("fraction", "seed")  # val and test do not depend on the train subset
    assert hits == {"train": expected_train_hit, "val": expected_eval_hit, "test": expected_eval_hit}


def test_head_change_keeps_the_cache(tmp_path):
    """The head is what trains; its weights are not part of the features."""
    cached_datamodule(*setup_probe(), tmp_path)
    model, datamodule = setup_probe()
    with torch.no_grad():
        model.backbone.head.weight.add_(1.0)
    assert all(cached_datamodule(model, datamodule, tmp_path).hits.values())


def test_damaged_entry_is_recomputed(tmp_path):
    cached_datamodule(*setup_probe(), tmp_path)
    for path in tmp_path.glob("train-*.pt"):
        path.write_bytes(b"not a tensor file")
    cached = cached_datamodule(*setup_probe(), tmp_path)
    assert cached.hits == {"train": False, "val": True, "test": True}


def test_never_cached_when_it_would_change_results(tmp_path):
    model, augmenting = setup_probe(datamodule_cls=AugmentingPatterns)
    assert not can_cache(model, augmenting)
    with pytest.raises(ValueError, match="deterministic training transform"):
        cached_datamodule(model, augmenting, tmp_path)
    _, datamodule = setup_probe()
    vpt = create_method("vpt_deep", make_tiny_vit(), num_classes=3)
    assert not can_cache(vpt, datamodule)
    assert list(tmp_path.iterdir()) == []


def test_probe_rejects_images_when_reading_features(tmp_path):
    model, datamodule = setup_probe()
    cached_datamodule(model, datamodule, tmp_path)
    with pytest.raises(ValueError, match=r"takes \(batch, 32\) features"):
        model(torch.randn(2, 3, 32, 32))


def test_cached_and_uncached_runs_log_the_same_metrics_for_the_same_epochs(tmp_path):
    """Both go through the Trainer: the same CSV rows (epochs, steps, columns) and the same values, but for float
    rounding of features computed in batches of another size."""
    logs = {}
    for cache in (True, False):
        cfg = RunConfig(method="linear", dataset="digits", train_fraction=0.1, epochs=2, feature_cache=cache,
                        results_dir=str(tmp_path / str(cache)))
        result = run(cfg)
        [metrics] = (tmp_path / str(cache) / "logs").rglob("metrics.csv")
        logs[cache] = (result, list(csv.DictReader(metrics.open())))
    (cached, cached_rows), (plain, plain_rows) = logs[True], logs[False]
    assert cached["status"] == plain["status"] == "ok"
    assert abs(cached["test_top1"] - plain["test_top1"]) <= 0.2  # one of 600 test images may round differently
    assert [(r["epoch"], r["step"]) for r in cached_rows] == [(r["epoch"], r["step"]) for r in plain_rows]
    assert list(cached_rows[0]) == list(plain_rows[0])  # same columns
    for cached_row, plain_row in zip(cached_rows, plain_rows, strict=True):
        assert [name for name in cached_row if cached_row[name]] == [name for name in plain_row if plain_row[name]]
        for name in ("train/loss", "val/loss"):
            if cached_row[name]:
                assert float(cached_row[name]) == pytest.approx(float(plain_row[name]), rel=1e-3)


def test_run_uses_the_cache_for_linear_on_the_embedded_default(tmp_path, capsys):
    cfg = RunConfig(method="linear", dataset="digits", train_fraction=0.1, epochs=1, results_dir=str(tmp_path))
    first = run(cfg)
    assert "feature cache: train computed, val computed, test computed" in capsys.readouterr().out
    cfg.force = True
    second = run(cfg)
    assert "feature cache: train hit, val hit, test hit" in capsys.readouterr().out
    assert abs(first["test_top1"] - second["test_top1"]) <= 1e-4
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3
    uncached = run(RunConfig(method="linear", dataset="digits", train_fraction=0.1, epochs=1, force=True,
                             results_dir=str(tmp_path), feature_cache=False))
    assert "feature cache" not in capsys.readouterr().out
    assert abs(uncached["test_top1"] - first["test_top1"]) <= 1e-4


def test_cached_datamodule_keeps_loader_settings(tmp_path):
    model, datamodule = setup_probe()
    cached = cached_datamodule(model, datamodule, tmp_path)
    assert isinstance(cached, CachedFeatureDataModule)
    assert [len(labels) for _, labels in cached.train_dataloader()] == [8, 8, 8, 6]  # 30 of 60 kept, batch 8
    assert [len(labels) for _, labels in cached.test_dataloader()] == [16, 16, 13]
    plain_labels = torch.cat([labels for _, labels in datamodule.train_dataloader()])
    cached_labels = torch.cat([labels for _, labels in cached.train_dataloader()])
    assert torch.equal(plain_labels, cached_labels)  # same shuffled order


# --- a file dataset (VTAB-1k's deterministic resize): the key must follow the examples, not just their count -----
def vtab_probe(root, train_fraction: float, seed: int):
    from datamodules import create_datamodule

    torch.manual_seed(0)
    backbone = make_tiny_vit()
    datamodule = create_datamodule("vtab/kitti", data_config=data_config(backbone), data_root=str(root),
                                   train_fraction=train_fraction, seed=seed, batch_size=4, eval_batch_size=8)
    datamodule.setup()
    optim = OptimConfig(optimizer="sgd", lr=0.5, max_epochs=1, warmup_epochs=0)
    return create_method("linear", backbone, datamodule.num_classes, optim), datamodule


def features_by_hand(model, dataset) -> torch.Tensor:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        return model.eval().frozen_features(images)


def test_file_dataset_new_seed_or_fraction_computes_its_own_train_features(tmp_path):
    """On image files the cache key has no input tensors to hash: a new seed keeps the same count and the same
    (sorted) labels, so only the example ids tell the two training subsets apart. The new seed's train features
    are computed from its own images; val and test, which do not depend on the seed, are read."""
    root = make_vtab(tmp_path / "vtab-1k")
    cache = tmp_path / "cache"
    first = cached_datamodule(*vtab_probe(root, 0.5, seed=0), cache)
    model, datamodule = vtab_probe(root, 0.5, seed=1)
    assert datamodule.n_train == first.n_train == 8 and datamodule.train_ids != first.source.train_ids
    assert datamodule.train_labels.tolist() == first.source.train_labels.tolist()  # same labels, other images
    expected = features_by_hand(model, datamodule.train_set)
    second = cached_datamodule(model, datamodule, cache)
    assert second.hits == {"train": False, "val": True, "test": True}
    torch.testing.assert_close(second.features["train"].tensors[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(second.features["train"].tensors[0], first.features["train"].tensors[0])

    assert cached_datamodule(*vtab_probe(root, 1.0, seed=1), cache).hits == {"train": False, "val": True,
                                                                             "test": True}
    assert all(cached_datamodule(*vtab_probe(root, 0.5, seed=1), cache).hits.values())  # the same run again


def test_digest_reads_zero_dim_tensors_by_value():
    # a ResNet's BatchNorm holds a 0-dim `num_batches_tracked`; the digest must read it (and tell values apart)
    step = torch.tensor(7)
    expected = hashlib.sha256()
    expected.update(b"torch.int64()")
    expected.update((7).to_bytes(8, "little"))
    assert tensor_digest([step]) == expected.hexdigest()
    assert tensor_digest([torch.tensor(8)]) != tensor_digest([step])
