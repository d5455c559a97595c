"""Datasets as LightningDataModules, one file per family; `list_datasets()` names them."""

from __future__ import annotations

from datamodules.base import FractionDataModule, fraction_indices
from datamodules.embedded import DigitsDataModule, FashionHeldoutDataModule, FashionPretrainDataModule
from datamodules.fgvc import FGVC_DATAMODULES
from datamodules.folder import FolderDataModule
from datamodules.labelled_split import LabelledSplit
from datamodules.suites import SUITES, dataset_group, suite_datasets
from datamodules.vtab import VTAB_DATAMODULES, VTAB_TASKS

_DATASETS: dict[str, type[FractionDataModule]] = {}
EMBEDDED_DATASETS = ("digits", "fashion_heldout")
FGVC_DATASETS = tuple(cls.name for cls in FGVC_DATAMODULES)  # cub, nabirds, flowers, dogs, cars
VTAB_DATASETS = tuple(f"vtab/{task}" for task in VTAB_TASKS)


def register_dataset(name: str, cls: type[FractionDataModule]) -> None:
    if name in _DATASETS:
        raise ValueError(f"Dataset {name!r} is already registered.")
    _DATASETS[name] = cls


for _cls in (DigitsDataModule, FashionHeldoutDataModule, FashionPretrainDataModule, *FGVC_DATAMODULES,
             *VTAB_DATAMODULES, FolderDataModule):
    register_dataset(_cls.name, _cls)


def list_datasets() -> list[str]:
    return list(_DATASETS)


def get_datamodule_class(name: str) -> type[FractionDataModule]:
    if name not in _DATASETS:  # benchmark.core.validate suggests the closest name before a run gets here
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(list_datasets())}.")
    return _DATASETS[name]


def create_datamodule(name: str, **kwargs) -> FractionDataModule:
    """`kwargs` as FractionDataModule takes them (data_config, train_fraction, seed, batch_size, data_root, ...)."""
    return get_datamodule_class(name)(**kwargs)


__all__ = ["EMBEDDED_DATASETS", "FGVC_DATASETS", "SUITES", "VTAB_DATASETS", "FractionDataModule",
           "LabelledSplit", "create_datamodule", "dataset_group", "fraction_indices", "suite_datasets",
           "get_datamodule_class", "list_datasets", "register_dataset"]
