"""Statistics over seeds: the mean with its 95% confidence interval, the paired difference to a reference method,
the beats / tie / below verdict, and V-PETL Bench's performance-parameter trade-off (PPT).

The interval is Student's t over seeds (scipy.stats.t): a benchmark has 2 to 5 seeds, where the normal quantile
(1.96) is too narrow and a bootstrap has too few distinct resamples (10 for 3 seeds) to estimate a tail; t assumes
roughly normal seed-to-seed noise, the usual assumption for seeds. A difference to Full is paired by seed (same
dataset, fraction and seed share the split and the data order), so the seed-to-seed noise both methods share cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

CONFIDENCE = 0.95
PPT_SCALE = 1e7  # C of V-PETL Bench's PPT: the parameter count at which the discount reaches exp(-log10 2)
VERDICTS = ("beats", "tie", "below")
ONE_SEED = "n=1"  # a verdict that needs an interval and has one seed


@dataclass(frozen=True)
class Interval:
    """A mean over n values and its confidence interval; low and high are NaN when n < 2 (no interval)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t confidence interval (n - 1 degrees of freedom) of the non-NaN values."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sem = float(scipy.stats.sem(values))
    if sem == 0.0:  # identical values: scipy's interval is undefined at scale 0; the interval is the point
        return Interval(mean, mean, mean, n)
    low, high = scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def paired_difference(scores: pd.Series, reference: pd.Series, confidence: float = CONFIDENCE) -> Interval:
    """`scores - reference` over the seeds both have (each Series indexed by seed): the paired t interval, the one
    scipy.stats.ttest_rel(scores, reference).confidence_interval() gives, defined here at zero spread too."""
    common = scores.index.intersection(reference.index)
    return t_interval(scores.loc[common].to_numpy() - reference.loc[common].to_numpy(), confidence)


def verdict(difference: Interval) -> str:
    """"beats" when the whole interval of the difference is above 0, "below" when it is below 0, else "tie";
    ONE_SEED when there is no interval."""
    if difference.n < 2:
        return ONE_SEED
    if difference.low > 0:
        return "beats"
    return "below" if difference.high < 0 else "tie"


def seed_intervals(frame: pd.DataFrame, by: list[str], value: str = "test_top1",
                   confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group of `by`: mean, std (ddof 1; 0 for one value), n and the t interval (ci_low, ci_high) of `value`."""
    rows = []
    for key, group in frame.groupby(by, sort=True):
        interval = t_interval(group[value], confidence)
        std = float(group[value].std()) if interval.n > 1 else 0.0
        rows.append(dict(zip(by, key, strict=True)) | {"mean": interval.mean, "std": std, "n": interval.n,
                                                        "ci_low": interval.low, "ci_high": interval.high})
    return pd.DataFrame(rows, columns=[*by, "mean", "std", "n", "ci_low", "ci_high"])


def ppt(top1_percent: float, tuned_params: float) -> float:
    """V-PETL Bench's PPT (Xin et al., 2024, https://v-petl-bench.github.io/): M × exp(-log10(P / C + 1)), M the
    top-1 as a fraction, P the tuned parameters (a count), C = 1e7; it reproduces the PPT column of their README."""
    return top1_percent / 100 * math.exp(-math.log10(tuned_params / PPT_SCALE + 1))
