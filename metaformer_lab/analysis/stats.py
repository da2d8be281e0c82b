"""Paired statistics over seeds, and the rank correlation with the paper, without scipy.

A row's runs and the baseline's runs of the same seed share their initialisation and data order, so the difference
is taken per seed (paired) and its spread is that of the differences: much tighter than two independent means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

# Student's t, two-sided 95% (the 0.975 quantile), for 1 to 30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t975(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (a table to 30, then Cornish-Fisher)."""
    if dof < 1:
        raise ValueError(f"dof={dof}: at least 1")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


@dataclass(frozen=True)
class PairedDifference:
    """The mean over seeds of (row - baseline) of the same seed, in accuracy points."""

    n: int  # seeds with both a row run and a baseline run
    mean: float
    se: float  # standard error of the mean difference (NaN for one seed)
    low: float  # 95% t interval (NaN for one seed)
    high: float

    @property
    def t(self) -> float:
        """The mean in standard errors (NaN where the spread is unknown or nil)."""
        return self.mean / self.se if self.se > 0 else math.nan


def paired_difference(row: pd.Series, baseline: pd.Series) -> PairedDifference:
    """`row` and `baseline`: accuracies indexed by seed; seeds missing from either are left out."""
    both = pd.concat({"row": row, "baseline": baseline}, axis=1, join="inner").dropna()
    differences = both["row"] - both["baseline"]
    n = len(differences)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(differences.mean())
    if n == 1:
        return PairedDifference(1, mean, math.nan, math.nan, math.nan)
    se = float(differences.std(ddof=1)) / math.sqrt(n)
    half = t975(n - 1) * se
    return PairedDifference(n, mean, se, mean - half, mean + half)


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation of two aligned series (ties get their average rank), NaN pairs left out."""
    both = pd.concat({"a": a, "b": b}, axis=1).dropna()
    if len(both) < 3:
        return math.nan
    return float(both["a"].rank().corr(both["b"].rank()))
