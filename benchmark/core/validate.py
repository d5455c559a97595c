"""Every check of a run's inputs, in one place, before any training: a typo costs seconds, not a night of GPU time.

Two entry points, called by `benchmark.run` (and usable by a grid to check all its runs up front):

- `validate_config(cfg)` resolves the config and checks it without reading data or weights: names (method,
  dataset, backbone, recipe) with a closest-name suggestion, numbers in range, method options, the backbone's
  geometry (built on PyTorch's `meta` device: no memory, no time), the results directory, W&B. It raises one
  `ConfigError` listing every problem found, each with its fix.
- `validate_data(datamodule, cfg)` runs after the datamodule's `setup()`: labels in range, every class in the
  training pool, a fraction large enough for one example per class (shots are checked by the split itself), image
  files (extra test sets' included) present and decodable.

File-level dataset checks (split files, image paths) live in `datamodules.checks` so datamodules can call them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import warnings
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import timm
import torch

import methods
from backbones import closest_name, create_backbone, data_config, not_on_hub
from benchmark.core.config import EMBEDDED_BACKBONE, RunConfig, list_recipes, load_recipe
from benchmark.core.errors import ConfigError, ConfigWarning
from benchmark.core.store import log_dir, result_path, split_path
from datamodules import get_datamodule_class, list_datasets
from datamodules.base import asked_examples, smallest_fraction
from datamodules.checks import check_image_files, prepare_hint
from datamodules.files import ImageFilesDataModule
from methods import create_method, get_method_class
from methods.base import HEAD_INITS, optim_problems


def unknown_name(kind: str, name: str, known: list[str], variable: str) -> str:
    return (f"Unknown {kind} {name!r}.{closest_name(str(name), known)} Known {kind}s: {', '.join(known)} "
            f"(set {variable}=<name>).")


# --- names -------------------------------------------------------------------------------------------
def check_names(cfg: RunConfig) -> list[str]:
    """Method, dataset, recipe and backbone must be known: checked before the recipe is even read."""
    problems = []
    if ":" in cfg.method:  # METHOD=peft:<type>: resolved by the method registry, which names the fix
        try:
            methods.get_method_class(cfg.method)
        except ValueError as err:
            problems.append(str(err))
    elif cfg.method not in methods.list_methods():
        problems.append(unknown_name("method", cfg.method, methods.list_methods(), "METHOD"))
    if cfg.dataset not in list_datasets():
        problems.append(unknown_name("dataset", cfg.dataset, list_datasets(), "DATASET"))
    is_file = str(cfg.recipe).endswith((".yaml", ".yml"))  # RECIPE=<path>: read (and checked) with the recipe
    if cfg.recipe is not None and not is_file and cfg.recipe not in list_recipes():
        problems.append(unknown_name("recipe", cfg.recipe, list_recipes(), "RECIPE"))
    if cfg.backbone is not None:
        uses_hub = cfg.pretrained and cfg.weights is None and cfg.backbone != EMBEDDED_BACKBONE
        problems += check_backbone_name(cfg.backbone, uses_hub=uses_hub)
    return problems


def check_backbone_name(name: str, uses_hub: bool) -> list[str]:
    """A timm model name, and — when its weights come from the hub — a pretrained tag timm knows."""
    architecture, _, tag = name.partition(".")
    if architecture not in timm.list_models():
        vits = timm.list_models("*vit*")
        return [f"Unknown backbone {name!r}.{closest_name(architecture, vits)} Use a timm ViT name "
                f"(`timm.list_models('*vit*')` lists {len(vits)}), e.g. vit_base_patch16_224.orig_in21k "
                "(set BACKBONE=<name>)."]
    if uses_hub and (why := not_on_hub(name)):
        return [why]  # MoCo v3 (a tag of ours, backbones/ssl_vits.py): only a local checkpoint has its weights
    tagged = timm.list_pretrained(f"{architecture}.*") if uses_hub else []
    if uses_hub and not tagged:
        return [f"Backbone {name!r} has no pretrained weights timm could fetch; pass a local checkpoint with "
                "WEIGHTS=<file> (.npz, .pth/.pt, .safetensors), or PRETRAINED=0 for the random-init control."]
    if tag and uses_hub and name not in tagged:
        return [f"Backbone {architecture!r} has no pretrained weights tagged {tag!r}.{closest_name(name, tagged)}"
                f" Tags timm knows: {', '.join(tagged) or 'none'}; or pass local WEIGHTS=<file>."]
    return []


# --- numbers -----------------------------------------------------------------------------------------
def is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def in_int_range(name: str, variable: str, value, bounds: tuple[int, int]) -> list[str]:
    low, high = bounds
    if not is_integer(value) or not low <= value <= high:
        return [f"{name} must be an integer in [{low}, {high:,}], got {value!r} (set {variable}=<n>)."]
    return []


def check_numbers(cfg: RunConfig) -> list[str]:
    """Values a resolved config must have: every recipe field filled and in range."""
    problems = []  # the fraction and shots are checked by RunConfig itself, at every construction
    for f in fields(cfg):  # the integer ranges RunConfig declares with its fields
        if f.metadata.get("bounds"):
            problems += in_int_range(f.name.upper(), f.name.upper(), getattr(cfg, f.name), f.metadata["bounds"])
    fixes = {"EPOCHS": "set EPOCHS=<n>", "optimizer": f"the recipe {cfg.recipe!r} or --optimizer",
             "LR": f"set LR=<value>; recipe {cfg.recipe!r} uses {recipe_value(cfg, 'lr')}",
             "weight decay": "set WD=<value>", "warmup_epochs": "--warmup-epochs"}
    problems += [f"{p[:-1]} ({next(fix for name, fix in fixes.items() if p.startswith(name))})."
                 for p in optim_problems(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs)]
    if cfg.train_on not in ("train", "trainval"):
        problems.append(f"train_on must be 'train' or 'trainval', got {cfg.train_on!r}.")
    problems += check_image_cache(cfg)
    if cfg.head_init not in HEAD_INITS:
        problems.append(f"head_init must be one of {', '.join(HEAD_INITS)}, got {cfg.head_init!r} (the recipe "
                        f"{cfg.recipe!r}).")
    return problems


def check_image_cache(cfg: RunConfig) -> list[str]:
    """IMAGE_CACHE=1 stores decoded image files: only datasets read from image files have them."""
    if not cfg.image_cache or issubclass(get_datamodule_class(cfg.dataset), ImageFilesDataModule):
        return []
    readable = [name for name in list_datasets() if issubclass(get_datamodule_class(name), ImageFilesDataModule)]
    return [f"IMAGE_CACHE=1 caches decoded image files, but DATASET={cfg.dataset} is not read from image files (it is "
            f"held in memory); drop IMAGE_CACHE, or use an image-file dataset "
            f"({', '.join(n for n in readable if not n.startswith('vtab/'))}, vtab/<task>)."]


def recipe_value(cfg: RunConfig, name: str):
    try:
        return load_recipe(cfg.recipe, cfg.method)[name]
    except (ValueError, OSError, KeyError):
        return "?"


# --- model -------------------------------------------------------------------------------------------
def check_method_options(cfg: RunConfig) -> list[str]:
    """Option names the method has, and values its options dataclass accepts (prompt_length >= 1, ...)."""
    options_cls = get_method_class(cfg.method).options_cls
    valid = [f.name for f in fields(options_cls)]
    unknown = [k for k in cfg.method_options if k not in valid]
    how = 'set options with METHOD_ARGS="key=value ..." (--method-arg key=value)'
    if unknown:
        hints = "".join(closest_name(k, valid) for k in unknown)
        return [f"Method {cfg.method!r} has no option(s) {unknown}.{hints} Its options: {valid or 'none'}; {how}."]
    try:
        options_cls(**cfg.method_options)
    except (TypeError, ValueError) as err:
        return [f"{cfg.method}: {err} Options now (recipe {cfg.recipe!r} + METHOD_ARGS): {cfg.method_options}; {how}."]
    return []


def meta_backbone(cfg: RunConfig):
    """The run's backbone architecture on PyTorch's `meta` device: no weights read or fetched, no memory."""
    # weight_init="skip": timm's initialisation runs through Python reference kernels on `meta` (0.05 s for the
    # embedded ViT, 0.1-0.3 s for ViT-B) and decides nothing about whether the model builds.
    with torch.device("meta"):
        try:
            return create_backbone(cfg.backbone, pretrained=False, weight_init="skip", **cfg.backbone_kwargs)
        except TypeError:  # a ViT variant without timm's weight_init argument
            return create_backbone(cfg.backbone, pretrained=False, **cfg.backbone_kwargs)


def planned_data_config(cfg: RunConfig) -> dict:
    """The backbone's data config (input size, mean, std, ...) without its weights: timm takes it from the model
    name's pretrained config, so the datamodule can be built and checked before any weights are read."""
    return data_config(meta_backbone(cfg))


