"""The equal-budget rule of `make leaderboard` and the budget each search cell spent, recorded for the report.

Every method gets the same search: the same lr factors around its own recipe lr (centred: their geometric mean is 1)
times the same weight decays, so the same number of points and epochs per point. A cell whose chosen lr is the lowest
or highest of its grid may have its best lr outside it: the grid is widened by one lr beyond that edge (the grid's
own step on that side) and the choice made again, up to `MAX_WIDENINGS` times and never past the optimizer's lr
limit. A widened cell has searched more points than the others; its record says so, and `budget_table` marks it.

Budget records (the leaderboard report reads them; benchmark/analysis/leaderboard.py):
- `<results>/budget/<dataset>/<backbone>/<method>/<data>[_<options>].json`: one per search cell (dataset, method,
  fraction or shots, option point), written when its finals are done, with the fields of `budget_record`:
  identity (`dataset`, `backbone`, `method`, `train_fraction`, `shots`, `options`, `recipe`), the search (`search`:
  "full" or "halving", `base_points`, `points`, `widenings`, `widened`: the edges widened in order joined by ",",
  `lrs`, `weight_decays` searched, `epochs`: a point's full budget; with halving, `rungs`: "6x5,2x15" = 6 points of 5
  epochs then 2 of 15, benchmark/sweeps/halving.py), its cost (`search_runs`, `search_epochs`,
  `search_images`: training images seen summed over its runs, `search_wall_seconds`), the finals' cost
  (`final_runs`, `final_epochs`, `final_images`, `final_wall_seconds`), the choice (`selected_lr` as the recipe
  states lrs, `selected_weight_decay`, `selected_val_top1`, `selected_lr_edge`: "lowest"/"highest" when the choice
  still sits at an edge after the widenings, else "") and `selected_recipe`, the recipe entry that reruns the finals.
- `<results>/budget.csv`: every record, one row per cell (lists joined by ","), plus `budget_equal`: False where the
  cell's (search, points, epochs) differs from the most common one of its comparison group (dataset, backbone,
  fraction or shots, options), the rows the report must not rank side by side with the others without a mark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.core.store import BUDGET_DIR, atomic_write_json, atomic_write_text, read_budgets, results_path

MAX_WIDENINGS = 2  # per cell: a choice still at the edge after two steps of 5x (25x) is reported as such
BUDGET_CSV = "budget.csv"
GROUP = ["dataset", "backbone", "train_fraction", "shots", "options"]  # cells compared with one another


def lr_edge(lr: float, lrs: list[float]) -> str:
    """'lowest' / 'highest' when the chosen lr is the smallest / largest of two or more searched: the best lr may
    lie outside the grid, so the report flags it; '' when it lies inside."""
    if len(set(lrs)) < 2:
        return ""
    return "lowest" if lr == min(lrs) else "highest" if lr == max(lrs) else ""


def check_centred(lr_factors: tuple[float, ...]) -> None:
    """The leaderboard's lr factors: centred on the recipe lr (geometric mean 1), so no method's grid leans one way."""
    centre = math.exp(sum(math.log(f) for f in lr_factors) / len(lr_factors))
    if not math.isclose(centre, 1.0, rel_tol=1e-6):
        raise ValueError(f"SEARCH_LR_FACTORS={','.join(f'{f:g}' for f in lr_factors)} are not centred on the recipe "
                         f"lr (their geometric mean is {centre:.3g}, not 1); give factors symmetric around 1, e.g. "
                         "0.2,1,5 or 0.1,0.3,1,3,10.")


def widened_lr(lrs: list[float], edge: str) -> float:
    """One lr beyond `edge` of `lrs` (two or more), at the grid's own step on that side, to 3 significant digits."""
    ordered = sorted(set(lrs))
    if edge == "highest":
        return float(f"{ordered[-1] * ordered[-1] / ordered[-2]:.3g}")
    return float(f"{ordered[0] * ordered[0] / ordered[1]:.3g}")


