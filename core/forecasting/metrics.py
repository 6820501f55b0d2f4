"""Forecast error metrics per channel over (N, horizon, C) arrays.

Prediction and truth must share one layout (the original study compared arrays laid out
differently); shapes are checked, never broadcast.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray, channels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true and y_pred must have the same (N, horizon, C) shape, got {y_true.shape} and {y_pred.shape}"
        )
    if y_true.ndim != 3:
        raise ValueError(f"y_true must be (N, horizon, C), got shape {y_true.shape}")
    if len(channels) != y_true.shape[-1]:
        raise ValueError(f"channels has {len(channels)} names for {y_true.shape[-1]} channels")
    return y_true, y_pred


def forecast_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, channels: Sequence[str]
) -> dict[str, float]:
    """MAE, RMSE, sMAPE (%) and R^2 per channel over all N x horizon values.

    In: y_true, y_pred (N, H, C) in the same units; channel names (C). Out: {mae_<ch>, rmse_<ch>,
    smape_<ch>, r2_<ch>}. sMAPE = 100 * mean(2|e| / (|y| + |p|)) with 0/0 counted as 0 (a quiet
    minute forecast as quiet is perfect). R^2 is nan when the truth is constant (undefined) unless
    the fit is exact (1.0).
    """
    y_true, y_pred = _check_pair(y_true, y_pred, channels)
    out: dict[str, float] = {}
    for c, channel in enumerate(channels):
        truth, pred = y_true[..., c].ravel(), y_pred[..., c].ravel()
        error = pred - truth
        denom = np.abs(truth) + np.abs(pred)
        ratio = np.divide(2 * np.abs(error), denom, out=np.zeros_like(denom), where=denom > 0)
        ss_res = float(np.sum(error**2))
        ss_tot = float(np.sum((truth - truth.mean()) ** 2))
        out[f"mae_{channel}"] = float(np.mean(np.abs(error)))
        out[f"rmse_{channel}"] = float(np.sqrt(np.mean(error**2)))
        out[f"smape_{channel}"] = float(100 * np.mean(ratio))
        out[f"r2_{channel}"] = 1.0 if ss_res == 0 else (1 - ss_res / ss_tot if ss_tot > 0 else float("nan"))
    return out


def skill(mae_model: float, mae_reference: float) -> float:
    """1 - model / reference: > 0 when the model beats the reference, 1 is perfect."""
    if mae_reference <= 0:
        raise ValueError(f"mae_reference must be > 0, got {mae_reference}")
    return 1.0 - mae_model / mae_reference


def error_by_load_level(
    y_true: np.ndarray, y_pred: np.ndarray, channels: Sequence[str], num_levels: int = 4
) -> pd.DataFrame:
    """MAE per channel within quantile bins of the true load (does the model fail at peaks?).

    Out: one row per (channel, level) with columns channel, level (0 = lightest), load_low,
    load_high (bin edges in the channel's units), count, mean_load, mae. Bins with tied edges
    (e.g. many zero minutes) are merged, so a channel may have fewer than num_levels rows.
    """
    y_true, y_pred = _check_pair(y_true, y_pred, channels)
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    rows = []
    for c, channel in enumerate(channels):
        truth, pred = y_true[..., c].ravel(), y_pred[..., c].ravel()
        levels, edges = pd.qcut(truth, num_levels, labels=False, retbins=True, duplicates="drop")
        levels = np.nan_to_num(levels, nan=0).astype(int)  # constant channel -> one level
        for level in range(max(len(edges) - 1, 1)):
            in_level = levels == level
            rows.append({
                "channel": channel, "level": level,
                "load_low": float(edges[level]), "load_high": float(edges[min(level + 1, len(edges) - 1)]),
                "count": int(in_level.sum()), "mean_load": float(truth[in_level].mean()),
                "mae": float(np.abs(pred[in_level] - truth[in_level]).mean()),
            })
    return pd.DataFrame(rows)