def check_model_builds(cfg: RunConfig, builds: dict[str, list[str]] | None = None) -> list[str]:
    """Build the backbone and the method on the `meta` device: catches a non-ViT backbone and options that do
    not fit its geometry (e.g. an adapter reduction that does not divide the width) without allocating memory.
    `builds` (a grid's checks share one) keeps each model's answer: a grid's cells mostly differ in data and seed,
    which the build never reads, and VTAB-1k's 19 tasks x 67 methods took minutes built one by one."""
    key = repr((cfg.method, cfg.backbone, sorted(cfg.backbone_kwargs.items()), sorted(cfg.method_options.items()),
                cfg.optim_config(), cfg.head_init))  # everything the build below reads
    if builds is not None and key in builds:
        return list(builds[key])
    problems = build_problems(cfg)
    if builds is not None:
        builds[key] = problems
    return problems


def build_problems(cfg: RunConfig) -> list[str]:
    """check_model_builds' build, uncached."""
    try:
        backbone = meta_backbone(cfg)
        with torch.device("meta"):
            create_method(cfg.method, backbone, 2, cfg.optim_config(), head_init=cfg.head_init, **cfg.method_options)
    except (TypeError, ValueError, RuntimeError) as err:
        texts = {key: value for key, value in cfg.backbone_kwargs.items() if isinstance(value, str)}
        if isinstance(err, TypeError) and texts:  # e.g. img_size=abc: timm's message is Python's operator error
            given = ", ".join(f"{key}={value!r}" for key, value in texts.items())
            return [f"BACKBONE_ARGS {given} is text where {cfg.backbone} expects another type ({err}); give a number "
                    "or a list, e.g. BACKBONE_ARGS=\"img_size=224\"."]
        return [f"{err} (BACKBONE={cfg.backbone}, METHOD={cfg.method})"]
    return []


