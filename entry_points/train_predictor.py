"""Entry point `train_predictor`: DLinear forecaster of LLM serving load (requests, input and output
tokens per minute) from a BurstGPT-format trace, with baselines, registered as `workload-predictor`."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import mlflow
import numpy as np
import pandas as pd

from core.forecasting import plots as forecast_plots
from core.forecasting.burstgpt import CHANNELS, load_trace, per_minute_series
from core.forecasting.baselines import BASELINES, baseline_forecast
from core.forecasting.windows import ForecastDataError, ForecastDatasets, build_datasets
from core.forecasting.metrics import error_by_load_level, forecast_metrics, skill
from core.forecasting.training import Forecaster, ForecastTrainConfig, predict, train_dlinear
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_figure, log_json, log_text
from tracking.cli import exit_on_input_error, parse_params, params_as_dict
from tracking.epoch_logging import EpochLogger
from tracking.models import log_pyfunc_model
from tracking.pyfunc_models import ForecasterPyfunc
from tracking.run_context import entry_point_run, set_data_digest
from tracking.tuning import CategoricalParam, FloatParam, IntParam, Objective

MODEL_NAME = "workload-predictor"


@dataclass
class Params:
    """Train the DLinear workload predictor on a BurstGPT-format trace."""

    trace: str = "synthetic"  # "synthetic" or a path to a BurstGPT CSV
    num_days: int = 61  # length of the synthetic trace
    trace_seed: int = 0
    models: str = ""  # comma-separated Model filter (e.g. "ChatGPT"); empty = all
    log_types: str = ""  # comma-separated Log Type filter; empty = all
    seq_len: int = 120
    horizon: int = 3
    stride: int = 1
    train_frac: float = 0.7
    val_frac: float = 0.1
    kernel_size: int = 25
    individual: bool = True
    decomposition: bool = True
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_epochs: int = 150
    patience: int = 10
    moving_average_window: int = 60
    seed: int = 0
    checkpoint_dir: str = ""  # resume training from here if a checkpoint exists
    register: bool = True
    model_name: str = MODEL_NAME
    log_system_metrics: bool = False


SEARCH_SPACE = [
    FloatParam("lr", 1e-4, 3e-2, log=True),
    FloatParam("weight_decay", 1e-7, 1e-3, log=True),
    CategoricalParam("batch_size", (64, 128, 256, 512)),
    IntParam("kernel_size", 5, 49, step=4),
    CategoricalParam("decomposition", (True, False)),
]
OBJECTIVE = Objective(metric="val_loss", direction="minimize")

TRAINING_COLUMNS = ("train_loss", "lr", "epoch_time_s")
VALIDATION_COLUMNS = ("val_loss", "val_mae", "is_best")


def _split_list(text: str) -> list[str] | None:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def validate(params: Params) -> None:
    """Parameter checks that need no data; each failure names the parameter."""
    for name in ("seq_len", "horizon", "stride", "num_epochs", "batch_size", "kernel_size", "num_days"):
        if getattr(params, name) <= 0:
            raise ForecastDataError(f"{name} must be > 0, got {getattr(params, name)}")
    if not 0 < params.train_frac < 1 or not 0 < params.val_frac < 1 or params.train_frac + params.val_frac >= 1:
        raise ForecastDataError(
            f"train_frac={params.train_frac} and val_frac={params.val_frac} must be in (0, 1) and sum below 1"
        )
    if params.trace != "synthetic" and not Path(params.trace).is_file():
        raise FileNotFoundError(f"trace file {params.trace} does not exist")


def _test_metrics(prefix: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    metrics = {f"{prefix}{k}": v for k, v in forecast_metrics(y_true, y_pred, CHANNELS).items()}
    # WAPE (MAE / mean |actual|) averages across channels of different scales; promotion uses it.
    wape = [np.abs(y_true[..., c] - y_pred[..., c]).mean() / max(np.abs(y_true[..., c]).mean(), 1e-9) for c in range(len(CHANNELS))]
    metrics[f"{prefix}wape_mean"] = float(np.mean(wape))
    return metrics


@dataclass
class PreparedData:
    series: pd.DataFrame
    data: ForecastDatasets
    source: str | dict[str, str]


def prepare(params: Params) -> PreparedData:
    """Read (or generate) the trace and build the windows; every input error surfaces here."""
    validate(params)
    trace = load_trace(
        params.trace, seed=params.trace_seed, num_days=params.num_days,
        models=_split_list(params.models), log_types=_split_list(params.log_types),
    )
    series = per_minute_series(trace)
    data = build_datasets(series[list(CHANNELS)].to_numpy(), params.seq_len, params.horizon, params.stride,
                          params.train_frac, params.val_frac, channels=CHANNELS)
    source: str | dict[str, str] = (
        {"generator": "core.forecasting.burstgpt.generate_synthetic_trace", "seed": str(params.trace_seed), "num_days": str(params.num_days)}
        if params.trace == "synthetic" else str(Path(params.trace).resolve())
    )
    return PreparedData(series, data, source)


def execute(
    params: Params,
    epoch_hook: Callable[[int, Mapping[str, float]], None] | None = None,
    prepared: PreparedData | None = None,
) -> dict[str, float]:
    """Train and evaluate inside the active MLflow run; returns the final metrics."""
    prepared = prepared or prepare(params)
    series, data = prepared.series, prepared.data
    set_data_digest(frame_digest(series))
    split = data.split
    for context, start, end in (("training", 0, split.val_start), ("validation", split.val_start, split.test_start),
                                ("test", split.test_start, len(series))):
        log_dataset_input(series.iloc[start:end], name=f"burstgpt-per-minute-{context}", context=context,
                          source=prepared.source)
    mlflow.log_params({"split_train_minutes": split.val_start, "split_val_minutes": split.test_start - split.val_start,
                       "split_test_minutes": len(series) - split.test_start, "split": "chronological"})

    config = ForecastTrainConfig(
        seq_len=params.seq_len, horizon=params.horizon, stride=params.stride, kernel_size=params.kernel_size,
        individual=params.individual, decomposition=params.decomposition, batch_size=params.batch_size,
        lr=params.lr, weight_decay=params.weight_decay, num_epochs=params.num_epochs, patience=params.patience,
        seed=params.seed,
    )
    logger = EpochLogger(TRAINING_COLUMNS, VALIDATION_COLUMNS)

    def on_epoch(record) -> None:
        metrics = {k: float(v) for k, v in asdict(record).items() if k != "epoch"}
        logger.log(record.epoch, metrics)
        if epoch_hook is not None:
            logger.flush()  # a pruned trial keeps the epochs it ran
            epoch_hook(record.epoch, metrics)

    checkpoint = Path(params.checkpoint_dir) / "dlinear_checkpoint.pt" if params.checkpoint_dir else None
    try:
        result = train_dlinear(data, config, on_epoch=on_epoch, checkpoint_path=checkpoint)
    finally:
        logger.close()

    # Evaluate DLinear and the baselines on the same val/test windows, in original units.
    # `best_val_loss`, not `val_loss`: a final value logged at step 0 would pollute the per-epoch curve.
    metrics: dict[str, float] = {"best_val_loss": result.best_val_loss, "best_epoch": float(result.best_epoch),
                                 "stopped_early": float(result.stopped_early)}
    y_val, y_test = data.unscaled("val")[1], data.unscaled("test")[1]
    pred_val = predict(result.model, data.X_val, data.scaler)
    pred_test = predict(result.model, data.X_test, data.scaler)
    metrics.update(_test_metrics("val_", y_val, pred_val))
    metrics.update(_test_metrics("test_", y_test, pred_test))
    for name in BASELINES:
        kwargs = {"window": params.moving_average_window} if name == "moving_average" else {}
        base_test = baseline_forecast(name, split.full, data.t0_test, params.horizon, **kwargs)
        base_metrics = _test_metrics(f"baseline_{name}_test_", y_test, base_test)
        metrics.update(base_metrics)
        for ch in CHANNELS:
            metrics[f"test_skill_vs_{name}_{ch}"] = skill(metrics[f"test_mae_{ch}"], base_metrics[f"baseline_{name}_test_mae_{ch}"])
    mlflow.log_metrics(metrics)
    metrics["val_loss"] = result.best_val_loss  # the tuning objective (OBJECTIVE.metric)

    by_level = error_by_load_level(y_test, pred_test, CHANNELS)
    log_csv(by_level, "evaluation/error_by_load_level.csv")
    log_figure(forecast_plots.plot_loss_curves(result.history), "plots/loss_curves.png")
    log_figure(forecast_plots.plot_forecast_vs_actual(y_test, pred_test, CHANNELS), "plots/forecast_vs_actual_test.png")
    log_figure(forecast_plots.plot_error_by_load_level(by_level), "plots/error_by_load_level.png")
    log_json({"params": asdict(params), "train_config": asdict(config), "best_epoch": result.best_epoch,
              "resumed_from_epoch": result.resumed_from_epoch}, "training_config.json")
    log_text(_report(params, metrics), "report.md")

    forecaster = Forecaster.from_training(result.model, data.scaler, CHANNELS)
    with tempfile.TemporaryDirectory() as tmp:
        forecaster.save(Path(tmp) / "forecaster")
        history = series[list(CHANNELS)].iloc[-params.seq_len:].reset_index(drop=True)
        output = forecaster.forecast(history).rename_axis("step").reset_index()
        info = log_pyfunc_model(
            "model", ForecasterPyfunc(), {"forecaster": str(Path(tmp) / "forecaster")}, history, output,
            registered_model_name=params.model_name if params.register else None,
        )
    if params.register:
        metrics["registered_version"] = float(info.registered_model_version)
    return metrics


def _report(params: Params, metrics: Mapping[str, float]) -> str:
    lines = [
        "# Workload predictor (DLinear)", "",
        f"Trace: `{params.trace}`; history {params.seq_len} min, horizon {params.horizon} min; chronological split "
        f"{params.train_frac:.0%}/{params.val_frac:.0%}/rest; scaler fitted on train only.", "",
        "| channel | DLinear test MAE | " + " | ".join(f"{b} MAE" for b in BASELINES) + " | skill vs persistence |",
        "|---|---|" + "---|" * len(BASELINES) + "---|",
    ]
    for ch in CHANNELS:
        cells = [f"{metrics[f'baseline_{b}_test_mae_{ch}']:.3f}" for b in BASELINES]
        lines.append(f"| {ch} | {metrics[f'test_mae_{ch}']:.3f} | " + " | ".join(cells)
                     + f" | {metrics[f'test_skill_vs_persistence_{ch}']:.3f} |")
    lines += ["", f"Best epoch {int(metrics['best_epoch'])}, best val loss {metrics['best_val_loss']:.5f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="train_predictor")
    prepared = prepare(params)  # bad input fails here, before a run is opened
    with entry_point_run("train_predictor", params_as_dict(params), log_system_metrics=params.log_system_metrics) as run:
        metrics = execute(params, prepared=prepared)
    version = f", registered {params.model_name} version {int(metrics['registered_version'])}" if params.register else ""
    print(
        "train_predictor: test MAE " + ", ".join(f"{ch}={metrics[f'test_mae_{ch}']:.3f}" for ch in CHANNELS)
        + f" (persistence: " + ", ".join(f"{metrics[f'baseline_persistence_test_mae_{ch}']:.3f}" for ch in CHANNELS)
        + f"); run {run.info.run_id}{version}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
