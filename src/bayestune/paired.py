"""Paired differences between a reference method and every other, with bootstrap intervals.

Two methods run on the same (task, seed) share the task's difficulty and the seed's data
order and head initialisation, so the difference of their scores on that pair is far less
noisy than either score. The comparison is the mean of those differences over every (task,
seed) pair both methods finished, and its 95% interval comes from resampling the pairs
(``scipy.stats.bootstrap`` on the vector of differences, so a pair's two scores always move
together): BCa, 9999 resamples, a fixed seed so a table rebuilt from the same runs prints the
same interval. Where BCa is undefined (a resample distribution with too many ties) the
percentile interval stands in; fewer than :data:`MIN_PAIRS` pairs give no interval at all (a
bootstrap of one or two numbers only repeats them); from there on, all differences equal give
a zero-width interval at that value.

Which pairs are compared: budgeted methods against the reference at the same budget; methods
without a budget (full, LoRA, BitFit: budget label ``-``) against the reference at the main
budget, and a budgeted method against a reference without a budget at the main budget too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
MIN_PAIRS = 3
EQUAL_TOLERANCE = 1e-9  # score points (x100): differences closer than this count as equal
NO_BUDGET = "-"
DEFAULT_MAIN_BUDGET = "0.005"  # the paper's budget, as a table label

CI_BCA, CI_PERCENTILE, CI_EQUAL, CI_TOO_FEW = "BCa", "percentile", "all equal", "too few pairs"
COLUMNS = ("reference", "reference_budget", "method", "budget", "pairs", "mean_difference",
           "ci_low", "ci_high", "ci_method")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    method: str  # one of CI_BCA, CI_PERCENTILE, CI_EQUAL, CI_TOO_FEW


def bootstrap_mean_interval(differences: np.ndarray | list[float], *,
                            confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> Interval:
    """Mean of paired differences and its bootstrap interval (see the module's rules)."""
    values = np.asarray(differences, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Interval(np.nan, np.nan, np.nan, CI_TOO_FEW)
    mean = float(values.mean())
    if len(values) < MIN_PAIRS:
        return Interval(mean, np.nan, np.nan, CI_TOO_FEW)
    if np.ptp(values) <= EQUAL_TOLERANCE:
        return Interval(mean, mean, mean, CI_EQUAL)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # BCa warns and returns NaN when the resampled means tie too often; the
            # percentile interval is then the fallback, so the warning is expected.
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            result = stats.bootstrap((values,), np.mean, n_resamples=n_resamples,
                                     confidence_level=confidence, method=method,
                                     vectorized=True, rng=np.random.default_rng(seed))
        low, high = (float(x) for x in result.confidence_interval)
        if np.isfinite(low) and np.isfinite(high):
            return Interval(mean, low, high, CI_BCA if method == "BCa" else CI_PERCENTILE)
    return Interval(mean, np.nan, np.nan, CI_TOO_FEW)


def _compared_budget(reference_budget: str, budget: str, main_budget: str) -> bool:
    if reference_budget == budget:
        return True
    return NO_BUDGET in (reference_budget, budget) and main_budget in (reference_budget, budget)


def paired_differences(scores: pd.DataFrame, reference: str = "bayestune",
                       main_budget: str = DEFAULT_MAIN_BUDGET) -> pd.DataFrame:
    """Reference minus every other (method, budget), paired by (task, seed), one row each.

    ``scores`` is the long table (columns method, budget, task, seed, score); budgets are the
    table's labels (``"0.005"``, ``"-"``). Rows with no common (task, seed) are left out; an
    empty frame (with :data:`COLUMNS`) when the reference did not run.
    """
    keys = ["task", "seed"]
    ours = scores[scores["method"] == reference]
    rows = []
    for reference_budget, ref in ours.groupby("budget", sort=False):
        ref_scores = ref.set_index(keys)["score"]
        others = scores[scores["method"] != reference]
        for (method, budget), other in others.groupby(["method", "budget"], sort=False):
            if not _compared_budget(str(reference_budget), str(budget), main_budget):
                continue
            both = pd.concat([ref_scores, other.set_index(keys)["score"]], axis=1,
                             keys=["ref", "other"], join="inner")
            differences = (both["ref"] - both["other"]).to_numpy()
            pairs = int(np.isfinite(differences).sum())
            if pairs == 0:
                continue
            interval = bootstrap_mean_interval(differences)
            rows.append({"reference": reference, "reference_budget": str(reference_budget),
                         "method": method, "budget": str(budget), "pairs": pairs,
                         "mean_difference": interval.mean, "ci_low": interval.low,
                         "ci_high": interval.high, "ci_method": interval.method})
    return pd.DataFrame(rows, columns=list(COLUMNS))