@dataclass
class Widening:
    """What `widen_until_inside` ends with: the lrs searched, every point, the choice, the edges widened."""

    lrs: list[float]
    points: list
    choice: tuple | None
    widened: list[str] = field(default_factory=list)


def widen_until_inside(choose, lrs: list[float], cap: int, lr_limit: float = math.inf) -> Widening:
    """`choose(lrs)` -> (points, choice or None); while the choice's lr is an edge of `lrs` and fewer than `cap`
    widenings were made, add one lr beyond that edge and choose again. An lr above `lr_limit` (the optimizer's
    range, in the recipe's lr units) is never added: the choice stays at the edge and its record says so."""
    points, choice = choose(lrs)
    widened: list[str] = []
    while choice is not None and len(widened) < cap:
        edge = lr_edge(choice[0], lrs)
        if not edge:
            break
        new = widened_lr(lrs, edge)
        if new > lr_limit:
            break
        lrs = sorted([*lrs, new])
        widened.append(edge)
        points, choice = choose(lrs)
    return Widening(lrs, points, choice, widened)


def cost(results: list[dict]) -> dict:
    """Runs, epochs, images seen (n_train x epochs, where a run recorded n_train) and wall seconds of `results`."""
    epochs = [int(r.get("epochs") or 0) for r in results]
    return {"runs": len(results), "epochs": sum(epochs),
            "images": sum(int(r.get("n_train") or 0) * e for r, e in zip(results, epochs, strict=True)),
            "wall_seconds": sum(float(r.get("wall_seconds") or 0.0) for r in results)}


def budget_record(identity: dict, search: str, base_points: int, widening: Widening, weight_decays: list[float],
                  epochs: int, search_results: list[dict], final_results: list[dict], selected_recipe: dict) -> dict:
    """One cell's budget record (the fields in the module docstring)."""
    lr, wd, best = widening.choice
    searched, finals = cost(search_results), cost(final_results)
    return identity | {
        "search": search, "base_points": base_points, "points": len(widening.lrs) * len(weight_decays),
        "widenings": len(widening.widened), "widened": ",".join(widening.widened), "lrs": widening.lrs,
        "weight_decays": list(weight_decays), "epochs": epochs,
        **{f"search_{key}": value for key, value in searched.items()},
        **{f"final_{key}": value for key, value in finals.items()},
        "selected_lr": lr, "selected_weight_decay": wd, "selected_val_top1": best.get("val_top1"),
        "selected_lr_edge": lr_edge(lr, widening.lrs), "selected_recipe": selected_recipe}


def budget_path(results_dir: str | Path, cell_id: str) -> Path:
    return results_path(results_dir, BUDGET_DIR, f"{cell_id}.json")


def write_budget(results_dir: str | Path, cell_id: str, record: dict) -> None:
    atomic_write_json(budget_path(results_dir, cell_id), record)


def budget_table(records: list[dict]) -> pd.DataFrame:
    """One row per cell, lists joined by ",", and `budget_equal` (module docstring)."""
    frame = pd.DataFrame([{key: ",".join(f"{v:g}" for v in value) if isinstance(value, list) else value
                           for key, value in record.items() if key != "selected_recipe"} for record in records])
    if frame.empty:
        return frame
    budget = frame["search"] + "/" + frame["points"].astype(str) + "/" + frame["epochs"].astype(str)
    keys = [frame[key].astype(object).where(frame[key].notna(), "") for key in GROUP]  # a None is a key too
    usual = budget.groupby(keys).transform(lambda b: b.mode().iloc[0])
    return frame.assign(budget_equal=budget == usual)


def write_budget_table(results_dir: str | Path) -> Path:
    """`<results>/budget.csv` from every record in the folder (each shard or worker rewrites it whole)."""
    path = Path(results_dir) / BUDGET_CSV
    atomic_write_text(path, budget_table(read_budgets(results_dir)).to_csv(index=False))
    return path
