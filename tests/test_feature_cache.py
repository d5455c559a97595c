"""The linear probe's feature cache: same accuracy as without it, keyed on everything the features depend on,
never used where it would change results."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from benchmark.core.config import RunConfig
from benchmark.feature_cache import CachedFeatureDataModule, cached_datamodule, can_cache
from benchmark.run import run
from datamodules.embedded import TensorSplitsDataModule
from methods import OptimConfig, create_method, data_config
from tests.conftest import make_tiny_vit

SIZES = {"train": 60, "val": 30, "test": 45}


class PatternDataModule(TensorSplitsDataModule):
    """3 classes of 12x12 grey images: a bright band whose row depends on the class, plus noise."""

    name = "patterns"
    offset = 0  # changing it changes every image: the cache must notice

    @property
    def num_classes(self) -> int:
        return 3

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(list(SIZES).index(split))
        labels = np.arange(SIZES[split]) % 3
        images = rng.integers(0, 120, size=(len(labels), 12, 12)).astype(np.int64) + self.offset
        for i, label in enumerate(labels):
            images[i, 4 * label: 4 * label + 4] += 120
        return np.clip(images, 0, 255).astype(np.uint8), labels


class AugmentingPatterns(PatternDataModule):
    deterministic_train_transform = False


def setup_probe(train_fraction: float = 0.5, seed: int = 0, datamodule_cls=PatternDataModule, **config_overrides):
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    datamodule = datamodule_cls(data_config={**data_config(backbone), **config_overrides},
                                train_fraction=train_fraction, seed=seed, batch_size=8, eval_batch_size=16)
    datamodule.setup()
    optim = OptimConfig(optimizer="sgd", lr=0.5, max_epochs=4, warmup_epochs=0)
    return create_method("linear", backbone, datamodule.num_classes, optim), datamodule


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


@pytest.mark.parametrize("closed_form", [True, False])
def test_whole_epoch_batches_make_the_same_updates_as_minibatch_steps(tmp_path, closed_form):
    """One training batch per epoch, updated in minibatch slices (manual optimization), against Lightning's one
    automatic step per minibatch on images: same head, same accuracy, same number of updates and schedule.
    With label smoothing the head's gradient has no closed form here, so the slices go through autograd."""
    criterion = torch.nn.CrossEntropyLoss() if closed_form else torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    plain_model, plain_data = setup_probe()
    plain_model.criterion = criterion
    plain_metrics, metrics = {}, {}
    plain_acc, plain_head = fit_and_test(plain_model, plain_data, plain_metrics)
    model, datamodule = setup_probe()
    model.criterion = criterion
    cached = cached_datamodule(model, datamodule, tmp_path, whole_epochs=True)
    assert [len(labels) for _, labels in cached.train_dataloader()] == [datamodule.n_train]
    assert not model.automatic_optimization and model.updates_per_epoch == 4  # 30 examples, batch 8
    assert model.head_gradient_has_closed_form(torch.zeros(1)) == closed_form
    cached_acc, cached_head = fit_and_test(model, cached, metrics)
    assert plain_acc > 0.5
    assert abs(cached_acc - plain_acc) <= 1e-4
    torch.testing.assert_close(cached_head, plain_head, rtol=1e-4, atol=1e-5)
    assert model.trainer.global_step == plain_model.trainer.global_step == 4 * 4
    assert model.lr_schedulers().last_epoch == plain_model.lr_schedulers().last_epoch == 16
    for name in ("train/loss", "train/acc", "val/acc"):
        torch.testing.assert_close(metrics[name], plain_metrics[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_closed_form_head_gradient_equals_autograd(batch):
    model, _ = setup_probe()
    torch.manual_seed(batch)
    features = torch.randn(batch, model.backbone.num_features)
    labels = torch.randint(0, model.num_classes, (batch,))
    loss = model.criterion(model.backbone.head(features), labels)
    loss.backward()
    expected = [p.grad.clone() for p in (model.backbone.head.weight, model.backbone.head.bias)]
    onehot = torch.nn.functional.one_hot(labels, model.num_classes).float()
    logits = model.head_backward_closed_form(features, onehot)
    torch.testing.assert_close(logits, model.backbone.head(features).detach())
    torch.testing.assert_close(model.backbone.head.weight.grad, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.backbone.head.bias.grad, expected[1], rtol=1e-5, atol=1e-6)


def test_closed_form_gradient_only_where_it_is_exact():
    model, _ = setup_probe()
    features = torch.zeros(2, model.backbone.num_features)
    assert model.head_gradient_has_closed_form(features)
    model.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)  # not the closed form: autograd steps instead
    assert not model.head_gradient_has_closed_form(features)
    model.criterion = torch.nn.CrossEntropyLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast rounds the head's matmul: autograd steps instead
        assert not model.head_gradient_has_closed_form(features)


def test_whole_epoch_needs_a_minibatch_size_and_data():
    model, _ = setup_probe()
    with pytest.raises(ValueError, match="minibatch_size > 0"):
        model.read_features(True, minibatch_size=0, n_train=10)
    with pytest.raises(ValueError, match="n_train > 0"):
        model.read_features(True, minibatch_size=8, n_train=0)


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


def test_head_trains_on_one_thread_and_restores_the_count(tmp_path):
    model, datamodule = setup_probe()
    cached = cached_datamodule(model, datamodule, tmp_path)
    seen = []

    class RecordThreads(L.Callback):
        def on_train_batch_start(self, *args):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[RecordThreads()])
        trainer.fit(model, datamodule=cached)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


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
    from tests.test_vtab import make_vtab

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
