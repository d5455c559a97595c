"""The per-task settings a search chose, as recipes users rerun without the search (`RECIPE=selected:<results>`).

After a search (`make leaderboard`, `make grid SEARCH=1`), every (dataset, backbone, fraction or shots, option point)
gets one recipe file, `<results>/recipes/<dataset>/<backbone>/<data>[_<options>].yaml`, in the format of
benchmark/recipes/*.yaml (benchmark/core/config.py `load_recipe` reads it): `methods:` holds per searched method the
chosen `lr` (as the base recipe states lrs: a base lr where `lr_scaling` is batch/256) and `weight_decay`, with every
other setting the final runs trained with (optimizer, epochs, warmup, batch, head init, method options), so that one
file reruns the finals. It is rebuilt from the budget records (benchmark/sweeps/budget.py), so shards and workers
that share a results folder all end with the same files.

    make grid METHODS=lora,linear FRACTIONS=0.1 SEEDS=3,4 TRAIN_ON=trainval RECIPE=selected:results   # new seeds
    make bench METHOD=lora FRACTION=0.1 SEED=5 TRAIN_ON=trainval RECIPE=selected:results               # one run

A grid resolves `selected:<dir>` cell by cell and a single run (benchmark/run.py) its own config, both through
`with_selected_recipe`; RECIPE=<the file's path> works too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.store import atomic_write_text, results_path

PREFIX = "selected:"
HEADER = ("# The lr and weight decay a search chose per method (benchmark/sweeps/selected.py), with the settings its\n"
          "# final runs trained with: RECIPE=<this file> reruns them without the search.\n")


def cell_name(cfg: RunConfig) -> str:
    """The data and option part of a run's name without its seed, tag or train_on: `frac0.1`, `shots4_p=5`."""
    plain = replace(cfg, seed=0, tag="", train_on="train")
    return plain.run_id().rsplit("/", 1)[1].replace("_seed0", "", 1)


def recipe_path(results_dir: str | Path, dataset: str, backbone: str, name: str) -> Path:
    return results_path(results_dir, "recipes", dataset, backbone.replace("/", "-"), f"{name}.yaml")


def selected_entry(final: RunConfig, lr: float, weight_decay: float, lr_scaling: str | None) -> dict:
    """The recipe entry of a cell's choice: `final` (a resolved final run) with the chosen base lr and weight decay."""
    entry = {"optimizer": final.optimizer, "lr": lr, "weight_decay": weight_decay, "epochs": final.epochs,
             "warmup_epochs": final.warmup_epochs, "batch_size": final.batch_size, "head_init": final.head_init,
             # an option grid's values name the runs: they come from OPTIONS, not from the recipe
             "method_options": {k: v for k, v in final.method_options.items() if k not in final.options}}
    return entry | ({"lr_scaling": lr_scaling} if lr_scaling else {})


def write_selected_recipes(results_dir: str | Path, records: list[dict]) -> list[Path]:
    """One recipe file per (dataset, backbone, data and options) of the budget `records` (every method in it)."""
    files: dict[Path, dict] = {}
    for record in records:
        path = recipe_path(results_dir, record["dataset"], record["backbone"], record["cell_name"])
        files.setdefault(path, {})[record["method"]] = record["selected_recipe"]
    for path, entries in files.items():
        text = yaml.safe_dump({"defaults": {}, "methods": dict(sorted(entries.items()))}, sort_keys=False)
        atomic_write_text(path, HEADER + text)
    return list(files)


def with_selected_recipe(cfg: RunConfig) -> RunConfig:
    """`cfg` with RECIPE=selected:<dir> resolved to its cell's recipe file (`recipe_for`); any other recipe as is."""
    return recipe_for(cfg) if str(cfg.recipe).startswith(PREFIX) else cfg


def recipe_for(cell: RunConfig) -> RunConfig:
    """`cell` with RECIPE=selected:<dir> replaced by the file of its dataset, backbone, data and options; a cell
    whose file or method entry is missing is refused with the fix (ConfigError), before anything trains."""
    folder = Path(cell.recipe[len(PREFIX):] or "results")
    name = cell_name(cell)
    dataset_dir = folder / "recipes" / cell.dataset
    backbones = [cell.backbone.replace("/", "-")] if cell.backbone else sorted(
        p.name for p in dataset_dir.glob("*") if p.is_dir())
    if len(backbones) > 1:
        raise ConfigError(f"RECIPE=selected:{folder} has choices for DATASET={cell.dataset} on several backbones "
                          f"({', '.join(backbones)}); give BACKBONE=<one of them>.")
    path = dataset_dir / (backbones[0] if backbones else "-") / f"{name}.yaml"
    fix = (f"run the search first (make leaderboard DATASETS={cell.dataset} RESULTS={folder}), or give the "
           "RESULTS folder of one that ran")
    if not path.is_file():
        raise ConfigError(f"RECIPE=selected:{folder} has no choices for DATASET={cell.dataset} ({name}): no "
                          f"{path}; {fix}.")
    if cell.method not in ((yaml.safe_load(path.read_text()) or {}).get("methods") or {}):
        raise ConfigError(f"RECIPE=selected:{folder}: {path} has no choice for METHOD={cell.method}; {fix}.")
    return replace(cell, recipe=str(path))
