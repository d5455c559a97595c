"""Successive halving over a search cell's points (`SEARCH=halving`): Jamieson & Talwalkar, "Non-stochastic Best Arm
Identification and Hyperparameter Optimization", AISTATS 2016 (https://arxiv.org/abs/1502.07943).

The rungs. A cell of N points and a recipe of E epochs has R = ceil(log2 N) rungs; rung r (0 .. R-1) trains
ceil(N / 2^r) points for E / 2^(R-1-r) epochs (rounded, at least 1), each FROM SCRATCH with the warmup and cosine
schedule of that length (the recipe's warmup scaled by the same factor), and keeps the best half (rounded up) for
the next rung, ranked by the search's own rule (final-epoch val top-1, ties to the smaller lr, then the smaller weight
decay; a failed point never survives). The last rung trains its two or so points at the full E: those runs are the
full search's own points (same settings, same run files), and the choice among them is the search's choice. N = 6:
6 points at E/4, 3 at E/2, 2 at E: 5E of training against the full search's 6E.

Why rungs from scratch, not a pruner (Optuna's SuccessiveHalvingPruner, or our own on Lightning callbacks) that stops
or resumes one run at the full schedule. A pruned run is judged at epoch E/4 of an E-epoch cosine schedule, while its
lr is still near the peak, which is not the accuracy a run of E/4 epochs reaches; and continuing a kept run needs its
optimizer, schedule, RNG and loader state saved and restored across processes, which a run here does not keep (it
saves the tuned tensors only, benchmark/core/artifacts.py). A rung run is an ordinary run (resumable, claimable,
trained as the heads of one pass for the linear probe), named by its epochs (`search_lr<lr>_wd<wd>_e<epochs>`), and
its numbers are those of the same run trained directly: nothing is resumed, so there is nothing to differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ETA = 2  # keep the best 1/ETA of each rung: "keep the best half"


@dataclass(frozen=True)
class Rung:
    epochs: int  # each point trains this many epochs from scratch
    points: int  # how many points this rung trains
    keep: int  # how many go on to the next rung (1 at the last: the choice)


def halving_rungs(n_points: int, epochs: int) -> list[Rung]:
    """The rungs of a cell of `n_points` (>= 2) points whose recipe trains `epochs` epochs (module docstring)."""
    counts = [n_points]
    while counts[-1] > 2:
        counts.append(math.ceil(counts[-1] / ETA))
    last = len(counts) - 1
    return [Rung(max(1, round(epochs / ETA ** (last - r))), n, counts[r + 1] if r < last else 1)
            for r, n in enumerate(counts)]


def rung_warmup(warmup_epochs: float, epochs: int, full_epochs: int) -> float:
    """The recipe's warmup scaled to a rung of `epochs` (of `full_epochs`): the schedule keeps its shape."""
    return warmup_epochs * epochs / full_epochs
