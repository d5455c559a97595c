"""Successive halving over a search cell's points (`SEARCH=halving`) within a fixed budget: Jamieson & Talwalkar,
"Non-stochastic Best Arm Identification and Hyperparameter Optimization", AISTATS 2016
(https://arxiv.org/abs/1502.07943), Algorithm 1 with the reduction factor eta of Li et al., "Hyperband", JMLR 2018
(https://arxiv.org/abs/1603.06560).

The rule. A cell of N points whose recipe trains E epochs gets a budget of B = BUDGET_FINALS x E epochs: what the
final runs of the leaderboard's 3 seeds cost, so that the search costs no more than the finals it feeds. With
eta = ETA, rung r (0 .. R-1) trains n_r = ceil(N / eta^r) points and keeps the best ceil(n_r / eta); R =
ceil(log_eta N) rungs, so the last rung keeps one point, the choice. Each rung gets an equal share B / R of the
budget, split equally among its points: a point of rung r trains floor(B / (R n_r)) epochs, at most E (a rung that
could afford more is the full search's own runs) and at least 1 (the one case that can pass B: B < R n_r, e.g. a
2-epoch recipe). Total: sum_r n_r x epochs_r <= B. Ranking within a rung is the search's own rule (final-epoch val
top-1, ties to the smaller lr, then the smaller weight decay; a failed point never survives).
  N = 6, E = 20 (the quick recipe), eta = 3: R = 2; 6 points x 5 epochs (E/4), the best 2 x 15 epochs (3E/4) and the
  better of those two is the choice: 60 epochs = 3E, against the full search's 6E.

A widened cell (the leaderboard adds an lr beyond an edge its choice sits at) halves again over all its points with
its base grid's rungs: the same epochs and number of rungs, each keeping a third of its points (the last keeps the
choice), so it reuses every run of its first halving and trains only the new points and the survivors not trained
at a rung yet. N = 6 widened to 8: 8 points x 5 epochs, the best 3 x 15; new runs 2 x 5 and at most 3 x 15 epochs.
Rungs computed afresh for 8 points (3 and 10 epochs) would share no run with the first halving.

Why this rule. The last survivor needs no run of E epochs on train: the finals retrain it on train+val, so stopping
at one point instead of continuing two points to E (5E per cell before) is what brings the search under the finals'
budget. Equal rung shares are Jamieson & Talwalkar's allocation (each rung halves the candidates at the same cost).
eta = 3 rather than 2 is Li et al.'s recommended reduction factor, and at N = 6 it gives 2 rungs (E/4, 3E/4) where
eta = 2 gives 3 (E/6, E/3, E/2): fewer, longer rungs, each ranking runs closer to the full length. BUDGET_FINALS is a
constant, not the grid's number of seeds, so that a cell chooses the same point (and reuses the same rung runs)
whether it trains 1 or 5 seeds; at 3 seeds the search costs at most the finals, at 1 seed up to 3x them.

Why rungs from scratch, not a pruner (Optuna's SuccessiveHalvingPruner, or our own on Lightning callbacks) that stops
or resumes one run at the full schedule. A pruned run is judged at epoch E/4 of an E-epoch cosine schedule, while its
lr is still near the peak, which is not the accuracy a run of E/4 epochs reaches; and continuing a kept run needs its
optimizer, schedule, RNG and loader state saved and restored across processes, which a run here does not keep (it
saves the tuned tensors only, benchmark/core/artifacts.py). A rung run is an ordinary run (resumable, claimable,
trained as the heads of one pass for the linear probe), named by its epochs (`search_lr<lr>_wd<wd>_e<epochs>`), each
FROM SCRATCH with the warmup and cosine schedule of its length (the recipe's warmup scaled by the same factor), and
its numbers are those of the same run trained directly: nothing is resumed, so there is nothing to differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ETA = 3  # each rung keeps the best 1/ETA of its points (rounded up)
BUDGET_FINALS = 3  # the search's budget in runs of the recipe's epochs: the leaderboard's 3 seeds of finals


@dataclass(frozen=True)
class Rung:
    epochs: int  # each point trains this many epochs from scratch
    points: int  # how many points this rung trains
    keep: int  # how many go on to the next rung (1 at the last: the choice)


def halving_rungs(n_points: int, epochs: int, base_points: int | None = None) -> list[Rung]:
    """The rungs of a cell of `n_points` (>= 2) points whose recipe trains `epochs` (>= 1) epochs (module docstring).
    A cell widened from `base_points` to `n_points` keeps its base grid's rungs (how many, their epochs) and each
    still keeps a third, the last one point: the runs of its first halving are reused."""
    if n_points < 2 or epochs < 1:
        raise ValueError(f"successive halving needs >= 2 points and >= 1 epoch, got {n_points} point(s) and {epochs} "
                         "epoch(s): give more SEARCH_LRS=/SEARCH_WDS= values or --epochs.")
    counts = [base_points or n_points]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / ETA))
    n_rungs = len(counts) - 1  # ceil(log_ETA N)
    budget = BUDGET_FINALS * epochs
    rung_epochs = [min(epochs, max(1, budget // (n_rungs * n))) for n in counts[:-1]]
    points = [n_points]
    while len(points) < n_rungs:
        points.append(math.ceil(points[-1] / ETA))
    return [Rung(e, n, keep) for e, n, keep in zip(rung_epochs, points, [*points[1:], 1], strict=True)]


def rung_warmup(warmup_epochs: float, epochs: int, full_epochs: int) -> float:
    """The recipe's warmup scaled to a rung of `epochs` (of `full_epochs`): the schedule keeps its shape."""
    return warmup_epochs * epochs / full_epochs
