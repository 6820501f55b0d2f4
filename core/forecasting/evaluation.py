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

from core.forecasting.baselines import BASELINES, baseline_forecast
from core.forecasting.calendar_mlp import QUANTILES
from core.forecasting.metrics import error_by_load_level, forecast_metrics, skill
from core.forecasting.plots import evaluation_figures
from core.forecasting.training import TrainResult, model_inputs, point_forecast, predict
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


def p90_coverage(y_true: np.ndarray, forecast: np.ndarray, channels: Sequence[str], prefix: str) -> dict[str, float]:
    """Share of actual values at or below the P90 forecast per channel (`<prefix>p90_coverage_<channel>`; 0.9 is calibrated)."""
    p90 = forecast[..., QUANTILES.index(0.9)]
    return {f"{prefix}p90_coverage_{ch}": float((y_true[..., c] <= p90[..., c]).mean()) for c, ch in enumerate(channels)}


def evaluate_forecaster(
    result: TrainResult, data: ForecastDatasets, moving_average_window: int = 60, dlinear: TrainResult | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """The model on the val and test windows (`val_`/`test_` scores, original units; P90 coverage for a
    quantile model), every baseline (and a DLinear trained on the same windows, when given) with the
    model's skill against each on the same test windows; also the test point forecasts."""
    metrics: dict[str, float] = {}
    forecasts = {}
    for part in ("val", "test"):
        forecasts[part] = predict(result.model, model_inputs(result.config, data, part), data.scaler)
        y_true = data.unscaled(part)[1]
        metrics.update(scores(y_true, point_forecast(forecasts[part]), data.channels, f"{part}_"))
        if forecasts[part].ndim == 4:
            metrics.update(p90_coverage(y_true, forecasts[part], data.channels, f"{part}_"))
    y_test = data.unscaled("test")[1]
    metrics.update(baseline_scores(data.split.full, data.t0_test, y_test, data.horizon, data.channels, metrics,
                                   moving_average_window))
    if dlinear is not None:
        reference = scores(y_test, predict(dlinear.model, model_inputs(dlinear.config, data, "test"), data.scaler),
                           data.channels, "baseline_dlinear_test_")
        metrics.update(reference)
        metrics.update({f"test_skill_vs_dlinear_{ch}": skill(metrics[f"test_mae_{ch}"], reference[f"baseline_dlinear_test_mae_{ch}"])
                        for ch in data.channels})
    return metrics, point_forecast(forecasts["test"])


def report_markdown(metrics: Mapping[str, float], channels: Sequence[str], trace: str, model_kind: str, seq_len: int,
                    horizon: int, split: str) -> str:
    """The run's `report.md`: test MAE of the model and of every baseline per channel."""
    references = [*(["dlinear"] if f"baseline_dlinear_test_mae_{channels[0]}" in metrics else []), *BASELINES]
    coverage = f"test_p90_coverage_{channels[0]}" in metrics
    lines = [
        f"# Workload predictor ({model_kind})", "",
        f"Trace: `{trace}`; history {seq_len} min, horizon {horizon} min; chronological split {split} "
        "(train,val[[,gap],test] fractions); scaler fitted on train only.", "",
        f"| channel | {model_kind} test MAE | " + " | ".join(f"{b} MAE" for b in references)
        + " | skill vs persistence |" + (" P90 coverage |" if coverage else ""),
        "|---|---|" + "---|" * len(references) + "---|" + ("---|" if coverage else ""),
    ]
    for ch in channels:
        cells = [f"{metrics[f'baseline_{b}_test_mae_{ch}']:.3f}" for b in references]
        lines.append(f"| {ch} | {metrics[f'test_mae_{ch}']:.3f} | " + " | ".join(cells)
                     + f" | {metrics[f'test_skill_vs_persistence_{ch}']:.3f} |"
                     + (f" {metrics[f'test_p90_coverage_{ch}']:.3f} |" if coverage else ""))
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
    result: TrainResult, data: ForecastDatasets, trace: str, split: str, moving_average_window: int = 60,
    dlinear: TrainResult | None = None,
) -> ForecastEvaluation:
    """Score a finished training on the held-out windows, against the baselines (and `dlinear`, a DLinear
    trained on the same windows), with its figures.

    `best_val_loss` (not `val_loss`): a final value under a per-epoch name would add a point to that curve.
    """
    metrics = {"best_val_loss": result.best_val_loss, "best_epoch": float(result.best_epoch),
               "stopped_early": float(result.stopped_early)}
    scored, pred_test = evaluate_forecaster(result, data, moving_average_window, dlinear)
    metrics.update(scored)
    y_test = data.unscaled("test")[1]
    by_level = error_by_load_level(y_test, pred_test, data.channels)
    return ForecastEvaluation(
        metrics, by_level, evaluation_figures(result.history, y_test, pred_test, by_level, data.channels),
        report_markdown(metrics, data.channels, trace, result.config.model_kind, data.seq_len, data.horizon, split))


def headline(metrics: Mapping[str, float], channels: Sequence[str]) -> str:
    """One line: the model's and persistence's test MAE per channel, and the test WAPE."""
    return ("test MAE " + ", ".join(f"{ch}={metrics[f'test_mae_{ch}']:.3f}" for ch in channels)
            + " (persistence: " + ", ".join(f"{metrics[f'baseline_persistence_test_mae_{ch}']:.3f}" for ch in channels)
            + f"), test WAPE {metrics['test_wape_mean']:.4f}")