def check_weights(cfg: RunConfig) -> list[str]:
    """WEIGHTS must exist; whether they are a checkpoint that fits is checked when they load (backbones.weights)."""
    if cfg.weights is None or Path(cfg.weights).is_file():
        return []
    return [f"WEIGHTS file {cfg.weights!r} does not exist; pass the path of a .npz, .pth/.pt or .safetensors "
            "checkpoint, or leave WEIGHTS empty to use timm's pretrained weights."]


# --- files -------------------------------------------------------------------------------------------
def check_results_dir(cfg: RunConfig) -> list[str]:
    """Create the results directory and write a probe file into it: a permission problem shows now, not after
    training (the probe is what the atomic result writer does: a temp file in the same directory)."""
    folder = Path(cfg.results_dir)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again: a check writes nothing
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as err:
        return [f"results directory {str(folder)!r} is not writable ({err.strerror or err}); "
                "pass RESULTS=<a writable dir> (--results-dir)."]
    finally:
        for made in created:
            with contextlib.suppress(OSError):  # another process may have written into it meanwhile
                made.rmdir()
    return []


def check_extra_test(cfg: RunConfig) -> list[str]:
    """Every EXTRA_TEST folder exists (its class names are matched against the training classes once data loads)."""
    return [f"EXTRA_TEST {name}={folder}: no such folder; give <name>=<dir of class folders named like the "
            "training classes>." for name, folder in cfg.extra_test.items() if not Path(folder).is_dir()]


