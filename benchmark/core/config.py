"""The run config: what one benchmark run is, filled from the CLI over a recipe over defaults."""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from backbones import closest_name
from benchmark.core.cli import extra_test_sets, method_options, one_option_point
from benchmark.core.errors import ConfigError
from benchmark.core.store import check_results_dir
from datamodules import EMBEDDED_DATASETS
from methods.base import HEAD_INITS, LR_MAX, OptimConfig

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
SEARCH_TAG_PREFIX = "search_"  # a search point's or halving rung's tag starts so (sweeps/search.py names them)


def is_search_tag(tag) -> bool:
    """Whether a run's tag names a search point or halving rung (not a final or an ordinary run)."""
    return str(tag).startswith(SEARCH_TAG_PREFIX)


def search_tag(lr: float, weight_decay: float) -> str:
    """The tag of a full search's point (a halving rung appends `_e<epochs>`)."""
    return f"{SEARCH_TAG_PREFIX}lr{lr:g}_wd{weight_decay:g}"


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


def setting(default=None, help: str = "", *, factory=None, flags: tuple[str, ...] = (), parse=None, choices=None,
            bounds: tuple[int, int] | None = None, off: str | None = None, metavar: str | None = None):
    """A RunConfig field and everything its command-line flag and range check need, declared once: `flags` (default
    --<name>), `parse` (text -> value; raises ValueError naming the fix), `choices`, integer `bounds` (checked by
    benchmark.core.validate), `off` (a flag that turns a switch off). benchmark.core.cli.add_settings reads them."""
    meta = {"help": help, "flags": flags, "parse": parse, "choices": choices, "bounds": bounds, "off": off,
            "metavar": metavar}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


def backbone_kwargs(text: str) -> dict:
    """BACKBONE_ARGS: "k=v k=v" as create_model keyword arguments (values parsed as YAML, like METHOD_ARGS)."""
    return dict(method_options(text, "BACKBONE_ARGS"))


DEFAULT_FRACTION = 0.1
BATCH_SIZE_RANGE = (1, 65_536)
SEED_RANGE = (0, 2**32 - 1)  # numpy's PCG64 seeds the splits and takes non-negative integers


