"""Paired bootstrap differences on constructed scores with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayestune import paired


def _scores(rows: list[tuple[str, str, str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["method", "budget", "task", "seed", "score"])


def _grid(method: str, budget: str, value, tasks=("cb", "rte", "stsb"), seeds=(0, 1, 2)):
    """One row per (task, seed); value(task_index, seed) is the score."""
    return [(method, budget, task, seed, float(value(t, seed)))
            for t, task in enumerate(tasks) for seed in seeds]


def test_equal_differences_give_a_zero_width_interval_at_that_value():
    interval = paired.bootstrap_mean_interval([2.5] * 6)
    assert (interval.mean, interval.low, interval.high) == (2.5, 2.5, 2.5)
    assert interval.method == paired.CI_EQUAL


def test_too_few_pairs_give_the_mean_and_no_interval():
    for values in ([4.0], [1.0, 3.0], [1.0, 1.0]):
        interval = paired.bootstrap_mean_interval(values)
        assert interval.mean == pytest.approx(np.mean(values))
        assert np.isnan(interval.low) and np.isnan(interval.high)
        assert interval.method == paired.CI_TOO_FEW
    nothing = paired.bootstrap_mean_interval([np.nan])
    assert np.isnan(nothing.mean) and nothing.method == paired.CI_TOO_FEW


def test_big_positive_shift_excludes_zero_and_noise_around_zero_does_not():
    rng = np.random.default_rng(1)
    shifted = paired.bootstrap_mean_interval(10.0 + rng.normal(0, 1, 15))
    assert shifted.method == paired.CI_BCA
    assert 0 < shifted.low < shifted.mean < shifted.high
    assert shifted.low > 8 and shifted.high < 12
    centred = paired.bootstrap_mean_interval(rng.normal(0, 1, 15))
    assert centred.low < 0 < centred.high


def test_interval_is_reproducible_and_bca_when_defined():
    values = [0.3, -1.2, 2.2, 0.8, 1.9, -0.4, 3.1, 0.0, 1.1]
    first, again = (paired.bootstrap_mean_interval(values) for _ in range(2))
    assert first == again
    direct = stats.bootstrap((np.array(values),), np.mean, method="BCa",
                             rng=np.random.default_rng(paired.BOOTSTRAP_SEED))
    assert (first.low, first.high) == pytest.approx(tuple(direct.confidence_interval))


def test_percentile_stands_in_where_bca_is_undefined(monkeypatch):
    # scipy returns a NaN BCa interval when the resampled statistics are degenerate (no
    # jackknife spread, or every resample on one side of the estimate); a mean of unequal
    # values hardly gets there, so BCa is made to fail here.
    real = stats.bootstrap

    def failing_bca(*args, method, **kwargs):
        result = real(*args, method=method, **kwargs)
        if method == "BCa":
            result.confidence_interval = type(result.confidence_interval)(np.nan, np.nan)
        return result

    monkeypatch.setattr(paired.stats, "bootstrap", failing_bca)
    values = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    interval = paired.bootstrap_mean_interval(values)
    assert interval.method == paired.CI_PERCENTILE
    direct = real((values,), np.mean, method="percentile",
                  rng=np.random.default_rng(paired.BOOTSTRAP_SEED))
    assert (interval.low, interval.high) == pytest.approx(tuple(direct.confidence_interval))


def test_pairing_by_task_and_seed_narrows_the_interval():
    """Tasks differ by tens of points, the reference beats the other by 1 to 2 points on every
    (task, seed): the paired interval excludes 0, an unpaired bootstrap of the same scores
    straddles it."""
    ref = _grid("bayestune", "0.005", lambda t, s: 30 * t + s + 2.0 + 0.5 * (s % 2))
    other = _grid("random", "0.005", lambda t, s: 30 * t + s + 0.5)
    table = paired.paired_differences(_scores(ref + other))
    row = table.iloc[0]
    assert (row.method, row.budget, row.reference_budget, row.pairs) == ("random", "0.005",
                                                                         "0.005", 9)
    assert row.mean_difference == pytest.approx(np.mean([1.5, 2.0, 1.5] * 3))
    assert 1.0 < row.ci_low <= row.ci_high < 2.1

    a = np.array([score for *_, score in ref])
    b = np.array([score for *_, score in other])
    unpaired = stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
                               method="percentile", rng=np.random.default_rng(0))
    assert unpaired.confidence_interval.low < 0 < unpaired.confidence_interval.high


def test_pairs_follow_task_and_seed_not_row_order():
    ref = _grid("bayestune", "0.005", lambda t, s: 10 * t + 3 * s + 1)
    other = _grid("random", "0.005", lambda t, s: 10 * t + 3 * s)
    shuffled = _scores(ref + other).sample(frac=1.0, random_state=3)
    row = paired.paired_differences(shuffled).iloc[0]
    assert (row.mean_difference, row.ci_low, row.ci_high) == (1.0, 1.0, 1.0)
    assert row.ci_method == paired.CI_EQUAL


def test_budgets_are_matched_and_unbudgeted_methods_meet_the_main_budget():
    rows = (_grid("bayestune", "0.005", lambda t, s: 60 + t + s)
            + _grid("bayestune", "0.01", lambda t, s: 70 + t + s)
            + _grid("random", "0.005", lambda t, s: 50 + t + s)
            + _grid("random", "0.01", lambda t, s: 40 + t + s)
            + _grid("full", "-", lambda t, s: 55 + t + s)
            # only two seeds of magnitude: 6 pairs, not 9
            + _grid("magnitude", "0.005", lambda t, s: 58 + t + s, seeds=(0, 1)))
    table = paired.paired_differences(_scores(rows), main_budget="0.01")
    found = {(r.method, r.budget, r.reference_budget): (r.pairs, r.mean_difference)
             for r in table.itertuples()}
    assert found == {("random", "0.005", "0.005"): (9, 10.0),
                     ("random", "0.01", "0.01"): (9, 30.0),
                     ("full", "-", "0.01"): (9, 15.0),
                     ("magnitude", "0.005", "0.005"): (6, 2.0)}

    # Any method can be the reference: full against the budgeted ones at the main budget.
    as_full = paired.paired_differences(_scores(rows), reference="full", main_budget="0.005")
    assert set(zip(as_full.method, as_full.budget, as_full.mean_difference, strict=True)) == {
        ("bayestune", "0.005", -5.0), ("random", "0.005", 5.0), ("magnitude", "0.005", -3.0)}
    assert (as_full.reference == "full").all() and (as_full.reference_budget == "-").all()


def test_no_reference_runs_give_an_empty_table_with_the_columns():
    table = paired.paired_differences(_scores(_grid("full", "-", lambda t, s: 1.0)))
    assert table.empty and list(table.columns) == list(paired.COLUMNS)
