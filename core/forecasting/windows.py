"""Windows, chronological splits and scaling for per-minute load forecasting.

Layout everywhere: a series is (T, C) minutes x channels; windows are X (N, seq_len, C) of history
and Y (N, horizon, C) of targets, with t0 (N,) the index of each window's first target minute, so
Y[i] == series[t0[i] : t0[i] + horizon] and X[i] == series[t0[i] - seq_len : t0[i]].

Two pitfalls of the original study are designed out here: targets are the H minutes right after
the history (not one step later), and the scaler only ever sees the training part.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class ForecastDataError(ValueError):
    """Bad forecasting input; the one-line message names the parameter at fault."""


def _as_2d(series: np.ndarray, name: str = "series") -> np.ndarray:
    series = np.asarray(series)
    if series.ndim == 1:
        series = series[:, None]
    if series.ndim != 2:
        raise ForecastDataError(f"{name} must be (T, C), got shape {series.shape}")
    return series


# ------------------------------------------------------------------------------------------ split
@dataclass
class ChronoSplit:
    """A series cut in time order: train = full[:val_start], val = full[val_start:val_end],
    test = full[test_start:]. Minutes in [val_end, test_start) are a gap: no window is scored there,
    but test windows read their history from it (another tool's 60/10/20/10 split gives its 20 % to a
    different learner and tests on the last 10 %)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_start: int
    test_start: int
    full: np.ndarray
    val_end: int = -1  # -1: no gap, val ends where test starts

    def __post_init__(self) -> None:
        if self.val_end < 0:
            self.val_end = self.test_start

    def row_slices(self) -> dict[str, slice]:
        """The parts as row slices of `full`, by MLflow dataset context (the gap is in none)."""
        return {"training": slice(0, self.val_start), "validation": slice(self.val_start, self.val_end),
                "test": slice(self.test_start, len(self.full))}


SPLIT_FORMS = ("'train,val' (the rest is test), 'train,val,test' (the minutes after test are left out) or "
               "'train,val,gap,test' (gap: minutes between val and test that only serve as history)")


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of the series, in time order: train, val, an unscored gap, test (None: the rest)."""

    train: float
    val: float
    gap: float = 0.0
    test: float | None = None


def parse_split(text: str) -> SplitFractions:
    """`"0.6,0.1"` -> train 60 %, val 10 %, test the rest; `"0.6,0.1,0.2"` -> test the 20 % right after
    val, the last minutes left out; `"0.6,0.1,0.2,0.1"` -> SmartLLMServe's 60/10/20/10 split: the 20 %
    after val is a gap (its RL part) and test is the last 10 %."""
    try:
        fractions = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ForecastDataError(f"split must be {SPLIT_FORMS} fractions, got {text!r}") from None
    if len(fractions) == 2:
        return SplitFractions(fractions[0], fractions[1])
    if len(fractions) == 3:
        return SplitFractions(fractions[0], fractions[1], 0.0, fractions[2])
    if len(fractions) == 4:
        if fractions[2] < 0:
            raise ForecastDataError(f"split's gap fraction must be >= 0, got {fractions[2]} in {text!r}")
        return SplitFractions(*fractions)
    raise ForecastDataError(f"split must be {SPLIT_FORMS} fractions, got {text!r}")


def chronological_split(
    series: np.ndarray, train_frac: float = 0.7, val_frac: float = 0.1, test_frac: float | None = None,
    gap_frac: float = 0.0,
) -> ChronoSplit:
    """Split (T, C) minutes into train / val / (gap) / test by time (no shuffling: the future stays unseen).

    In: the series, the fractions of train and val; an unscored gap of `gap_frac` after val; test gets
    `test_frac` after the gap (None: the rest; otherwise the minutes after the test part are left out).
    Out: a ChronoSplit whose parts are views of `series` (`full` ends with the test part).
    """
    series = _as_2d(series)
    if not 0 < train_frac < 1:
        raise ForecastDataError(f"train_frac must be in (0, 1), got {train_frac}")
    if not 0 < val_frac < 1 or train_frac + val_frac >= 1:
        raise ForecastDataError(
            f"val_frac must be in (0, 1 - train_frac = {1 - train_frac:g}), got {val_frac}"
        )
    if not 0 <= gap_frac < 1 - train_frac - val_frac:
        raise ForecastDataError(f"gap_frac must be in [0, 1 - train_frac - val_frac = {1 - train_frac - val_frac:g}), "
                                f"got {gap_frac}")
    room = 1 - train_frac - val_frac - gap_frac
    if test_frac is not None and not (0 < test_frac <= room + 1e-9):
        raise ForecastDataError(f"test_frac must be in (0, 1 - train_frac - val_frac - gap_frac = {room:g}], "
                                f"got {test_frac}")
    num_minutes = len(series)
    # Cumulative fractions, rounded, so 0.7 + 0.1 of 1000 minutes is 700 / 800, not 700 / 799 from
    # float error, and 0.6/0.1/0.2/0.1 of 87,840 minutes puts test at minute 79,056 as int(0.9 T) does.
    val_start = int(round(num_minutes * train_frac))
    val_end = int(round(num_minutes * (train_frac + val_frac)))
    test_start = int(round(num_minutes * (train_frac + val_frac + gap_frac)))
    end = num_minutes if test_frac is None else min(
        num_minutes, int(round(num_minutes * (train_frac + val_frac + gap_frac + test_frac))))
    if val_start == 0 or val_end == val_start or test_start >= end:
        raise ForecastDataError(
            f"series of {num_minutes} minutes is too short to split {train_frac}/{val_frac}/{gap_frac}/{test_frac}"
        )
    series = series[:end]
    return ChronoSplit(
        train=series[:val_start], val=series[val_start:val_end], test=series[test_start:],
        val_start=val_start, test_start=test_start, full=series, val_end=val_end,
    )


# ----------------------------------------------------------------------------------------- scaler
class StandardScaler:
    """Per-channel standardisation; fit it on the training part only."""

    min_std = 1e-8  # a constant channel maps to 0 instead of dividing by zero

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, x: np.ndarray) -> "StandardScaler":
        """Learn mean / std per channel (last axis) from x (..., C); returns self."""
        x = np.asarray(x, dtype=float)
        flat = x.reshape(-1, x.shape[-1])
        self.mean = flat.mean(axis=0)
        self.std = np.maximum(flat.std(axis=0), self.min_std)
        return self

    def _check(self) -> None:
        if self.mean is None or self.std is None:
            raise ForecastDataError("scaler is not fitted: call fit() or load_state_dict() first")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(..., C) in original units -> standardised, float64."""
        self._check()
        return (np.asarray(x, dtype=float) - self.mean) / self.std

    def inverse_transform(self, x: np.ndarray) -> np.ndarray:
        """(..., C) standardised -> original units, float64."""
        self._check()
        return np.asarray(x, dtype=float) * self.std + self.mean

    def state_dict(self) -> dict[str, list[float]]:
        """Plain lists, JSON-able."""
        self._check()
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state_dict(self, state: dict[str, Sequence[float]]) -> "StandardScaler":
        self.mean = np.asarray(state["mean"], dtype=float)
        self.std = np.asarray(state["std"], dtype=float)
        return self