@dataclass
class RunConfig:
    """One run. Each field is also the flag of every entry point that runs (`python -m benchmark.run -h`) and the
    make variable of the same name (FRACTION= is train_fraction's flag, RESULTS= an alias of RESULTS_DIR=)."""

    method: str = setting("vpt_deep", "the tuning method; `make help` lists them")
    dataset: str = setting("digits", "a registered dataset (default: the embedded digits task)")
    train_fraction: float = setting(DEFAULT_FRACTION, "share of each class of the train pool, in (0, 1]",
                                    flags=("--fraction",), parse=check_fraction)
    shots: int | None = setting(None, "k training examples per class (few-shot) instead of a fraction",
                                parse=check_shots)
    seed: int = setting(0, "seeds the split, the init and the data order", bounds=SEED_RANGE)
    backbone: str | None = setting(None, "any timm model name; default: the embedded ViT on the embedded datasets, "
                                   "else vit_base_patch16_224.orig_in21k (the paper's)")
    weights: str | None = setting(None, "local checkpoint (.npz, .pth/.pt, .safetensors); default: the embedded "
                                  "weights / timm's hub weights")
    pretrained: bool = setting(True, "pretrained weights (0: random init, the no-pretraining control)",
                               off="--scratch")
    recipe: str | None = setting(None, "quick (embedded default), paper, the path of a recipe .yaml file, or "
                                 "selected:<results> (the lr and wd a search there chose: "
                                 "benchmark/sweeps/selected.py)")
    optimizer: str | None = setting(None, "default: the recipe's", choices=tuple(LR_MAX))
    lr: float | None = setting(None, "default: the recipe's (paper recipes scale their base lr by batch / 256)")
    weight_decay: float | None = setting(None, "default: the recipe's", flags=("--weight-decay", "--wd"))
    epochs: int | None = setting(None, "default: the recipe's")
    warmup_epochs: float | None = setting(None, "linear warmup before the cosine decay; default: the recipe's")
    batch_size: int | None = setting(None, "the global batch; default: the recipe's", bounds=BATCH_SIZE_RANGE)
    head_init: str | None = setting(None, "default: the recipe's (paper: vpt, the VPT code's head)",
                                    choices=HEAD_INITS)
    method_options: dict = setting(help="method option, e.g. prompt_length=10 or reduction=8", factory=dict)
    options: dict = setting(help="method options that also name the run (one point of a grid's OPTIONS), e.g. "
                            "prompt_length=5", factory=dict, parse=one_option_point, metavar='"K=V;K2=V2"')
    extra_test: dict = setting(help="extra test sets evaluated after training: folders of class folders named like "
                               "the training classes (domain shift), e.g. sketch=/data/imagenet-sketch", factory=dict,
                               parse=extra_test_sets, metavar="NAME=DIR,...")
    backbone_kwargs: dict = setting(help='timm create_model arguments of the backbone (BACKBONE_ARGS=), e.g. '
                                    '"img_size=224" for DINOv2', factory=dict, flags=("--backbone-args",),
                                    parse=backbone_kwargs, metavar='"K=V ..."')
    data_root: str | None = setting(None, "the dataset's folder (datasets on disk)")
    train_on: str = setting("train", "trainval: the final runs of the selection protocol",
                            choices=("train", "trainval"))
    results_dir: str = setting("results", "the results folder", flags=("--results-dir", "--results"))
    tag: str = setting("", "extra name part for variants (e.g. a search point)")
    num_workers: int = setting(0, "data loader workers", bounds=(0, 256))
    accelerator: str = setting("auto", "Lightning accelerator: auto, cpu, gpu, ...")
    devices: str = setting("auto", "per node: a count (2), a list (0,1) or auto; >1 in total needs a strategy")
    num_nodes: int = setting(1, "machines of this one run (SLURM: --nodes; Lightning reads ranks from SLURM)")
    strategy: str = setting("auto", "Lightning strategy, e.g. ddp: one run over devices x num_nodes processes")
    precision: str | None = setting(None, "Lightning precision, e.g. bf16-mixed (autocast; GPU) or 32")
    compile: bool = setting(False, "torch.compile the model's forward (benchmark/perf.py measures what it buys)")
    checkpointing: bool = setting(False, "gradient checkpointing of the backbone blocks: less memory, ~1 more "
                                  "forward")
    feature_cache: bool = setting(True, "linear probe on a deterministic transform: train the head on cached "
                                  "frozen features (0: run the backbone every epoch)", off="--no-feature-cache")
    image_cache: bool = setting(False, "image-file datasets: decode and resize each image once into a memory-mapped "
                                "cache; crop, flip and normalise on the training device (docs/performance.md)")
    checkpoint: bool = setting(True, "save the tensors the run trained (for Full: the whole model) to "
                               "<results>/checkpoints/<run_id>.safetensors (0: keep only the result and predictions)")
    audit: bool = setting(False, "also score the test set after every epoch (the result's curves.test_top1), for "
                          "the selection audit; never used to choose anything")
    wandb: bool = setting(False, "log to Weights & Biases")
    force: bool = setting(False, "rerun even if a result exists")

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
        if ":" in cfg.method:  # METHOD=peft:hra is the registered hra: its recipe entry, its results folder
            import methods

            cfg.method = methods.get_method_class(cfg.method).method_name
        recipe = load_recipe(cfg.recipe, cfg.method)
        for name in RECIPE_FIELDS:
            if getattr(cfg, name) is None:
                setattr(cfg, name, recipe[name])
        cfg.head_init = cfg.head_init or recipe.get("head_init", "pytorch")
        cfg.method_options = {**recipe.get("method_options", {}), **cfg.method_options, **cfg.options}
        if recipe.get("lr_scaling") == "batch/256" and self.lr is None:  # paper: lr = base_lr * batch / 256
            cfg.lr = recipe["lr"] * cfg.batch_size / 256
        return cfg

    def optim_config(self) -> OptimConfig:
        """The optimizer and schedule of a resolved config, as the method's training step reads them."""
        return OptimConfig(optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
                           warmup_epochs=self.warmup_epochs, max_epochs=self.epochs)

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


@functools.lru_cache(maxsize=16)
def parsed_yaml(text: str):
    """A recipe's text parsed, once per distinct text: a search resolves its recipe several times per run, and
    parsing quick.yaml is most of that (keyed by the text itself, so an edited file is parsed again)."""
    return yaml.safe_load(text)


def read_recipe(path: Path) -> tuple[dict, dict[str, dict]]:
    """A recipe file's `defaults` and its `methods` entries, every key and method name checked."""
    import methods  # registers every method; imported here so that the config stays cheap to import

    try:
        data = copy.deepcopy(parsed_yaml(path.read_text()))  # a copy: callers may change what they get
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
