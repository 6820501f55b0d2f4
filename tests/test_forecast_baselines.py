"""Reference forecasters and forecast metrics on hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from core.forecasting.baselines import BASELINES, baseline_forecast
from core.forecasting.windows import ForecastDataError, make_windows
from core.forecasting.metrics import error_by_load_level, forecast_metrics, skill


# --------------------------------------------------------------------------------------- baselines
def test_persistence_of_a_constant_is_exact():
    series = np.full((100, 2), 7.0)
    t0 = np.array([10, 50, 97])
    forecast = baseline_forecast("persistence", series, t0, horizon=3)
    assert forecast.shape == (3, 3, 2)
    assert (forecast == 7.0).all()


def test_persistence_repeats_the_last_seen_minute():
    series = np.arange(20.0)[:, None]
    forecast = baseline_forecast("persistence", series, np.array([5, 12]), horizon=2)
    np.testing.assert_array_equal(forecast[:, :, 0], [[4, 4], [11, 11]])


def test_seasonal_naive_is_exact_on_a_daily_periodic_series():
    minute = np.arange(4 * 1440)
    series = np.stack([np.sin(2 * np.pi * minute / 1440), (minute % 1440) ** 0.5], axis=1)
    _, Y, t0 = make_windows(series, seq_len=120, horizon=3, target_start=1440)
    forecast = baseline_forecast("seasonal_naive", series, t0, horizon=3)
    np.testing.assert_allclose(forecast, Y, atol=1e-12)
    # ...and it uses exactly the same minutes one day earlier
    np.testing.assert_array_equal(forecast[0], series[t0[0] - 1440:t0[0] - 1440 + 3])


def test_moving_average_is_the_mean_of_the_last_window():
    series = np.arange(100.0)[:, None]
    forecast = baseline_forecast("moving_average", series, np.array([10, 60]), horizon=2, window=4)
    np.testing.assert_allclose(forecast[:, :, 0], [[7.5, 7.5], [57.5, 57.5]])


def test_baselines_refuse_missing_history():
    series = np.zeros((3000, 1))
    with pytest.raises(ForecastDataError, match="seasonal_naive needs t0 >= 1440"):
        baseline_forecast("seasonal_naive", series, np.array([1439, 2000]), horizon=3)
    with pytest.raises(ForecastDataError, match="moving_average needs t0 >= 60"):
        baseline_forecast("moving_average", series, np.array([30]), horizon=3)
    with pytest.raises(ForecastDataError, match="name must be one of"):
        baseline_forecast("oracle", series, np.array([2000]), horizon=3)


def test_every_named_baseline_runs():
    series = np.random.default_rng(0).poisson(10, size=(3000, 3)).astype(float)
    t0 = np.arange(1500, 2000)
    for name in BASELINES:
        assert baseline_forecast(name, series, t0, horizon=3).shape == (500, 3, 3)


# ----------------------------------------------------------------------------------------- metrics
def test_metrics_on_a_hand_computed_case():
    y_true = np.array([[[1.0, 0.0]], [[3.0, 0.0]]])  # (N=2, H=1, C=2)
    y_pred = np.array([[[2.0, 0.0]], [[1.0, 0.0]]])
    m = forecast_metrics(y_true, y_pred, ["a", "b"])
    assert m["mae_a"] == pytest.approx(1.5)  # |1| and |2|
    assert m["rmse_a"] == pytest.approx(np.sqrt((1 + 4) / 2))
    assert m["smape_a"] == pytest.approx(100 * (2 * 1 / 3 + 2 * 2 / 4) / 2)
    assert m["r2_a"] == pytest.approx(1 - 5 / 2)  # ss_res 5, ss_tot 2
    assert m["mae_b"] == 0 and m["smape_b"] == 0  # 0/0 counts as a perfect minute
    assert m["r2_b"] == 1.0


def test_metrics_refuse_different_layouts():
    y = np.zeros((10, 3, 2))
    with pytest.raises(ValueError, match=r"same \(N, horizon, C\) shape"):
        forecast_metrics(y, y.transpose(0, 2, 1), ["a", "b"])


def test_skill_against_a_reference():
    assert skill(3.0, 4.0) == pytest.approx(0.25)
    assert skill(5.0, 4.0) < 0


def test_error_by_load_level_bins_by_true_load():
    y_true = np.arange(1.0, 9.0).reshape(8, 1, 1)
    y_pred = y_true + np.array([0, 0, 1, 1, 2, 2, 3, 3.0]).reshape(8, 1, 1)
    table = error_by_load_level(y_true, y_pred, ["requests"], num_levels=4)
    assert table["level"].tolist() == [0, 1, 2, 3]
    assert table["mae"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert table["count"].tolist() == [2, 2, 2, 2]
