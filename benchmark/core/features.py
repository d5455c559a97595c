"""Feature cache for the linear probe: the frozen backbone runs once per split, the head trains on tensors.

A linear probe's input to the head is a fixed function of the image when the backbone is frozen and the
transform is deterministic, so every epoch after the first recomputes the same features. The cache stores
them per split in `<results>/cache/features/<key>.pt`, where the key hashes everything the features depend on:

- the backbone: architecture name, module structure, pooling, and a hash of its frozen weights (not the file
  name, so re-pretrained or edited weights invalidate it);
- the data: dataset, data root, data config (the transform: size, mean, std, interpolation), the split, the
  exact example ids and labels in it (which carries the train fraction and seed), and for in-memory datasets
  the input tensors themselves;
- the numerics: autocast precision and the suite's cache format version.

Any change gives a new key, so a stale entry is never read. Datamodules opt in by declaring
`deterministic_train_transform = True`; augmenting ones are never cached (each epoch sees new views).
The cached loaders keep the datamodule's batch size, shuffling generator and seed, so the head sees the
same batches in the same order as without the cache, and its accuracy is the same. The head trains on them with
the ordinary Trainer; the linear search trains a whole lr x wd grid of heads on them in one pass
(benchmark/sweeps/heads.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from backbones import classifier_prefix
from benchmark.core.errors import ConfigWarning
from benchmark.core.store import atomic_write, storage_problem
from datamodules.base import SPLITS, FractionDataModule
from datamodules.labelled_split import LabelledSplit

CACHE_VERSION = 1  # bump when what is stored (or how it is computed) changes


def can_cache(model: L.LightningModule, datamodule: FractionDataModule) -> bool:
    """True for a method that only reads frozen features on data whose training transform is deterministic."""
    return (getattr(model, "trains_on_frozen_features", False)
            and getattr(datamodule, "deterministic_train_transform", False))


def tensor_digest(tensors) -> str:
    """sha256 over tensors' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        # reshape first: a 0-dim tensor (a BatchNorm's num_batches_tracked) has no byte view of its own
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def backbone_fingerprint(model: L.LightningModule) -> dict:
    """What the frozen features depend on, as plain values: architecture, structure, weights."""
    backbone = model.backbone
    # everything but the classifier timm names ("head" on a ViT, as before; "fc" on a ResNet; "head.fc" on a
    # ConvNeXt, whose frozen head norm and the pooling before it are part of the features)
    head = classifier_prefix(backbone)
    frozen = {name: p for name, p in backbone.state_dict().items() if not name.startswith(head)}
    structure = "\n".join(f"{name}: {type(module).__name__}({module.extra_repr()})"
                          for name, module in backbone.named_modules() if not name.startswith(head[:-1]))
    return {"architecture": (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture"),
            "global_pool": getattr(backbone, "global_pool", None),  # a ConvNeXt pools in its head
            "structure": hashlib.sha256(structure.encode()).hexdigest(),
            "weights": tensor_digest(frozen[k] for k in sorted(frozen))}


def split_inputs(dataset: Dataset) -> list[torch.Tensor] | None:
    """The input tensors of an in-memory split (TensorDataset, or a Subset of one), else None."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return [tensor[index] for tensor in dataset.dataset.tensors]
    if isinstance(dataset, TensorDataset):
        return list(dataset.tensors)
    return None


def split_fingerprint(datamodule: FractionDataModule, split: str) -> dict:
    """What the features of one split depend on, data side."""
    data = training_split(datamodule) if split == "train" else datamodule.splits[split]
    inputs = split_inputs(data.dataset)
    return {"dataset": datamodule.name, "datamodule": type(datamodule).__qualname__,
            "data_root": str(datamodule.data_root), "data_config": {k: repr(v) for k, v in
                                                                    sorted(datamodule.data_config.items())},
            "split": split, "n": len(data.ids),
            "ids": hashlib.sha256("\n".join(data.ids).encode(errors="surrogateescape")).hexdigest(),
            "labels": tensor_digest([torch.as_tensor(data.labels)]),
            "inputs": tensor_digest(inputs) if inputs is not None else None}


def training_split(datamodule: FractionDataModule) -> LabelledSplit:
    """The fraction subset that trains, in loader order (before shuffling)."""
    return LabelledSplit(datamodule.train_set, datamodule.train_labels, list(datamodule.train_ids))


def record_key(record: dict) -> str:
    """A cache entry's name: the sha256 of everything it depends on (as sorted JSON), 32 hex digits. The suite's
    caches (these features, benchmark/core/images.py's decoded images) all name their entries by it."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_key(backbone: dict, data: dict, precision: str | None) -> str:
    return record_key({"version": CACHE_VERSION, "backbone": backbone, "data": data, "precision": str(precision)})


def autocast_for(precision: str | None, device: torch.device):
    """The autocast the Trainer would apply for `precision`, so cached features match uncached ones."""
    precision = str(precision or "32")
    if precision.endswith("-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def compute_features(model: L.LightningModule, dataset: Dataset, batch_size: int, device: torch.device,
                     precision: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of every example of `dataset`, in order."""
    features, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with autocast_for(precision, device):
        for images, targets in loader:
            features.append(model.frozen_features(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(targets))
    return torch.cat(features), torch.cat(labels)


def load_or_compute(model: L.LightningModule, datamodule: FractionDataModule, split: str, cache_dir: Path,
                    device: torch.device, precision: str | None, backbone: dict) -> tuple[TensorDataset, bool]:
    """The split's features from the cache, computing and storing them on a miss; returns (dataset, hit)."""
    data = training_split(datamodule) if split == "train" else datamodule.splits[split]
    path = Path(cache_dir) / f"{split}-{cache_key(backbone, split_fingerprint(datamodule, split), precision)}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["features"].shape[0] == len(data.ids):
                return TensorDataset(stored["features"], stored["labels"]), True
        except Exception:  # noqa: BLE001 — an unreadable entry (e.g. a truncated copy) is recomputed, not fatal
            pass
    features, labels = compute_features(model, data.dataset, datamodule.eval_batch_size, device, precision)
    buffer = io.BytesIO()  # serialised first: torch.save on a full disk fails with a RuntimeError, a write an OSError
    torch.save({"features": features, "labels": labels}, buffer)
    try:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as err:  # the cache only saves time: a full disk costs the next run its hit, not this run
        warnings.warn(f"feature cache not written ({storage_problem(err, path)}); this run goes on with the "
                      "features in memory.", ConfigWarning, stacklevel=2)
    return TensorDataset(features, labels), False


class CachedDataModule(L.LightningDataModule):
    """A cache's view of `source`'s splits (features here, decoded images in images.py): the same classes, train
    size and split record; `hits` says which splits the cache already held."""

    def __init__(self, source: L.LightningDataModule, hits: dict[str, bool]):
        super().__init__()
        self.source = source
        self.hits = hits

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def n_train(self) -> int:
        return self.source.n_train

    def split_record(self) -> dict:
        return self.source.split_record()

    def loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", self.source.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", self.source.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", self.source.eval_batch_size, train=False)


class CachedFeatureDataModule(CachedDataModule):
    """The datamodule's splits as cached features, loaded with its batch sizes and its seeded shuffling."""

    def __init__(self, source: FractionDataModule, features: dict[str, TensorDataset], hits: dict[str, bool]):
        super().__init__(source, hits)
        self.features = features

    def loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        # A generator seeded as the source's loaders seed theirs (datamodules/base.py): the loader draws from it
        # as the image loader does, so the shuffled batches are the uncached run's
        # (tests/benchmark/core/test_features.py).
        return DataLoader(self.features[split], batch_size=batch_size, shuffle=train,
                          generator=torch.Generator().manual_seed(self.source.seed))


def cached_datamodule(model: L.LightningModule, datamodule: FractionDataModule, cache_dir: str | Path,
                      device: torch.device | str = "cpu", precision: str | None = None) -> CachedFeatureDataModule:
    """Switch `model` to read features and return loaders over the cached features of every split.

    `datamodule` must be set up; call `can_cache` first (raises ValueError when caching would change results).
    """
    if not can_cache(model, datamodule):
        raise ValueError(f"Features can be cached only for a method that trains on frozen features (linear) and a "
                         f"dataset with a deterministic training transform; got {type(model).__name__} on "
                         f"{datamodule.name!r}. Run without the feature cache.")
    datamodule.setup()
    device = torch.device(device)
    training, home = model.training, next(model.parameters()).device
    model.to(device).eval()
    try:
        backbone = backbone_fingerprint(model)
        loaded = {split: load_or_compute(model, datamodule, split, Path(cache_dir), device, precision, backbone)
                  for split in SPLITS}
    finally:
        model.to(home).train(training)
    model.read_features(True)
    print("feature cache: " + ", ".join(f"{split} {'hit' if hit else 'computed'}" for split, (_, hit) in loaded.items())
          + f" ({cache_dir})")
    return CachedFeatureDataModule(datamodule, {s: d for s, (d, _) in loaded.items()},
                                   {s: hit for s, (_, hit) in loaded.items()})
