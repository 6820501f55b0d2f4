"""Figures for the forecasting study. Each function returns a matplotlib Figure built without
pyplot (no global state, no display backend needed: savefig renders with Agg) and writes it only
when given a path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from core.forecasting.training import EpochRecord


def _maybe_save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_loss_curves(history: Sequence[EpochRecord], path: str | Path | None = None) -> Figure:
    """Train and val loss (scaled data: MSE for DLinear, pinball for the calendar MLP) per epoch, the best epoch marked."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    epochs = [r.epoch for r in history]
    ax.plot(epochs, [r.train_loss for r in history], label="train loss")
    ax.plot(epochs, [r.val_loss for r in history], label="val loss")
    best = [r for r in history if r.is_best]
    if best:
        ax.axvline(best[-1].epoch, color="grey", linestyle="--", label=f"best epoch {best[-1].epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (standardised)")
    ax.set_title("DLinear loss curves")
    ax.legend()
    return _maybe_save(fig, path)


def plot_forecast_vs_actual(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    channels: Sequence[str],
    t0: np.ndarray | None = None,
    step: int = 1,
    num_minutes: int = 1440,
    start: int = 0,
    path: str | Path | None = None,
) -> Figure:
    """One panel per channel: the `step`-ahead forecast vs the actual load over `num_minutes`
    consecutive windows from `start` (about one day by default). Arrays are (N, H, C); t0 (minute
    of each window's first target) labels the x axis when given."""
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred shapes differ: {y_true.shape} vs {y_pred.shape}")
    stop = min(start + num_minutes, len(y_true))
    minutes = (np.asarray(t0)[start:stop] + step - 1) if t0 is not None else np.arange(start, stop)
    fig = Figure(figsize=(11, 2.6 * len(channels)))
    axes = fig.subplots(len(channels), 1, sharex=True, squeeze=False)[:, 0]
    for c, (ax, channel) in enumerate(zip(axes, channels)):
        ax.plot(minutes, y_true[start:stop, step - 1, c], lw=0.8, label="actual")
        ax.plot(minutes, y_pred[start:stop, step - 1, c], lw=0.8, label=f"forecast (t+{step})")
        ax.set_ylabel(f"{channel} / min")
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("minute of trace" if t0 is not None else "window")
    fig.suptitle("Forecast vs actual on the test split")
    return _maybe_save(fig, path)


def plot_error_by_load_level(table: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Bars of MAE per load level, one panel per channel (input: `error_by_load_level` output)."""
    channels = list(dict.fromkeys(table["channel"]))
    fig = Figure(figsize=(4 * len(channels), 3.5))
    axes = fig.subplots(1, len(channels), squeeze=False)[0]
    for ax, channel in zip(axes, channels):
        rows = table[table["channel"] == channel]
        labels = [f"{lo:.0f}-{hi:.0f}" for lo, hi in zip(rows["load_low"], rows["load_high"])]
        ax.bar(labels, rows["mae"])
        ax.set_title(channel)
        ax.set_xlabel("true load per minute (quantile bin)")
        ax.set_ylabel("MAE")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle("Error by load level")
    return _maybe_save(fig, path)


def evaluation_figures(
    history: Sequence[EpochRecord], y_test: np.ndarray, pred_test: np.ndarray, by_level: pd.DataFrame,
    channels: Sequence[str],
) -> dict[str, Figure]:
    """The run's figures by file stem: loss curves, test forecast vs actual, error by load level."""
    return {
        "loss_curves": plot_loss_curves(history),
        "forecast_vs_actual_test": plot_forecast_vs_actual(y_test, pred_test, channels),
        "error_by_load_level": plot_error_by_load_level(by_level),
    }
