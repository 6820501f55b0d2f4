"""The synthetic trace's MAE floor: the median of the generator's predictive distribution."""

from __future__ import annotations

import numpy as np
import pytest

from core.forecasting.burstgpt import generate_synthetic_trace, per_minute_series, synthetic_expected_load
from core.forecasting.oracle import _api_age_s, synthetic_oracle_median


@pytest.fixture(scope="module")
def two_days():
    trace = generate_synthetic_trace(num_days=2, seed=3)
    t0 = np.arange(1500, 2700)  # Tuesday 01:00 to 21:00: night and day
    steps = t0[:, None] + np.arange(3)
    series = per_minute_series(trace).to_numpy()
    expected = synthetic_expected_load(num_days=2, seed=3).to_numpy()
    oracle = synthetic_oracle_median(trace, t0, 3, num_days=2, seed=3, num_samples=200)
    return series[steps], expected[steps], oracle


def test_api_age_is_the_time_since_the_last_api_arrival_before_the_minute():
    import pandas as pd

    trace = pd.DataFrame({"Timestamp": [10.0, 70.0, 100.0, 130.0],
                          "Log Type": ["API log", "Conversation log", "API log", "Conversation log"]})
    np.testing.assert_allclose(_api_age_s(trace, np.array([0, 1, 2, 3])), [np.inf, 50.0, 20.0, 80.0])


def _is_median(actual: np.ndarray, forecast: np.ndarray) -> bool:
    # Integer counts tie at the median: at most half below it, at least half at or below it. The slack is
    # ~4 standard errors of 1,200 minutes (overlapping windows share minutes) and the Monte-Carlo median.
    return (actual < forecast).mean() < 0.56 and (actual <= forecast).mean() > 0.44


def test_oracle_is_a_median_of_each_minute(two_days):
    actual, expected, oracle = two_days
    assert oracle.shape == actual.shape and (oracle >= 0).all()
    for c in range(actual.shape[-1]):
        assert _is_median(actual[..., c], oracle[..., c]), c
    assert not _is_median(actual[..., 1], expected[..., 1])  # the mean of skewed token sums is no median


def test_oracle_median_beats_the_expected_counts_where_the_distribution_is_skewed(two_days):
    actual, expected, oracle = two_days
    mae = lambda forecast: np.abs(forecast - actual).mean(axis=(0, 1))  # noqa: E731
    # Token sums are right-skewed (Zipf lengths): their median sits below their mean and wins on MAE.
    assert (mae(oracle)[1:] < mae(expected)[1:]).all(), (mae(oracle), mae(expected))
    assert mae(oracle)[0] < 1.02 * mae(expected)[0]
