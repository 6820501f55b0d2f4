"""Windows, splits and scaling: target alignment and train-only statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.forecasting.windows import (
    ForecastDataError,
    StandardScaler,
    build_datasets,
    chronological_split,
    make_windows,
)


def _indexed_series(num_minutes: int, num_channels: int = 2) -> np.ndarray:
    # Every value encodes its own minute and channel, so any misalignment shows.
    return np.arange(num_minutes)[:, None] * 10.0 + np.arange(num_channels)[None, :]


def test_targets_are_the_minutes_right_after_the_history():
    series = _indexed_series(50)
    X, Y, t0 = make_windows(series, seq_len=8, horizon=3)
    assert X.shape == (40, 8, 2) and Y.shape == (40, 3, 2)
    for i in range(len(t0)):
        np.testing.assert_array_equal(Y[i], series[t0[i]:t0[i] + 3])
        np.testing.assert_array_equal(X[i], series[t0[i] - 8:t0[i]])
    assert t0[0] == 8  # first target is the minute after the first full history
    assert t0[-1] + 3 == 50  # last target is the series' last minute


def test_windows_respect_the_target_range_and_reach_back_for_context():
    series = _indexed_series(100)
    X, Y, t0 = make_windows(series, seq_len=10, horizon=4, target_start=50, target_end=70)
    assert t0[0] == 50 and t0[-1] + 4 == 70
    np.testing.assert_array_equal(X[0], series[40:50])  # context from before the range


def test_stride_skips_windows():
    _, _, t0 = make_windows(_indexed_series(40), seq_len=5, horizon=2, stride=4)
    assert np.diff(t0).tolist() == [4] * (len(t0) - 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 5, "horizon": 0}, "horizon must be a positive integer, got 0"),
    ({"seq_len": 0, "horizon": 3}, "seq_len must be a positive integer, got 0"),
    ({"seq_len": 5, "horizon": 3, "stride": 0}, "stride must be a positive integer, got 0"),
    ({"seq_len": 18, "horizon": 3}, "history of 20 minutes is shorter than seq_len \\+ horizon = 21"),
    ({"seq_len": 5, "horizon": 3, "target_start": 18}, "holds no window"),
])
def test_make_windows_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ForecastDataError, match=message):
        make_windows(_indexed_series(20), **kwargs)


def test_chronological_split_keeps_time_order():
    split = chronological_split(_indexed_series(1000), train_frac=0.7, val_frac=0.1)
    assert (split.val_start, split.test_start) == (700, 800)
    assert len(split.train) == 700 and len(split.val) == 100 and len(split.test) == 200
    np.testing.assert_array_equal(split.val[0], split.full[700])
    with pytest.raises(ForecastDataError, match="val_frac"):
        chronological_split(_indexed_series(1000), train_frac=0.7, val_frac=0.3)


def test_scaler_round_trip_and_json_state():
    x = np.random.default_rng(0).normal([5.0, -3.0], [2.0, 0.5], size=(500, 2))
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(scaler.inverse_transform(z), x)
    restored = StandardScaler().load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    np.testing.assert_allclose(restored.transform(x), z)


def test_scaler_survives_a_constant_channel():
    scaler = StandardScaler().fit(np.ones((10, 1)))
    assert np.isfinite(scaler.transform(np.ones((3, 1)))).all()


def test_pipeline_scaler_is_fitted_on_train_only():
    # A level shift after the train part: full-series statistics would differ from train ones.
    series = np.concatenate([np.full((700, 1), 10.0), np.full((300, 1), 50.0)])
    series += np.random.default_rng(0).normal(0, 1, size=series.shape)
    data = build_datasets(series, seq_len=24, horizon=3, stride=1, train_frac=0.7, val_frac=0.1)
    train = series[:700]
    np.testing.assert_allclose(data.scaler.mean, train.mean(axis=0))
    np.testing.assert_allclose(data.scaler.std, train.std(axis=0))
    assert abs(data.scaler.mean[0] - series.mean()) > 5


def test_build_datasets_places_every_target_in_its_split():
    series = _indexed_series(1000)
    data = build_datasets(series, seq_len=24, horizon=3, stride=1, train_frac=0.7, val_frac=0.1,
                          channels=("a", "b"))
    split = data.split
    assert data.t0_train[-1] + 3 == split.val_start  # last train target ends inside train
    assert data.t0_val[0] == split.val_start and data.t0_val[-1] + 3 == split.test_start
    assert data.t0_test[0] == split.test_start and data.t0_test[-1] + 3 == len(series)
    X_val, Y_val = data.unscaled("val")
    np.testing.assert_array_equal(X_val[0], series[split.val_start - 24:split.val_start])  # train context
    np.testing.assert_array_equal(Y_val[0], series[split.val_start:split.val_start + 3])
    # Scaled arrays are the same windows, standardised.
    np.testing.assert_allclose(data.scaler.inverse_transform(data.X_val), X_val, rtol=1e-5)
    assert data.X_train.dtype == np.float32


def test_build_datasets_applies_stride_to_train_only():
    data = build_datasets(_indexed_series(1000), seq_len=24, horizon=3, stride=5,
                          train_frac=0.7, val_frac=0.1)
    assert np.diff(data.t0_train).min() == 5
    assert np.diff(data.t0_test).max() == 1


def test_split_parameter_takes_two_three_or_four_fractions():
    from core.forecasting.windows import SplitFractions, parse_split

    assert parse_split("0.6,0.1") == SplitFractions(0.6, 0.1, 0.0, None)
    assert parse_split("0.6,0.1,0.2") == SplitFractions(0.6, 0.1, 0.0, 0.2)
    assert parse_split("0.6,0.1,0.2,0.1") == SplitFractions(0.6, 0.1, 0.2, 0.1)
    for bad in ("0.6", "a,b", "0.1,0.2,0.3,0.4,0.5"):
        with pytest.raises(ForecastDataError, match="split must be"):
            parse_split(bad)
    split = chronological_split(_indexed_series(1000), 0.6, 0.1, 0.2)
    assert (split.val_start, split.test_start, len(split.test), len(split.full)) == (600, 700, 200, 900)


def test_sixty_ten_twenty_ten_split_tests_on_the_last_tenth_after_a_gap():
    # SmartLLMServe's split: 60 % train, 10 % val, 20 % for its RL learner, the last 10 % test.
    series = _indexed_series(1000)
    split = chronological_split(series, 0.6, 0.1, 0.1, gap_frac=0.2)
    assert (split.val_start, split.val_end, split.test_start, len(split.full)) == (600, 700, 900, 1000)
    assert len(split.val) == 100 and len(split.test) == 100
    data = build_datasets(series, seq_len=24, horizon=3, train_frac=0.6, val_frac=0.1, test_frac=0.1, gap_frac=0.2)
    assert data.t0_val[0] == 600 and data.t0_val[-1] + 3 == 700  # no val window scores the gap
    assert data.t0_test[0] == 900 and data.t0_test[-1] + 3 == 1000 and len(data.t0_test) == 98
    np.testing.assert_array_equal(data.unscaled("test")[0][0], series[876:900])  # history from the gap
    assert split.row_slices()["validation"] == slice(600, 700) and split.row_slices()["test"] == slice(900, 1000)
    # Same train and test as a 60/30/10 split: only where val ends differs, and a checkpoint must tell them apart.
    no_gap = build_datasets(series, seq_len=24, horizon=3, train_frac=0.6, val_frac=0.3, test_frac=0.1)
    assert no_gap.split.test_start == 900 and no_gap.digest() != data.digest()
    with pytest.raises(ForecastDataError, match="gap_frac"):
        chronological_split(series, 0.6, 0.1, 0.1, gap_frac=0.3)


def test_too_short_a_trace_fails_naming_it():
    from core.forecasting.windows import check_history

    data = build_datasets(_indexed_series(2000), seq_len=24, horizon=3, train_frac=0.6, val_frac=0.1)
    check_history(data, "trace t.csv", 24, 60)
    with pytest.raises(ForecastDataError, match=r"trace t\.csv: the test part starts at minute 1400.*num_days"):
        check_history(data, "trace t.csv", 24, 1440)
    with pytest.raises(ForecastDataError, match=r"trace t\.csv: the training part holds 1200 minutes"):
        check_history(data, "trace t.csv", 1300, 60)
