"""The paper's hyperparameter selection protocol (`make grid SEARCH=1`, `python -m benchmark.grid --search`).

Jia et al., "Visual Prompt Tuning", ECCV 2022 (https://arxiv.org/abs/2203.12119), Sec. 4.1 and App. A: for each
(dataset, method, train fraction), train on the train split over an lr x weight-decay grid and evaluate on val;
choose by final-epoch val top-1 (ties -> the smaller lr, then the smaller weight decay); then retrain on train+val
with every seed and report test top-1 mean +- std. The official code never published the chosen values; here
they are stored in every final result (`selected_lr`, `selected_weight_decay`) and printed in the report's table.

Search points are ordinary runs tagged `search_lr<lr>_wd<wd>` (seed = the grid's first seed, train_on=train);
final runs have train_on=trainval. Both are resumable like any grid run. The linear probe's points on cached
features train as the heads of one pass (benchmark/sweeps/heads.py), each writing the result its own run would.

`make leaderboard` gives every method the same search (benchmark/sweeps/budget.py: equal lr factors around each
recipe lr, equal weight decays, a cell whose choice sits at an lr edge widened); `SEARCH=halving` chooses among the
points by successive halving (benchmark/sweeps/halving.py). Every search writes its cells' budget records
(`<results>/budget/`, `<results>/budget.csv`) and the recipes of its choices (`<results>/recipes/`,
benchmark/sweeps/selected.py).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from benchmark.core.config import SEARCH_TAG_PREFIX, RunConfig, load_recipe, options_label, search_tag
from benchmark.core.errors import ConfigError
from benchmark.core.pipeline import RESULT_SETTINGS, changed_settings, diverged, run_record
from benchmark.core.store import atomic_write_json, read_result, result_path, results_path, write_summary
from benchmark.sweeps.budget import (
    MAX_WIDENINGS,
    budget_record,
    check_centred,
    lr_edge,
    read_budgets,
    widen_until_inside,
    write_budget,
    write_budget_table,
)
from benchmark.sweeps.halving import halving_rungs, rung_warmup
from benchmark.sweeps.heads import can_share_a_pass, train_in_one_pass
from benchmark.sweeps.runner import GridRunner, costliest_first, finished_result, worker_pool
from benchmark.sweeps.selected import cell_name, selected_entry, write_selected_recipes
from benchmark.sweeps.spec import GridSpec, Shard, describe, validate_all
from methods.base import LR_MAX

# The paper's grids (App. A). The lrs are *base* lrs: the paper recipe scales them by batch/256.
PAPER_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)  # SGD: linear, MLP-k, VPT
PAPER_FULL_LRS = (0.001, 0.0005, 0.0001, 0.005)  # AdamW: full fine-tuning, and the recipes that train with AdamW
PAPER_WDS = (0.01, 0.001, 0.0001, 0.0)
# Any other recipe (the CPU "quick" one): 3 lrs around the recipe's own lr x 2 weight decays = 6 runs per cell
# instead of the paper's 40, and it follows the recipe when its lr is retuned. The factor 5 spans the range
# in which a 40-epoch cosine run on the embedded tasks changes most (lr too small: underfit; too large: unstable).
RELATIVE_LR_FACTORS = (0.2, 1.0, 5.0)
RELATIVE_WDS = (0.001, 0.0)


@dataclass(frozen=True)
class SearchGrid:
    """Optional overrides of the grids: lrs (SEARCH_LRS), factors on each recipe's lr (SEARCH_LR_FACTORS, for a grid
    of methods whose lrs differ by orders of magnitude), weight decays (SEARCH_WDS); None = per recipe."""

    lrs: tuple[float, ...] | None = None
    weight_decays: tuple[float, ...] | None = None
    lr_factors: tuple[float, ...] | None = None
    halving: bool = False  # SEARCH=halving: successive halving over the points (benchmark/sweeps/halving.py)
    widen: int = 0  # times a cell whose choice sits at an lr edge is widened by one lr (the leaderboard's rule)

    @classmethod
    def override(cls, lrs: list[float] | None, weight_decays: list[float] | None,
                 lr_factors: list[float] | None = None, halving: bool = False) -> SearchGrid:
        if lrs and lr_factors:
            raise ConfigError("SEARCH_LRS= gives the lrs themselves and SEARCH_LR_FACTORS= multiplies each recipe's "
                              "lr: give one of them.")
        if lr_factors and min(lr_factors) <= 0:
            raise ConfigError(f"SEARCH_LR_FACTORS= must be > 0 (each multiplies a recipe's lr), got {lr_factors}.")
        return cls(tuple(lrs) if lrs else None, tuple(weight_decays) if weight_decays else None,
                   tuple(lr_factors) if lr_factors else None, halving=halving)

    @classmethod
    def equal_budget(cls, weight_decays: list[float] | None, lr_factors: list[float] | None, halving: bool = False,
                     widen: int = MAX_WIDENINGS) -> SearchGrid:
        """The leaderboard's search: the same lr factors around every method's recipe lr (centred on it) and the
        same weight decays for every method and recipe, a cell at an lr edge widened up to `widen` times."""
        factors = tuple(lr_factors or RELATIVE_LR_FACTORS)
        wds = tuple(RELATIVE_WDS if weight_decays is None else weight_decays)
        if min(factors) <= 0:
            raise ConfigError(f"SEARCH_LR_FACTORS= must be > 0 (each multiplies a recipe's lr), got {list(factors)}.")
        if len(set(factors)) * len(set(wds)) < 2:
            raise ConfigError(f"The leaderboard's budget is {len(set(factors)) * len(set(wds))} search point(s) per "
                              "method; give at least 2 (SEARCH_LR_FACTORS=0.2,1,5 SEARCH_WDS=0.001,0 gives 6).")
        if widen < 0:
            raise ConfigError(f"SEARCH_WIDEN= is how often a cell at an lr edge is widened (>= 0), got {widen}.")
        try:
            check_centred(factors)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return cls(None, wds, factors, halving=halving, widen=widen)

    @property
    def kind(self) -> str:
        return "halving" if self.halving else "full"

    def values(self, cfg: RunConfig) -> tuple[list[float], list[float]]:
        """(lrs, weight decays) for a resolved config, lrs as the recipe states them (base lrs for `paper`)."""
        if cfg.recipe == "paper" and not self.lr_factors:
            lrs, wds = (PAPER_FULL_LRS if cfg.optimizer == "adamw" else PAPER_LRS), PAPER_WDS
        else:
            recipe_lr = load_recipe(cfg.recipe, cfg.method)["lr"]
            factors = self.lr_factors or RELATIVE_LR_FACTORS
            lrs = tuple(float(f"{recipe_lr * f:.3g}") for f in factors)
            wds = PAPER_WDS if cfg.recipe == "paper" else RELATIVE_WDS
        return list(self.lrs or lrs), list(self.weight_decays if self.weight_decays is not None else wds)


def lr_multiplier(cfg: RunConfig) -> float:
    """batch/256 for recipes whose lrs are base lrs (the paper's linear scaling rule), else 1."""
    scaling = load_recipe(cfg.recipe, cfg.method).get("lr_scaling")
    return cfg.batch_size / 256 if scaling == "batch/256" else 1.0


def point_config(cell: RunConfig, lr: float, weight_decay: float, seed: int) -> RunConfig:
    """A search point: selected on val, so it skips the cell's extra test sets (the final runs evaluate them)."""
    resolved = cell.resolved()
    return replace(cell, seed=seed, lr=lr * lr_multiplier(resolved), weight_decay=weight_decay, train_on="train",
                   tag=search_tag(lr, weight_decay), extra_test={})


def final_config(cell: RunConfig, lr: float, weight_decay: float, seed: int) -> RunConfig:
    resolved = cell.resolved()
    return replace(cell, seed=seed, lr=lr * lr_multiplier(resolved), weight_decay=weight_decay, train_on="trainval",
                   tag="")


def search_points(cell: RunConfig, lrs: list[float], wds: list[float], seed: int) -> list[RunConfig]:
    """The cell's search points, lr-major: one per (lr, weight decay)."""
    return [point_config(cell, lr, wd, seed) for lr, wd in itertools.product(lrs, wds)]


def ranked(points: list[tuple[float, float, dict]]) -> list[tuple[float, float, dict]]:
    """The finished points (lr, weight_decay, result), best first: final-epoch val top-1, ties -> smaller lr, then
    smaller wd. Val top-1 is rounded to 1e-6 so that float noise cannot break a tie that the val set makes exact."""
    finished = [(lr, wd, r) for lr, wd, r in points
                if r.get("status") == "ok" and math.isfinite(float(r.get("val_top1", math.nan)))]
    return sorted(finished, key=lambda p: (-round(float(p[2]["val_top1"]), 6), p[0], p[1]))


def select(points: list[tuple[float, float, dict]]) -> tuple[float, float, dict] | None:
    """The best point by `ranked`'s rule, or None when none finished."""
    best = ranked(points)
    return best[0] if best else None


def selection_record(points: list[tuple[float, float, dict]], choice: tuple[float, float, dict],
                     kind: str = "full") -> dict:
    """What a final result stores about its selection: flat fields (they reach summary.csv) + every point (its
    latest result: with halving, that of the last rung it reached)."""
    lr, wd, best = choice
    protocol = "lr x wd search on val, final-epoch val top-1, ties -> smaller lr"
    if kind == "halving":
        protocol += "; successive halving over the points (benchmark/sweeps/halving.py)"
    return {"selected_lr": lr, "selected_weight_decay": wd, "selected_val_top1": best["val_top1"],
            "selected_lr_edge": lr_edge(lr, [p_lr for p_lr, _, _ in points]), "search_points": len(points),
            "selection": {"protocol": protocol, "search_seed": best["seed"],
                          "points": [{"lr": p_lr, "weight_decay": p_wd, "status": r.get("status"),
                                      "val_top1": r.get("val_top1")} | ({"epochs": r.get("epochs")} if kind ==
                                                                        "halving" else {})
                                     for p_lr, p_wd, r in points]}}


def stale_final(result: dict, lr: float, weight_decay: float, final: RunConfig) -> bool:
    """Whether a final's result is not the one of this choice: its selection record names another lr or weight decay;
    or, having none (the process that trained it adds it just after writing the result, e.g. another search on this
    folder; or it was trained outside a search), it was made with other settings than `final`'s, lr and wd included.
    """
    if "selected_lr" in result:
        return (result.get("selected_lr"), result.get("selected_weight_decay")) != (lr, weight_decay)
    made_with = result.get("config")
    return not (isinstance(made_with, dict) and all(name in made_with for name in RESULT_SETTINGS)
                and not changed_settings(made_with, final.resolved()))


def record_unselectable(cfg: RunConfig, reason: str) -> dict:
    """A final run that cannot start because no search point finished: recorded as failed, like any run."""
    resolved = cfg.resolved()
    result = run_record(resolved, time.time()) | {"status": "failed", "error": reason}
    atomic_write_json(result_path(resolved.results_dir, resolved.run_id()), result)
    return result


def diverged_point(cfg: RunConfig) -> dict | None:
    """A search point's earlier result when its loss diverged (and FORCE is off): a result of the search like an ok
    one, kept rather than trained again on every resume (an lr that diverges late costs most of a run each time).
    Other failures (out of memory, a killed worker, missing data) say nothing about the point and train again."""
    resolved = cfg.resolved()
    earlier = read_result(result_path(resolved.results_dir, resolved.run_id()))
    return earlier if diverged(earlier) and not cfg.force else None


def done_before(cfg: RunConfig) -> dict | None:
    """The result a search reads back instead of training `cfg`: finished ok, or a search point that diverged."""
    return finished_result(cfg) or (diverged_point(cfg) if cfg.train_on == "train" else None)


def count_done(configs: list[RunConfig]) -> int:
    """How many of `configs` a search will not train (for its ETA and dry run)."""
    return sum(done_before(cfg) is not None for cfg in configs)


def train_points(runner: GridRunner, configs: list[RunConfig], one_pass: bool = True) -> list[dict]:
    """Every search point's result: finished ones read back; the others trained as the heads of one pass where
    they can share it (the linear probe on cached features: benchmark/sweeps/heads.py), else one run each. Points
    that another process holds (two searches on one folder) are left to it, and waited for once this process has
    trained the rest: the choice needs every point."""
    pending = {}
    results = []
    for k, cfg in enumerate(configs):
        if (earlier := diverged_point(cfg)) is not None:  # counted as it was when trained, nothing trains
            runner.finish(cfg, "failed", f"{earlier['error']} (an earlier run; delete its result or FORCE=1 to "
                                         f"train it again)")
            results.append(earlier)
            continue
        to_train, existing = runner.to_train(cfg)
        results.append(existing)
        if to_train is not None:
            pending[k] = to_train
    trained = None
    if one_pass and pending and can_share_a_pass(configs[0].resolved()):
        trained = train_in_one_pass(list(pending.values()), name=f"{SEARCH_TAG_PREFIX}one_pass")
    for k, result in zip(pending, trained or [None] * len(pending), strict=True):
        if result is None:
            results[k] = runner.execute(configs[k], record_claimed=False)
        else:
            if result.get("status") != "claimed":
                runner.record(configs[k], result, result["wall_seconds"])
            results[k] = result
    return [runner.await_claimed(cfg, result) for cfg, result in zip(configs, results, strict=True)]


def rung_config(cell: RunConfig, lr: float, weight_decay: float, seed: int, epochs: int) -> RunConfig:
    """A search point trained for a halving rung's `epochs` from scratch (the full search's own point at the recipe's
    epochs), its warmup scaled with it."""
    point = point_config(cell, lr, weight_decay, seed)
    resolved = cell.resolved()
    if epochs == resolved.epochs:
        return point
    return replace(point, epochs=epochs, warmup_epochs=rung_warmup(resolved.warmup_epochs, epochs, resolved.epochs),
                   tag=f"{point.tag}_e{epochs}")


def lr_limit(resolved: RunConfig) -> float:
    """The largest lr the optimizer takes, in the recipe's lr units (base lrs where it scales them)."""
    return LR_MAX[resolved.optimizer] / lr_multiplier(resolved)


def planned_runs(cell: RunConfig, seeds: list[int], grid: SearchGrid) -> tuple[list[RunConfig], int]:
    """(the runs of a cell known before it trains, how many it will train unless widened): every point and the
    finals (named by seed alone: lr and wd are not in a final's run id, so each seed's final is one run whichever
    point the search picks); with halving, the first rung's points and the finals, the later rungs counted but not
    yet named."""
    lrs, wds = grid.values(cell.resolved())
    finals = [final_config(cell, lrs[0], wds[0], seed) for seed in seeds]
    if not grid.halving:
        return search_points(cell, lrs, wds, seeds[0]) + finals, len(lrs) * len(wds) + len(seeds)
    rungs = halving_rungs(len(lrs) * len(wds), cell.resolved().epochs)
    first = [rung_config(cell, lr, wd, seeds[0], rungs[0].epochs) for lr, wd in itertools.product(lrs, wds)]
    return first + finals, sum(rung.points for rung in rungs) + len(seeds)


@dataclass
class CellSearch:
    """One cell's search: trains the points a choice needs, each once (a widened cell chooses again over the runs it
    has), and keeps every search run's result for the cell's budget record. `planned`: the search runs the grid's
    progress counted for it; runs beyond them (widening) are added to the runner's total as they start."""

    runner: GridRunner
    cell: RunConfig
    seed: int
    weight_decays: list[float]
    grid: SearchGrid
    planned: int
    one_pass: bool = True
    base_points: int | None = None  # the points before any widening: a widened halving keeps their rungs
    runs: dict = field(default_factory=dict)  # run id -> result

    def results(self, configs: list[RunConfig]) -> list[dict]:
        ids = [cfg.resolved().run_id() for cfg in configs]
        new = {run_id: cfg for run_id, cfg in zip(ids, configs, strict=True) if run_id not in self.runs}
        extra = len(self.runs) + len(new) - self.planned
        if extra > 0:
            self.runner.total += extra
            self.planned += extra
        self.runs.update(zip(new, train_points(self.runner, list(new.values()), self.one_pass), strict=True))
        return [self.runs[run_id] for run_id in ids]

    def choose(self, lrs: list[float]) -> tuple[list, tuple | None]:
        """(every point with its latest result, the choice) over `lrs` x the weight decays."""
        pairs = list(itertools.product(lrs, self.weight_decays))
        if not self.grid.halving:
            results = self.results([point_config(self.cell, lr, wd, self.seed) for lr, wd in pairs])
            points = [(lr, wd, result) for (lr, wd), result in zip(pairs, results, strict=True)]
            return points, select(points)
        latest, alive, rung_points = {}, pairs, []
        for rung in halving_rungs(len(pairs), self.cell.resolved().epochs, self.base_points):
            results = self.results([rung_config(self.cell, lr, wd, self.seed, rung.epochs) for lr, wd in alive])
            rung_points = [(lr, wd, result) for (lr, wd), result in zip(alive, results, strict=True)]
            latest.update({(lr, wd): result for lr, wd, result in rung_points})
            alive = [(lr, wd) for lr, wd, _ in ranked(rung_points)[:rung.keep]]
        return [(lr, wd, latest[(lr, wd)]) for lr, wd in pairs], select(rung_points)


def search_cell(runner: GridRunner, cell: RunConfig, seeds: list[int], grid: SearchGrid,
                one_pass: bool = True) -> None:
    """A cell's search (widened where the grid says so), its final runs and its budget record."""
    resolved = cell.resolved()
    lrs, wds = grid.values(resolved)
    search = CellSearch(runner, cell, seeds[0], wds, grid, planned_runs(cell, seeds, grid)[1] - len(seeds),
                        one_pass, base_points=len(lrs) * len(wds))
    failed_before = runner.counts["failed"]
    widening = widen_until_inside(search.choose, lrs, grid.widen, lr_limit(resolved))
    points, choice = widening.points, widening.choice
    if choice is not None:  # its failed points (an lr that diverged) are results of the search, not grid failures
        runner.excuse_failed_points(runner.counts["failed"] - failed_before)
    finals = []
    for seed in seeds:
        if choice is None:
            final = replace(cell, seed=seed, train_on="trainval")
            record_unselectable(final, f"every search point of {describe(cell)} failed; see their results")
            runner.finish(final, "failed", "no search point finished")
            continue
        lr, wd, _ = choice
        record = selection_record(points, choice, grid.kind)
        final = final_config(cell, lr, wd, seed)
        result = runner.execute(final, rerun_if=lambda r: stale_final(r, lr, wd, final))  # noqa: B023
        # freshly trained, or recorded before a field of the record existed: add how lr and wd were chosen
        if result.get("status") == "ok" and result | record != result:
            resolved_final = final.resolved()
            atomic_write_json(result_path(resolved_final.results_dir, resolved_final.run_id()), result | record)
        finals.append(result)
    if choice is not None:
        write_cell_budget(cell, grid, len(lrs) * len(wds), widening, wds, list(search.runs.values()), finals,
                          seeds[0])


def write_cell_budget(cell: RunConfig, grid: SearchGrid, base_points: int, widening, wds: list[float],
                      search_results: list[dict], finals: list[dict], seed: int) -> None:
    """The cell's budget record (benchmark/sweeps/budget.py), with the recipe entry of its choice."""
    resolved = cell.resolved()
    lr, wd, _ = widening.choice
    entry = selected_entry(final_config(cell, lr, wd, seed).resolved(), lr, wd,
                           load_recipe(resolved.recipe, resolved.method).get("lr_scaling"))
    identity = {"dataset": resolved.dataset, "backbone": resolved.backbone, "method": resolved.method,
                "train_fraction": None if resolved.shots is not None else resolved.train_fraction,
                "shots": resolved.shots, "options": options_label(resolved.options), "recipe": resolved.recipe,
                "cell_name": cell_name(resolved)}
    record = budget_record(identity, grid.kind, base_points, widening, wds, resolved.epochs, search_results, finals,
                           entry)
    if grid.halving:  # the rungs of its last choice (after any widening): points x epochs each
        record["rungs"] = ",".join(f"{rung.points}x{rung.epochs}"
                                   for rung in halving_rungs(len(widening.lrs) * len(wds), resolved.epochs,
                                                             base_points))
    write_budget(resolved.results_dir, resolved.run_id().rsplit("/", 1)[0] + "/" + cell_name(resolved), record)


def search_cells(spec: GridSpec, grid: SearchGrid, shard: Shard | None = None) -> list[RunConfig]:
    """The cells of a search (of `shard` alone: its cells, each with its whole search and finals), every one checked
    before the first trains."""
    if spec.base.lr is not None or spec.base.weight_decay is not None:
        raise ConfigError("SEARCH=1 chooses lr and weight decay itself: drop LR=/WD= (--lr/--weight-decay), or "
                          "set the grids with SEARCH_LRS=... SEARCH_WDS=... (comma lists).")
    if spec.base.tag or spec.base.train_on != "train":
        raise ConfigError("SEARCH=1 sets the tag and train_on of its runs itself: drop --tag/--train-on.")
    cells = spec.cells()  # per dataset, method, fraction (or shots) and option point
    validate_all(cells)  # names, recipe, options: before resolving the grids needs the recipe
    grids = [grid.values(cell.resolved()) for cell in cells]
    if (grid.halving or grid.widen) and min(len(lrs) * len(wds) for lrs, wds in grids) < 2:
        raise ConfigError("SEARCH=halving and the leaderboard need at least 2 search points per cell; give more "
                          "SEARCH_LRS=/SEARCH_LR_FACTORS= or SEARCH_WDS= values.")
    extremes = [point_config(cell, max(lrs), max(wds), spec.seeds[0])
                for cell, (lrs, wds) in zip(cells, grids, strict=True)]
    validate_all(extremes)  # the largest lr and wd of each cell are the ones a range check can refuse
    return shard.select(cells) if shard is not None else cells


def later_rung_runs(cell: RunConfig, seeds: list[int], grid: SearchGrid) -> list[RunConfig]:
    """Stand-ins for a halving cell's later rungs, whose points the rung before chooses: as many runs as each rung
    trains, at the grid's first point and the rung's epochs (what an estimate of their cost needs); none for a full
    search."""
    if not grid.halving:
        return []
    lrs, wds = grid.values(cell.resolved())
    rungs = halving_rungs(len(lrs) * len(wds), cell.resolved().epochs)
    return [rung_config(cell, lrs[0], wds[0], seeds[0], rung.epochs) for rung in rungs[1:] for _ in range(rung.points)]


def plan_search(spec: GridSpec, grid: SearchGrid,
                shard: Shard | None = None) -> tuple[list[RunConfig], int, list[RunConfig]]:
    """(the runs a search would start that are known now, how many runs it would start, its cells) without
    training: finished runs left out; later halving rungs and widenings are counted or noted, not named."""
    cells = search_cells(spec, grid, shard)
    known, count = [], 0
    for cell in cells:
        runs, planned = planned_runs(cell, spec.seeds, grid)
        todo = [cfg for cfg in runs if done_before(cfg) is None]
        known += todo
        count += planned - (len(runs) - len(todo))
    return known, count, cells


def run_search(spec: GridSpec, grid: SearchGrid | None = None, jobs: int = 1, out: TextIO = sys.stdout,
               shard: Shard | None = None) -> GridRunner:
    """The selection protocol over every (dataset, method, fraction or shots, option point) of `spec` (or of its
    `shard`), one cell at a time or `jobs` cells at a time in worker processes (`search_in_workers`); writes
    summary.csv, budget.csv and the selected recipes."""
    grid = grid or SearchGrid()
    cells = search_cells(spec, grid, shard)
    if shard is not None:
        print(f"Shard {shard}: {len(cells)} of the search's {len(spec.cells())} cells", file=out, flush=True)
    plans = [planned_runs(cell, spec.seeds, grid) for cell in cells]
    runner = GridRunner(total=sum(n for _, n in plans), out=out, jobs=jobs,
                        finished=count_done([cfg for runs, _ in plans for cfg in runs]))
    try:
        if jobs > 1:
            search_in_workers(runner, cells, spec.seeds, grid, results_path(spec.base.results_dir, "logs"))
        else:
            for cell in cells:
                search_cell(runner, cell, spec.seeds, grid)
    finally:
        write_summary(spec.base.results_dir)
        write_budget_table(spec.base.results_dir)
        write_selected_recipes(spec.base.results_dir, read_budgets(spec.base.results_dir))
    return runner


def search_in_workers(runner: GridRunner, cells: list[RunConfig], seeds: list[int], grid: SearchGrid,
                      log_dir: Path) -> None:
    """Whole cells in `runner.jobs` worker processes: a cell's final runs need its whole search, and different cells
    share nothing, so a worker takes a cell (its search points, then its final runs) and the next when done.
    Costliest cells first; this process prints one progress line per cell (each run's line is in the worker's log)."""
    with worker_pool(runner.jobs, log_dir) as (pool, threads):
        print(f"Searching {len(cells)} cells, {runner.jobs} at a time ({threads} thread(s) each); each run's line: "
              f"{log_dir}/grid_worker_*.log", file=runner.out, flush=True)
        running = {pool.submit(search_cell_in_worker, cell, seeds, grid): cell
                   for cell in sorted(cells, key=costliest_first)}
        for future in as_completed(running):
            runner.absorb(running[future], *future.result())


def search_cell_in_worker(cell: RunConfig, seeds: list[int], grid: SearchGrid) -> tuple[dict, list[float], int]:
    """One cell in a worker, its progress lines in the worker's log; returns its runs' counts by status, the wall
    time of each that trained ok and the runs its widening added, for the grid's runner."""
    runs, planned = planned_runs(cell, seeds, grid)
    worker = GridRunner(total=planned, finished=count_done(runs))
    search_cell(worker, cell, seeds, grid)
    sys.stdout.flush()
    sys.stderr.flush()
    return worker.counts, worker.trained_seconds, worker.total - planned