def check_data_root(cfg: RunConfig) -> list[str]:
    if cfg.data_root is None or Path(cfg.data_root).is_dir():
        return []
    fix = prepare_hint(cfg.dataset)
    if cfg.embedded:
        fix = "leave DATA_ROOT empty: the embedded datasets install with `make data` (Fashion-MNIST from Debian)"
    return [f"DATA_ROOT {cfg.data_root!r} does not exist (or is not a directory) for DATASET={cfg.dataset}; "
            f"check the path, or {fix}."]


def check_run_paths(cfg: RunConfig) -> list[str]:
    """The run's files (result, split record, logs) all lie inside the results folder, with parts a filesystem takes."""
    try:
        for path in (result_path, split_path, log_dir):
            path(cfg.results_dir, cfg.run_id())
    except ConfigError as err:
        return [str(err)]
    return []


def check_warmup(given: RunConfig, resolved: RunConfig) -> list[str]:
    """A warmup longer than the run never reaches the recipe's lr: refused when asked for, a warning when it is the
    recipe's own warmup meeting a shorter EPOCHS."""
    warmup, epochs = resolved.warmup_epochs, resolved.epochs
    if not (isinstance(warmup, (int, float)) and isinstance(epochs, int) and epochs >= 1) or warmup <= epochs:
        return []
    if given.warmup_epochs is not None:
        return [f"WARMUP_EPOCHS={warmup:g} is longer than the run (EPOCHS={epochs}): the lr would never reach its "
                f"peak nor decay; give WARMUP_EPOCHS below {epochs} (--warmup-epochs), or more EPOCHS."]
    warnings.warn(f"The recipe {resolved.recipe!r} warms up for {warmup:g} epochs, longer than EPOCHS={epochs}: "
                  "this run never reaches the recipe's lr (give WARMUP_EPOCHS=<n> below EPOCHS to change it).",
                  ConfigWarning, stacklevel=3)
    return []


def check_devices(cfg: RunConfig) -> list[str]:
    """DEVICES=<n> on a machine without an accelerator asks for n CPU processes: more than its cores is a typo."""
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available()
                                          and not torch.backends.mps.is_available())
    count = str(cfg.devices).strip()
    cores = os.cpu_count() or 1
    if on_cpu and count.isdigit() and int(count) > cores:
        return [f"DEVICES={count} asks for {count} processes on the CPU (no GPU found), and this machine has {cores} "
                f"cores; give DEVICES=1 (up to {cores}), or run where the GPUs are."]
    return []


# --- W&B ---------------------------------------------------------------------------------------------
def wandb_key_problem() -> str | None:
    """Why the W&B API key cannot work (absent or malformed), or None; never contacts the server."""
    key = os.environ.get("WANDB_API_KEY")
    try:
        from wandb.sdk.lib.wbauth.validation import check_api_key
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
    except ImportError:  # another wandb version: a format check of our own
        check_api_key = lambda k: None if len(k.split("-")[-1]) >= 40 else "API key must have 40+ characters."
        read_netrc_auth = lambda host: None
    if key is not None:
        problem = check_api_key(key.strip())
        return f"WANDB_API_KEY is malformed: {problem.rstrip('.')}" if problem else None
    try:
        key = read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    except Exception as err:  # noqa: BLE001 — wandb raises its own AuthenticationError for a malformed key
        return f"the W&B key in ~/.netrc is malformed: {err}"
    return None if key else "no W&B API key (neither WANDB_API_KEY nor `wandb login`)"


def check_wandb(cfg: RunConfig) -> RunConfig:
    """W&B asked for but unusable: fall back (to offline, or to CSV only without the package) with a warning."""
    if not cfg.wandb:
        return cfg
    if importlib.util.find_spec("wandb") is None:
        warnings.warn("WANDB=1 but the wandb package is not installed: logging to CSV only "
                      f"({cfg.results_dir}/logs). Install it with `pip install wandb`.", ConfigWarning, stacklevel=2)
        return replace(cfg, wandb=False)
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return cfg
    problem = wandb_key_problem()
    if problem:
        os.environ["WANDB_MODE"] = "offline"
        warnings.warn(f"{problem}; W&B logs offline to ./wandb instead. Fix the key (`wandb login`), then upload "
                      "with `wandb sync wandb/offline-run-*`.", ConfigWarning, stacklevel=2)
    return cfg