# ---------------------------------------------------------------------------------------- windows
def make_windows(
    series: np.ndarray,
    seq_len: int,
    horizon: int,
    stride: int = 1,
    target_start: int = 0,
    target_end: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut (T, C) into supervised windows whose targets lie in [target_start, target_end).

    In: the series, history length and horizon in minutes, the step between consecutive windows,
    the target range (history may reach back before target_start, so a val/test window uses the
    minutes preceding its split as context).
    Out: X (N, seq_len, C), Y (N, horizon, C) (same dtype as series, copies), t0 (N,) int64 with
    Y[i] == series[t0[i]:t0[i]+horizon] and X[i] == series[t0[i]-seq_len:t0[i]].
    """
    series = _as_2d(series)
    num_minutes = len(series)
    for name, value in (("seq_len", seq_len), ("horizon", horizon), ("stride", stride)):
        if int(value) != value or value <= 0:
            raise ForecastDataError(f"{name} must be a positive integer, got {value}")
    if num_minutes < seq_len + horizon:
        raise ForecastDataError(
            f"history of {num_minutes} minutes is shorter than seq_len + horizon = {seq_len + horizon}"
        )
    target_end = num_minutes if target_end is None else target_end
    if not 0 <= target_start < target_end <= num_minutes:
        raise ForecastDataError(
            f"target range [{target_start}, {target_end}) must lie within [0, {num_minutes})"
        )
    first_t0 = max(target_start, seq_len)  # earliest target with a full history behind it
    t0 = np.arange(first_t0, target_end - horizon + 1, stride, dtype=np.int64)
    if len(t0) == 0:
        raise ForecastDataError(
            f"target range [{target_start}, {target_end}) holds no window of horizon {horizon} "
            f"with seq_len {seq_len} minutes of history"
        )
    # Gather through index grids: one copy, no Python loop over windows.
    X = series[t0[:, None] + np.arange(-seq_len, 0)]
    Y = series[t0[:, None] + np.arange(horizon)]
    return X, Y, t0


# --------------------------------------------------------------------------------------- datasets
@dataclass
class ForecastDatasets:
    """Everything a trainer and an evaluator need, scaled with train-only statistics.

    X_*/Y_* are float32 and standardised; t0_* index `split.full`. Val and test windows use stride 1
    (every minute is scored); only train windows use the configured stride.
    """

    split: ChronoSplit
    scaler: StandardScaler
    seq_len: int
    horizon: int
    channels: tuple[str, ...]
    X_train: np.ndarray
    Y_train: np.ndarray
    t0_train: np.ndarray
    X_val: np.ndarray
    Y_val: np.ndarray
    t0_val: np.ndarray
    X_test: np.ndarray
    Y_test: np.ndarray
    t0_test: np.ndarray

    def t0(self, part: str) -> np.ndarray:
        if part not in ("train", "val", "test"):
            raise ForecastDataError(f"part must be 'train', 'val' or 'test', got {part!r}")
        return getattr(self, f"t0_{part}")

    def digest(self) -> str:
        """A short hash of the series, the split and the windows: a checkpoint resumes only on the same data."""
        full = np.ascontiguousarray(self.split.full, dtype=np.float64)
        key = [full.tobytes(), str((full.shape, self.split.val_start, self.split.test_start, self.seq_len,
                                    self.horizon, len(self.t0_train), self.channels)).encode()]
        if self.split.val_end != self.split.test_start:  # a gap; without one the digest stays as it was
            key.append(f"val_end={self.split.val_end}".encode())
        return hashlib.sha256(b"".join(key)).hexdigest()[:16]

    def unscaled(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """X, Y of `part` ('train' | 'val' | 'test') in original units (float64)."""
        t0 = self.t0(part)
        full = np.asarray(self.split.full, dtype=float)
        return (full[t0[:, None] + np.arange(-self.seq_len, 0)],
                full[t0[:, None] + np.arange(self.horizon)])


def build_datasets(
    series: np.ndarray,
    seq_len: int = 120,
    horizon: int = 3,
    stride: int = 1,
    train_frac: float = 0.7,
    val_frac: float = 0.1,
    channels: Sequence[str] | None = None,
    test_frac: float | None = None,
    gap_frac: float = 0.0,
) -> ForecastDatasets:
    """Split, fit the scaler on the train part only, scale the whole series with it, and window.

    In: a (T, C) series in original units; window sizes in minutes; split fractions; optional
    channel names (default ch0..). Out: ForecastDatasets. Train targets lie in train, val targets
    in val (history may come from train), test targets in test (history may come from the gap;
    `test_frac`, `gap_frac`: see chronological_split).
    """
    split = chronological_split(series, train_frac, val_frac, test_frac, gap_frac)
    num_channels = split.full.shape[1]
    channels = tuple(channels) if channels is not None else tuple(f"ch{i}" for i in range(num_channels))
    if len(channels) != num_channels:
        raise ForecastDataError(f"channels has {len(channels)} names for {num_channels} columns")
    if not np.isfinite(np.asarray(split.full, dtype=float)).all():
        raise ForecastDataError("series contains NaN or infinite values")
    scaler = StandardScaler().fit(split.train)
    scaled = scaler.transform(split.full).astype(np.float32)
    X_train, Y_train, t0_train = make_windows(scaled, seq_len, horizon, stride, 0, split.val_start)
    X_val, Y_val, t0_val = make_windows(scaled, seq_len, horizon, 1, split.val_start, split.val_end)
    X_test, Y_test, t0_test = make_windows(scaled, seq_len, horizon, 1, split.test_start)
    return ForecastDatasets(
        split=split, scaler=scaler, seq_len=seq_len, horizon=horizon, channels=channels,
        X_train=X_train, Y_train=Y_train, t0_train=t0_train,
        X_val=X_val, Y_val=Y_val, t0_val=t0_val,
        X_test=X_test, Y_test=Y_test, t0_test=t0_test,
    )


def check_history(data: ForecastDatasets, trace: str, model_context: int, baseline_context: int) -> None:
    """Fail before training when a part is too short for what reads it: the model's training windows
    need `model_context` minutes of history (seq_len, lag_days) behind them, the baselines scored on the
    test windows `baseline_context` (a day for seasonal naive, moving_average_window)."""
    if data.split.val_start - data.horizon < model_context:
        raise ForecastDataError(
            f"{trace}: the training part holds {data.split.val_start} minutes, fewer than the {model_context} minutes of "
            f"history the model reads (seq_len, lag_days) plus the horizon: use a longer trace (num_days) or a larger split")
    if data.split.test_start < baseline_context:
        raise ForecastDataError(
            f"{trace}: the test part starts at minute {data.split.test_start}, but the baselines need {baseline_context} "
            f"minutes of history before it (a day for seasonal naive, moving_average_window): use a longer trace (num_days)")
