"""Scoring a forecaster against the baselines on the same windows, and the study's report.

The headline across channels is WAPE (MAE / mean |actual|): it averages channels of different
scales (requests vs tokens), so promotion compares versions by `test_wape_mean`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from core.forecasting.baselines import BASELINES, baseline_forecast
from core.forecasting.metrics import forecast_metrics, skill


def wape(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Weighted absolute percentage error of one channel: sum |e| / sum |y| (a fraction)."""
    return float(np.abs(y_true - y_pred).mean() / max(np.abs(y_true).mean(), 1e-9))


def scores(y_true: np.ndarray, y_pred: np.ndarray, channels: Sequence[str], prefix: str) -> dict[str, float]:
    """`forecast_metrics` per channel plus `wape_mean` over the channels, every key prefixed."""
    out = {f"{prefix}{k}": v for k, v in forecast_metrics(y_true, y_pred, channels).items()}
    out[f"{prefix}wape_mean"] = float(np.mean([wape(y_true[..., c], y_pred[..., c]) for c in range(len(channels))]))
    return out


def baseline_scores(
    series: np.ndarray, t0: np.ndarray, y_true: np.ndarray, horizon: int, channels: Sequence[str],
    model_scores: Mapping[str, float], moving_average_window: int = 60, split: str = "test",
) -> dict[str, float]:
    """Every baseline on the same windows (`baseline_<name>_<split>_<metric>`) and the model's skill
    against each (`<split>_skill_vs_<name>_<channel>`, from `model_scores`' `<split>_mae_<channel>`)."""
    out: dict[str, float] = {}
    for name in BASELINES:
        kwargs = {"window": moving_average_window} if name == "moving_average" else {}
        base = scores(y_true, baseline_forecast(name, series, t0, horizon, **kwargs), channels, f"baseline_{name}_{split}_")
        out.update(base)
        for ch in channels:
            out[f"{split}_skill_vs_{name}_{ch}"] = skill(model_scores[f"{split}_mae_{ch}"], base[f"baseline_{name}_{split}_mae_{ch}"])
    return out


def report_markdown(
    metrics: Mapping[str, float], channels: Sequence[str], trace: str, seq_len: int, horizon: int,
    train_frac: float, val_frac: float,
) -> str:
    """The run's `report.md`: test MAE of the model and of every baseline per channel."""
    lines = [
        "# Workload predictor (DLinear)", "",
        f"Trace: `{trace}`; history {seq_len} min, horizon {horizon} min; chronological split "
        f"{train_frac:.0%}/{val_frac:.0%}/rest; scaler fitted on train only.", "",
        "| channel | DLinear test MAE | " + " | ".join(f"{b} MAE" for b in BASELINES) + " | skill vs persistence |",
        "|---|---|" + "---|" * len(BASELINES) + "---|",
    ]
    for ch in channels:
        cells = [f"{metrics[f'baseline_{b}_test_mae_{ch}']:.3f}" for b in BASELINES]
        lines.append(f"| {ch} | {metrics[f'test_mae_{ch}']:.3f} | " + " | ".join(cells)
                     + f" | {metrics[f'test_skill_vs_persistence_{ch}']:.3f} |")
    lines += ["", f"Test WAPE (mean over channels) {metrics['test_wape_mean']:.4f}; best epoch {int(metrics['best_epoch'])}, "
              f"best val loss {metrics['best_val_loss']:.5f}."]
    return "\n".join(lines) + "\n"
