"""What a grid is: methods x fractions (or shots) x method options x seeds x datasets over one base config, its
shards, and the check of every run before the first trains."""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field, replace

from backbones import closest_name
from benchmark.core.config import RunConfig, option_text
from benchmark.core.errors import ConfigError
from benchmark.core.validate import validate_config
from benchmark.sweeps.selected import with_selected_recipe
from datamodules import SUITES, list_datasets, suite_datasets
from methods.registry import fig3_methods

FIG3_FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.0)  # the training-data ratios of Fig. 3 (Jia et al., ECCV 2022)
PAPER_METHODS = tuple(fig3_methods())  # full, linear, bias, adapter, vpt_shallow, vpt_deep
ZOO_FRACTIONS = (1.0,)  # the zoo grid (every method) at all the data, like Table 1; the Fig. 3 grid shares its runs


def describe(cfg: RunConfig, seed: bool = True) -> str:
    """One line naming a run (or, with seed=False, a search cell: every seed's runs)."""
    tag = f" {cfg.tag}" if cfg.tag else ""
    on = " trainval" if cfg.train_on == "trainval" else ""
    data = f"shots={cfg.shots}" if cfg.shots is not None else f"frac={cfg.train_fraction:g}"
    options = "".join(f" {key}={option_text(value)}" for key, value in sorted(cfg.options.items()))
    return f"{cfg.method} {cfg.dataset} {data}{options}{f' seed={cfg.seed}' * seed}{on}{tag}"

def expand_suites(names: list[str]) -> list[str]:
    """DATASETS with each suite (`vtab-1k`, `fgvc`: datamodules/suites.py) replaced by its datasets, a dataset named
    twice kept at its first place; a name that is neither a suite nor a dataset is refused with the fix."""
    known = list_datasets()
    expanded: dict[str, None] = {}
    for name in names:
        if name not in SUITES and name not in known:
            hint = closest_name(name, [*SUITES, *known])
            raise ConfigError(f"DATASETS names {name!r}, which is no dataset or suite.{hint} Suites: "
                              f"{', '.join(SUITES)}; datasets: {', '.join(known)}.")
        expanded.update(dict.fromkeys(suite_datasets(name) if name in SUITES else [name]))
    return list(expanded)


@dataclass
class GridSpec:
    """What to sweep; every other run setting comes from `base` (a RunConfig with the CLI's run options).

    `shots` (few-shot: k examples per class), when given, replaces `fractions` as the training-data axis; `options`
    (an OPTIONS grid's points, each a dict of method options) is one more axis, each point naming its runs.
    `datasets` may name suites (`vtab-1k`, `fgvc`), expanded to their datasets; RECIPE=selected:<results> gives
    each cell the recipe its search chose (benchmark/sweeps/selected.py).
    """

    methods: list[str]
    fractions: list[float]
    seeds: list[int]
    datasets: list[str]
    base: RunConfig = field(default_factory=RunConfig)
    shots: list[int] | None = None
    options: list[dict] | None = None

    def __post_init__(self):
        examples = {"methods": "vpt_deep,linear", "fractions": "0.1,1.0", "seeds": "0,1", "datasets": "digits",
                    "shots": "1,2,4,8,16"}
        for name, example in examples.items():
            values = getattr(self, name)
            if values is None and name == "shots":
                continue
            if not values:
                raise ConfigError(f"{name.upper()} is empty; give at least one value, e.g. {name.upper()}={example}.")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name.upper()} lists a value twice: {values}.")
        self.datasets = expand_suites(self.datasets)

    def data_points(self) -> list[dict]:
        """The training-data axis as RunConfig fields: a fraction each, or `shots` each (fraction left default)."""
        if self.shots is not None:
            return [{"shots": k} for k in self.shots]
        return [{"train_fraction": f} for f in self.fractions]

    def cells(self) -> list[RunConfig]:
        """Every run but the seeds: dataset x method x data x options (the selection protocol's search cells)."""
        cells = [replace(self.base, dataset=d, method=m, **data, options=options)
                 for d, m, data, options in itertools.product(self.datasets, self.methods, self.data_points(),
                                                              self.options or [self.base.options])]
        return [with_selected_recipe(cell) for cell in cells]

    def configs(self) -> list[RunConfig]:
        """Dataset-major order: a stopped grid leaves whole datasets finished, and the report can draw them."""
        return [replace(cell, seed=s) for cell in self.cells() for s in self.seeds]

@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` disjoint parts of a grid (`SHARD=index/count`, index counted from 0).

    The grid's runs are ranked by the sha256 of their run id and dealt out in turn: the parts are disjoint, together
    they are the whole grid, their sizes differ by at most one, and every machine and Python computes the same
    parts (hashlib, not `hash()`, which PYTHONHASHSEED salts). Ranking by a hash instead of dealing out the grid's
    own order spreads cheap and costly runs alike: METHODS x FRACTIONS dealt in order to 5 shards would give each
    shard a single fraction. Each shard runs its part in the grid's order. Every shard must get the same grid.
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not int(match[1]) < int(match[2]):
            raise ConfigError(f"SHARD must be i/n with 0 <= i < n (part i of n, counted from 0), got {text!r}; "
                              "e.g. SHARD=0/3, SHARD=1/3 and SHARD=2/3 together run the whole grid.")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, configs: list[RunConfig]) -> list[RunConfig]:
        """This shard's runs, in the grid's order."""
        digests = [hashlib.sha256(cfg.resolved().run_id().encode()).hexdigest() for cfg in configs]
        ranked = sorted(range(len(configs)), key=lambda k: (digests[k], k))
        mine = set(ranked[self.index::self.count])
        return [cfg for k, cfg in enumerate(configs) if k in mine]

def validate_all(configs: list[RunConfig]) -> None:
    """Check every run before the first trains: one typo must not surface hours into a grid."""
    problems: dict[str, None] = {}
    builds: dict[str, list[str]] = {}  # one meta build per model, not per cell
    for cfg in configs:
        try:
            validate_config(cfg, builds)
        except ConfigError as err:
            problems.update({f"{describe(cfg)}: {p}" if len(configs) > 1 else p: None for p in err.problems})
    if problems:
        raise ConfigError(list(problems))
