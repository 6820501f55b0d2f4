"""Scoring a forecaster against the baselines on the same windows, and the study's report.

The headline across channels is WAPE (MAE / mean |actual|): it averages channels of different
scales (requests vs tokens), so promotion compares versions by `test_wape_mean`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from core.forecasting.baselines import BASELINES, baseline_forecast
from core.forecasting.metrics import error_by_load_level, forecast_metrics, skill
from core.forecasting.plots import evaluation_figures
from core.forecasting.training import TrainResult, predict
from core.forecasting.windows import ForecastDatasets


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


def evaluate_forecaster(
    model: nn.Module, data: ForecastDatasets, moving_average_window: int = 60
) -> tuple[dict[str, float], np.ndarray]:
    """The model on the val and test windows (`val_`/`test_` scores, original units) and every
    baseline with the model's skill against it on the same test windows; also the test forecasts."""
    y_val, y_test = data.unscaled("val")[1], data.unscaled("test")[1]
    pred_test = predict(model, data.X_test, data.scaler)
    metrics = scores(y_val, predict(model, data.X_val, data.scaler), data.channels, "val_")
    metrics.update(scores(y_test, pred_test, data.channels, "test_"))
    metrics.update(baseline_scores(data.split.full, data.t0_test, y_test, data.horizon, data.channels, metrics,
                                   moving_average_window))
    return metrics, pred_test


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


@dataclass
class ForecastEvaluation:
    """Everything a training run reports: final metrics, the error-by-load table, figures, report."""

    metrics: dict[str, float]
    by_load_level: pd.DataFrame
    figures: dict[str, Figure] = field(default_factory=dict)
    report: str = ""


def evaluate_training(
    result: TrainResult, data: ForecastDatasets, trace: str, train_frac: float, val_frac: float,
    moving_average_window: int = 60,
) -> ForecastEvaluation:
    """Score a finished training on the held-out windows, against the baselines, with its figures.

    `best_val_loss` (not `val_loss`): a final value under a per-epoch name would add a point to that curve.
    """
    metrics = {"best_val_loss": result.best_val_loss, "best_epoch": float(result.best_epoch),
               "stopped_early": float(result.stopped_early)}
    scored, pred_test = evaluate_forecaster(result.model, data, moving_average_window)
    metrics.update(scored)
    y_test = data.unscaled("test")[1]
    by_level = error_by_load_level(y_test, pred_test, data.channels)
    return ForecastEvaluation(
        metrics, by_level, evaluation_figures(result.history, y_test, pred_test, by_level, data.channels),
        report_markdown(metrics, data.channels, trace, data.seq_len, data.horizon, train_frac, val_frac))


def headline(metrics: Mapping[str, float], channels: Sequence[str]) -> str:
    """One line: the model's and persistence's test MAE per channel, and the test WAPE."""
    return ("test MAE " + ", ".join(f"{ch}={metrics[f'test_mae_{ch}']:.3f}" for ch in channels)
            + " (persistence: " + ", ".join(f"{metrics[f'baseline_persistence_test_mae_{ch}']:.3f}" for ch in channels)
            + f"), test WAPE {metrics['test_wape_mean']:.4f}")
