"""Reference forecasters a learned model must beat, in original units on the full series.

Each takes the full (T, C) series and the first target minute t0 of every window and returns
(N, horizon, C) forecasts that only use minutes before t0.
"""

from __future__ import annotations

import numpy as np

from core.forecasting.windows import ForecastDataError

BASELINES: tuple[str, ...] = ("persistence", "seasonal_naive", "moving_average")
MINUTES_PER_DAY = 1440


def _require_history(t0: np.ndarray, needed: int, name: str) -> None:
    if len(t0) and t0.min() < needed:
        raise ForecastDataError(
            f"{name} needs t0 >= {needed} minutes of history, got t0 = {int(t0.min())}"
        )


def baseline_forecast(
    name: str, series: np.ndarray, t0: np.ndarray, horizon: int, **kw: int
) -> np.ndarray:
    """Forecast minutes t0 .. t0+horizon-1 for every t0.

    name: 'persistence' (last value t0-1 repeated), 'seasonal_naive' (the same minutes one
    season earlier, kw season_minutes=1440), 'moving_average' (mean of the last kw window=60
    minutes, repeated). In: series (T, C) or (T,), t0 (N,) ints, horizon > 0. Out: (N, horizon, C)
    float64.
    """
    series = np.asarray(series, dtype=float)
    if series.ndim == 1:
        series = series[:, None]
    t0 = np.asarray(t0, dtype=np.int64)
    if horizon <= 0:
        raise ForecastDataError(f"horizon must be > 0, got {horizon}")
    if len(t0) and t0.max() > len(series):
        raise ForecastDataError(f"t0 = {int(t0.max())} is beyond the series of {len(series)} minutes")
    steps = np.arange(horizon)
    if name == "persistence":
        _require_history(t0, 1, name)
        return np.repeat(series[t0 - 1][:, None, :], horizon, axis=1)
    if name == "seasonal_naive":
        season = int(kw.get("season_minutes", MINUTES_PER_DAY))
        if season < horizon:
            # A shorter season would need minutes that are themselves being forecast.
            raise ForecastDataError(f"season_minutes must be >= horizon = {horizon}, got {season}")
        _require_history(t0, season, name)
        return series[(t0 - season)[:, None] + steps]
    if name == "moving_average":
        window = int(kw.get("window", 60))
        if window <= 0:
            raise ForecastDataError(f"window must be > 0, got {window}")
        _require_history(t0, window, name)
        # Prefix sums give every window mean in O(N) without materialising the windows.
        cumsum = np.vstack([np.zeros((1, series.shape[1])), np.cumsum(series, axis=0)])
        mean = (cumsum[t0] - cumsum[t0 - window]) / window
        return np.repeat(mean[:, None, :], horizon, axis=1)
    raise ForecastDataError(f"name must be one of {BASELINES}, got {name!r}")
