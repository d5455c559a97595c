"""The run config: what one benchmark run is, filled from the CLI over a recipe over defaults."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from backbones import closest_name
from benchmark.core.errors import ConfigError
from benchmark.core.store import check_results_dir
from datamodules import EMBEDDED_DATASETS

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "benchmark" / "recipes"
EMBEDDED_BACKBONE = "vit_embedded_p7_28"
EMBEDDED_WEIGHTS = REPO_ROOT / "results" / "embedded" / "vit_embedded_p7_28.safetensors"
PAPER_BACKBONE = "vit_base_patch16_224.orig_in21k"  # the paper's ImageNet-21k ViT-B/16 (not augreg)

# Fields a recipe may set; an explicit CLI value always wins over the recipe.
RECIPE_FIELDS = ("optimizer", "lr", "weight_decay", "epochs", "warmup_epochs", "batch_size")


def check_fraction(value) -> float:
    """The train fraction as a float in (0, 1]; raises ConfigError for anything else (text, NaN, 0, 1.5)."""
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"FRACTION must be a number in (0, 1] (the share of the training pool), got {value!r}; "
                          "e.g. FRACTION=0.1.") from None
    if math.isnan(fraction) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"FRACTION must be in (0, 1] (the share of the training pool), got {value!r}; "
                          "e.g. FRACTION=0.1 for 10%, FRACTION=1 for all of it.")
    return fraction


def check_shots(value) -> int | None:
    """SHOTS as a whole number >= 1 (training examples per class), or None; raises ConfigError for anything else."""
    if value is None:
        return None
    try:
        shots = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        shots = None
    if shots is None or shots < 1:
        raise ConfigError(f"SHOTS must be a whole number >= 1 (training examples per class), got {value!r}; "
                          "e.g. SHOTS=16.")
    return shots


NAME_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # names that become file and column names


def check_extra_test(value) -> dict[str, str]:
    """EXTRA_TEST as {name: folder}; names must be unique and file-name safe (they name result fields)."""
    items = dict(value or {})
    bad = [name for name in items if not NAME_SAFE.fullmatch(str(name))]
    if bad:
        raise ConfigError(f"EXTRA_TEST names {bad} must be letters, digits, '_', '-' or '.'; "
                          "give EXTRA_TEST=name=dir,name2=dir2, e.g. EXTRA_TEST=sketch=/data/imagenet-sketch.")
    return {str(name): str(folder) for name, folder in items.items()}


MAX_TAG = 64  # a tag is one part of a file name, beside the run's other parts


def check_tag(value) -> str:
    """TAG as one file-name-safe word (it names the run's files): no '/', no '..' tricks, at most MAX_TAG characters."""
    tag = "" if value is None else str(value)
    if tag and (not NAME_SAFE.fullmatch(tag) or len(tag) > MAX_TAG):
        shown = tag if len(tag) <= 40 else f"{tag[:40]}... ({len(tag)} characters)"
        raise ConfigError(f"TAG {shown!r} must be one name of at most {MAX_TAG} letters, digits, '_', '-' or "
                          "'.', starting with a letter or digit (it becomes part of the run's file names); "
                          "e.g. TAG=lr-sweep.")
    return tag


def option_text(value) -> str:
    """A method option's value as it appears in a run's name: 0.1 -> 0.1, 1e-05 -> 1e-05, '1-6' -> 1-6. Floats by
    repr, which round-trips: two different values never give one name."""
    return repr(value) if isinstance(value, float) else str(value).replace("/", "-")


def options_label(options: dict) -> str:
    """An option point as one text, keys sorted: "prompt_dropout=0.1;prompt_length=5" ("" for none)."""
    return ";".join(f"{key}={option_text(value)}" for key, value in sorted(options.items()))


DEFAULT_FRACTION = 0.1


@dataclass
class RunConfig:
    method: str = "vpt_deep"
    dataset: str = "digits"  # the embedded default
    train_fraction: float = DEFAULT_FRACTION
    shots: int | None = None  # k training examples per class (few-shot) instead of a fraction of each class
    seed: int = 0
    backbone: str | None = None  # None: embedded backbone on embedded datasets, else the paper's ViT-B/16
    weights: str | None = None  # local checkpoint; None: embedded weights / timm hub weights
    pretrained: bool = True  # False = random init (the "no pretraining" control)
    recipe: str | None = None  # None: "quick" on embedded datasets, "paper" elsewhere
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    epochs: int | None = None
    warmup_epochs: float | None = None
    batch_size: int | None = None
    head_init: str | None = None  # None: the recipe's (paper: "vpt", the VPT code's head), else "pytorch"
    method_options: dict = field(default_factory=dict)  # e.g. {"prompt_length": 10}
    options: dict = field(default_factory=dict)  # method options that also name the run (an OPTIONS grid's point)
    extra_test: dict = field(default_factory=dict)  # {name: folder}: test sets evaluated after training
    backbone_kwargs: dict = field(default_factory=dict)  # timm create_model kwargs, e.g. {"img_size": 384}
    data_root: str | None = None
    train_on: str = "train"  # "trainval" for the final runs of the selection protocol
    results_dir: str = "results"
    tag: str = ""  # extra name part for variants (e.g. a search point)
    num_workers: int = 0
    accelerator: str = "auto"
    devices: str = "auto"  # per node: a count ("2"), a list ("0,1") or "auto"; >1 in total needs a strategy
    num_nodes: int = 1  # machines of one run (SLURM: --nodes; Lightning reads ranks from SLURM's environment)
    strategy: str = "auto"  # Lightning strategy, e.g. "ddp": one run over devices x num_nodes processes
    precision: str | None = None
    compile: bool = False  # torch.compile the model's forward (benchmark/perf.py measures what it buys)
    checkpointing: bool = False  # gradient checkpointing of the backbone blocks: less memory, ~1 more forward
    feature_cache: bool = True  # linear probe on a deterministic transform: train the head on cached features
    image_cache: bool = False  # image-file datasets: decode + resize once, crop/flip/normalise on the device
    wandb: bool = False
    force: bool = False

    def __post_init__(self):
        self.train_fraction = check_fraction(self.train_fraction)  # text, NaN, <= 0, > 1 rejected with the fix
        self.shots = check_shots(self.shots)
        if self.shots is not None and self.train_fraction != DEFAULT_FRACTION:
            raise ConfigError(f"SHOTS={self.shots} and FRACTION={self.train_fraction:g} both say how much trains; "
                              "give one of them (SHOTS: examples per class, FRACTION: share of each class).")
        self.extra_test = check_extra_test(self.extra_test)
        self.tag = check_tag(self.tag)
        self.results_dir = check_results_dir(self.results_dir)
        twice = [k for k in self.options if k in self.method_options and self.method_options[k] != self.options[k]]
        if twice:  # after resolved() both hold the OPTIONS value: only a real conflict is refused
            raise ConfigError(f"Method option(s) {twice} are given by both METHOD_ARGS and OPTIONS; give each once "
                              "(OPTIONS: the values a grid sweeps, which also name the runs).")

    @property
    def embedded(self) -> bool:
        return self.dataset in EMBEDDED_DATASETS

    def resolved(self) -> RunConfig:
        """A copy with every None filled: defaults for the dataset family, then the recipe."""
        cfg = RunConfig(**asdict(self))
        if cfg.backbone is None:
            cfg.backbone = EMBEDDED_BACKBONE if cfg.embedded else PAPER_BACKBONE
        if cfg.backbone == EMBEDDED_BACKBONE and cfg.weights is None and cfg.pretrained:
            cfg.weights = str(EMBEDDED_WEIGHTS)  # this project's own weights file: no hub holds them
        if not cfg.pretrained:
            cfg.weights = None  # the random-init control ignores any weights
        cfg.recipe = cfg.recipe or ("quick" if cfg.embedded else "paper")
        recipe = load_recipe(cfg.recipe, cfg.method)
        for name in RECIPE_FIELDS:
            if getattr(cfg, name) is None:
                setattr(cfg, name, recipe[name])
        cfg.head_init = cfg.head_init or recipe.get("head_init", "pytorch")
        cfg.method_options = {**recipe.get("method_options", {}), **cfg.method_options, **cfg.options}
        if recipe.get("lr_scaling") == "batch/256" and self.lr is None:  # paper: lr = base_lr * batch / 256
            cfg.lr = recipe["lr"] * cfg.batch_size / 256
        return cfg

    def run_id(self) -> str:
        """Path of this run's result below results/runs, without suffix."""
        data = f"shots{self.shots}" if self.shots is not None else f"frac{self.train_fraction:g}"
        name = f"{data}_seed{self.seed}"
        # an option grid's values are part of the name: two points never share a result file
        name += "".join(f"_{key}={option_text(value)}" for key, value in sorted(self.options.items()))
        if self.train_on != "train":
            name += f"_{self.train_on}"
        if not self.pretrained:
            name += "_scratch"
        if self.tag:
            name += f"_{self.tag}"
        backbone = (self.backbone or "default").replace("/", "-")
        # a backbone built with other arguments (e.g. DINOv2 at img_size=224) is another backbone
        backbone += "".join(f"+{key}={value}" for key, value in sorted(self.backbone_kwargs.items())).replace("/", "-")
        return f"{self.dataset}/{backbone}/{self.method}/{name}"


RECIPE_KEYS = (*RECIPE_FIELDS, "lr_scaling", "head_init", "method_options")  # what `defaults` or an entry may set


def list_recipes() -> list[str]:
    """The recipes in benchmark/recipes/ (RECIPE=<name>); RECIPE=<path to a .yaml> reads any other recipe file."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    """The file of RECIPE=<name> (benchmark/recipes/<name>.yaml) or of RECIPE=<path to a .yaml file>."""
    if recipe.endswith((".yaml", ".yml")):
        if not Path(recipe).is_file():
            raise ValueError(f"Recipe file {recipe} does not exist. RECIPE is a name ({', '.join(list_recipes())}) "
                             "or the path of a .yaml file with `defaults:` and `methods:`.")
        return Path(recipe)
    known = list_recipes()
    if recipe not in known:
        raise ValueError(f"Unknown recipe {recipe!r}.{closest_name(recipe, known)} Known recipes: {', '.join(known)} "
                         "(or the path of a .yaml file).")
    return RECIPES_DIR / f"{recipe}.yaml"


def recipe_entry(path: Path, where: str, entry) -> dict:
    """`defaults` or one method's entry of a recipe file, checked: a mapping of RECIPE_KEYS."""
    entry = {} if entry is None else entry
    if not isinstance(entry, dict):
        raise ValueError(f"Recipe file {path}, {where}: must be a mapping of {', '.join(RECIPE_KEYS)}; got {entry!r}.")
    for key in entry:
        if key not in RECIPE_KEYS:
            raise ValueError(f"Recipe file {path}, {where}: unknown key {key!r}.{closest_name(str(key), RECIPE_KEYS)}"
                             f" Known keys: {', '.join(RECIPE_KEYS)}.")
    if not isinstance(entry.get("method_options") or {}, dict):
        raise ValueError(f"Recipe file {path}, {where}: method_options must be a mapping of option: value; got "
                         f"{entry['method_options']!r}.")
    return entry


def read_recipe(path: Path) -> tuple[dict, dict[str, dict]]:
    """A recipe file's `defaults` and its `methods` entries, every key and method name checked."""
    import methods  # registers every method; imported here so that the config stays cheap to import

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"Recipe file {path} is not valid YAML: {getattr(err, 'problem', None) or err}{where}.") \
            from None
    data = {} if data is None else data
    layout = ("a recipe file holds `defaults:` (what every method takes) and `methods:` (per method, what differs "
              "from the defaults)")
    if not isinstance(data, dict):
        raise ValueError(f"Recipe file {path} is a {type(data).__name__}; {layout}.")
    extra = [key for key in data if key not in ("defaults", "methods")]
    if extra:
        raise ValueError(f"Recipe file {path}: unknown top-level key {extra[0]!r}; {layout}.")
    entries = data.get("methods") or {}
    if not isinstance(entries, dict):
        raise ValueError(f"Recipe file {path}: `methods:` must map method names to entries; got {entries!r}.")
    for method in entries:
        if method not in methods.list_methods():
            raise ValueError(f"Recipe file {path}: `methods:` names {method!r}, which is no method."
                             f"{closest_name(str(method), methods.list_methods())}")
    return (recipe_entry(path, "defaults", data.get("defaults")),
            {method: recipe_entry(path, f"method {method!r}", entry) for method, entry in entries.items()})


def load_recipe(recipe: str, method: str) -> dict:
    """The recipe's values for one method: its `defaults`, then the method's entry (a null there drops a default;
    method_options merge option by option). The command line goes over these in RunConfig.resolved()."""
    path = recipe_path(recipe)
    defaults, entries = read_recipe(path)
    entry = entries.get(method, {})
    values = {**defaults, **entry}
    if entry.get("method_options") is not None:  # options merge one by one over the defaults' (null: none of them)
        values["method_options"] = {**(defaults.get("method_options") or {}), **entry["method_options"]}
    values = {key: value for key, value in values.items() if value is not None}
    missing = [k for k in RECIPE_FIELDS if k not in values]
    if missing:
        raise ValueError(f"Recipe file {path}: method {method!r} lacks {missing} (neither its entry nor `defaults` "
                         "sets them).")
    if values.get("lr_scaling") not in (None, "batch/256"):
        raise ValueError(f"Recipe file {path}, method {method!r}: lr_scaling must be 'batch/256' (lr = base lr * "
                         f"batch / 256, the VPT recipe) or absent (lr as given), got {values['lr_scaling']!r}.")
    return values
