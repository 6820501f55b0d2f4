"""The calendar MLP: a small network on hand-chosen features of the recent past and the clock,
with P50 and P90 heads trained by the pinball loss.

Why these features: the load is diurnal with weekend dips (the clock says where in the cycle a
minute is), its level drifts over hours and days (recent means say how busy today is), and the
last few minutes carry the bursts. One hidden layer lets the clock scale the recent level (the
daily profile multiplies, it does not add). The P50 head minimises MAE (the reported metric); the
P90 head is the upper tail capacity planning needs.

Features of a forecast whose first target minute is t0 (all on the scaled series, minutes < t0):
- the last `recent_minutes` values per channel;
- the means of the last 5, 15, 60 and seq_len minutes per channel;
- for each of the `lag_days` previous days, the mean around the same minutes (t0 - d days,
  +-`LAG_HALF_WIDTH`, covering the horizon);
- the clock of t0: sin/cos of the minute of day (4 harmonics) and a one-hot day of week, counted
  from the trace start (minute 0 = Monday 00:00 for the synthetic trace).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.forecasting.windows import ForecastDataError

QUANTILES: tuple[float, ...] = (0.5, 0.9)
MINUTES_PER_DAY = 1440
DAYS_PER_WEEK = 7
HARMONICS = 4
LAG_HALF_WIDTH = 10  # minutes either side of the same minutes on a previous day (smooths Poisson noise)
MEAN_WINDOWS = (5, 15, 60)  # plus seq_len


@dataclass(frozen=True)
class FeatureSpec:
    """What the features of one forecast are made of (minutes)."""

    seq_len: int
    horizon: int
    recent_minutes: int = 15
    lag_days: int = 0

    def context_minutes(self) -> int:
        """Minutes of history a forecast needs before its first target minute."""
        lag = self.lag_days * MINUTES_PER_DAY + LAG_HALF_WIDTH if self.lag_days else 0
        return max(self.seq_len, self.recent_minutes, max(MEAN_WINDOWS), lag)

    def num_features(self, num_channels: int) -> int:
        per_channel = self.recent_minutes + len(MEAN_WINDOWS) + 1 + self.lag_days
        return per_channel * num_channels + 2 * HARMONICS + DAYS_PER_WEEK

    def validate(self) -> None:
        if not 0 < self.recent_minutes <= self.seq_len:
            raise ForecastDataError(f"recent_minutes must be in 1..seq_len = {self.seq_len}, got {self.recent_minutes}")
        if self.lag_days < 0:
            raise ForecastDataError(f"lag_days must be >= 0, got {self.lag_days}")


def window_features(scaled: np.ndarray, t0: np.ndarray, spec: FeatureSpec, clock_t0: np.ndarray | None = None) -> np.ndarray:
    """Features (N, F) float32 of the forecasts starting at rows `t0` of `scaled` (T, C).

    `clock_t0` is the minute since the trace start of each t0 (default: t0 itself, when `scaled`
    is the whole trace); a served history passes its own clock.
    """
    scaled = np.asarray(scaled, dtype=np.float64)
    t0 = np.asarray(t0, dtype=np.int64)
    clock = t0 if clock_t0 is None else np.asarray(clock_t0, dtype=np.int64)
    if len(t0) and t0.min() < spec.context_minutes():
        raise ForecastDataError(f"a forecast needs {spec.context_minutes()} minutes of history, got t0 = {int(t0.min())}")
    cumsum = np.vstack([np.zeros((1, scaled.shape[1])), np.cumsum(scaled, axis=0)])

    def mean(start: np.ndarray, end: np.ndarray) -> np.ndarray:
        return (cumsum[end] - cumsum[start]) / (end - start)[:, None]

    parts = [scaled[t0[:, None] - np.arange(1, spec.recent_minutes + 1)].reshape(len(t0), -1)]
    parts += [mean(t0 - window, t0) for window in (*MEAN_WINDOWS, spec.seq_len)]
    for day in range(1, spec.lag_days + 1):
        centre = t0 - day * MINUTES_PER_DAY
        parts.append(mean(centre - LAG_HALF_WIDTH, centre + spec.horizon + LAG_HALF_WIDTH))
    angle = 2 * np.pi * (clock % MINUTES_PER_DAY) / MINUTES_PER_DAY
    parts += [f(k * angle)[:, None] for k in range(1, HARMONICS + 1) for f in (np.sin, np.cos)]
    parts.append(np.eye(DAYS_PER_WEEK)[(clock // MINUTES_PER_DAY) % DAYS_PER_WEEK])
    return np.hstack(parts).astype(np.float32)


class CalendarMLP(nn.Module):
    """(B, F) features -> (B, horizon, C, len(QUANTILES)) scaled quantile forecasts."""

    def __init__(self, num_features: int, horizon: int, num_channels: int, hidden_width: int = 64) -> None:
        super().__init__()
        # Constructor arguments, kept so a saved state dict can be rebuilt into the same model.
        self.hparams = dict(num_features=num_features, horizon=horizon, num_channels=num_channels,
                            hidden_width=hidden_width)
        self.shape = (horizon, num_channels, len(QUANTILES))
        self.net = nn.Sequential(nn.Linear(num_features, hidden_width), nn.ReLU(),
                                 nn.Linear(hidden_width, horizon * num_channels * len(QUANTILES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, *self.shape)


def pinball_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pinball (quantile) loss of pred (..., Q) against target (...); the 0.5 head is half the L1 loss."""
    q = torch.tensor(QUANTILES, dtype=pred.dtype)
    error = target.unsqueeze(-1) - pred
    return torch.maximum(q * error, (q - 1) * error).mean()