# --- entry points ------------------------------------------------------------------------------------
def validate_config(cfg: RunConfig, builds: dict[str, list[str]] | None = None) -> RunConfig:
    """The resolved config, checked; raises one ConfigError with every problem found (`builds`: see
    check_model_builds)."""
    problems = check_names(cfg)
    if problems:  # the recipe cannot be read for an unknown method or recipe
        raise ConfigError(problems)
    try:
        resolved = cfg.resolved()
    except (ValueError, OSError) as err:  # a recipe file missing, malformed, or without the method's values
        raise ConfigError(f"The recipe for METHOD={cfg.method} cannot be read: {err} Fix the recipe file, or choose "
                          f"another RECIPE ({', '.join(list_recipes())} or the path of a .yaml file).") from err
    problems = check_numbers(resolved) + check_method_options(resolved) + check_weights(resolved)
    problems += check_data_root(resolved) + check_extra_test(resolved) + check_results_dir(resolved)
    problems += check_run_paths(resolved) + check_warmup(cfg, resolved) + check_devices(resolved)
    if not problems:  # the meta build needs sane numbers and options, and would repeat their errors
        problems += check_model_builds(resolved, builds)
    if problems:
        raise ConfigError(problems)
    return check_wandb(resolved)


def validate_data(datamodule, cfg: RunConfig) -> None:
    """Checks needing the loaded splits (call after `datamodule.setup()`); raises ConfigError."""
    problems = []
    num_classes = datamodule.num_classes
    for split, data in datamodule.splits.items():
        labels = np.asarray(data.labels)
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
        if bad.size:
            problems.append(f"{cfg.dataset} {split} split has labels {bad[:8].tolist()}"
                            f"{' ...' if bad.size > 8 else ''} outside 0..{num_classes - 1} ({num_classes} classes); "
                            "class ids must be remapped to 0..C-1 — re-run `make prepare` or fix the split file.")
    pool = datamodule.training_pool().labels
    counts = np.bincount(pool[(pool >= 0) & (pool < num_classes)], minlength=num_classes)
    absent = np.flatnonzero(counts == 0)
    if absent.size and datamodule.sparse_classes:
        warnings.warn(f"{cfg.dataset}: class(es) {absent[:8].tolist()}{' ...' if absent.size > 8 else ''} have no "
                      f"example in the training pool ({datamodule.train_on}); they can only be mispredicted.",
                      stacklevel=2)
    elif absent.size:
        problems.append(f"{cfg.dataset}: class(es) {absent[:8].tolist()}{' ...' if absent.size > 8 else ''} have "
                        f"no example in the training pool ({datamodule.train_on}) but {num_classes} classes are "
                        "expected; every class needs training examples — check the split file.")
    present = counts[counts > 0]
    if cfg.shots is None and (not absent.size or datamodule.sparse_classes):  # shots: checked by the split itself
        if present.size and asked_examples(int(present.min()), cfg.train_fraction) < 1:
            problems.append(f"FRACTION={cfg.train_fraction:g} is too small for {cfg.dataset}: it asks for no example "
                            f"of its smallest class ({present.min()} training examples), and the split keeps one per "
                            "class whatever the fraction, so the run would not train on the share asked. The smallest "
                            f"valid fraction is {smallest_fraction(present):g} (one example per class).")
    if problems:
        raise ConfigError(problems)
    splits = {**datamodule.splits, **{f"extra test {n}": e.split for n, e in datamodule.extra_tests.items()}}
    for split, data in splits.items():
        samples = getattr(data.dataset, "samples", None)  # torchvision DatasetFolder convention: [(path, label)]
        if samples:
            check_image_files([path for path, _ in samples], split=split)
