"""Datasets as LightningDataModules, one file per family; `list_datasets()` names them."""

from __future__ import annotations

from datamodules.base import FractionDataModule, LabelledSplit, fraction_indices
from datamodules.embedded import DigitsDataModule, FashionHeldoutDataModule, FashionPretrainDataModule

_DATASETS: dict[str, type[FractionDataModule]] = {}
EMBEDDED_DATASETS = ("digits", "fashion_heldout")


def register_dataset(name: str, cls: type[FractionDataModule]) -> None:
    if name in _DATASETS:
        raise ValueError(f"Dataset {name!r} is already registered.")
    _DATASETS[name] = cls


for _cls in (DigitsDataModule, FashionHeldoutDataModule, FashionPretrainDataModule):
    register_dataset(_cls.name, _cls)


def list_datasets() -> list[str]:
    return list(_DATASETS)


def get_datamodule_class(name: str) -> type[FractionDataModule]:
    if name not in _DATASETS:
        import difflib

        known = list_datasets()
        match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" Did you mean {match[0]!r}?" if match else ""
        raise ValueError(f"Unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}.")
    return _DATASETS[name]


def create_datamodule(name: str, **kwargs) -> FractionDataModule:
    """`kwargs` as FractionDataModule takes them (data_config, train_fraction, seed, batch_size, data_root, ...)."""
    return get_datamodule_class(name)(**kwargs)


__all__ = ["EMBEDDED_DATASETS", "FractionDataModule", "LabelledSplit", "create_datamodule", "fraction_indices",
           "get_datamodule_class", "list_datasets", "register_dataset"]
