"""Entry point `train_predictor`: DLinear forecaster of LLM serving load (requests, input and output
tokens per minute) from a BurstGPT-format trace, with baselines, registered as `workload-predictor`."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import pandas as pd

from core.forecasting import evaluation, plots
from core.forecasting.burstgpt import CHANNELS, load_trace, per_minute_series
from core.forecasting.metrics import error_by_load_level
from core.forecasting.training import Forecaster, ForecastTrainConfig, predict, train_dlinear
from core.forecasting.windows import ForecastDataError, ForecastDatasets, build_datasets
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_figure, log_json, log_text
from tracking.cli import comma_list, config_from_params
from tracking.entry_point import EntryPoint, EpochHook
from tracking.epoch_logging import EpochLogger, epoch_callback
from tracking.models import log_pyfunc_model
from tracking.pyfunc_models import ForecasterPyfunc
from tracking.registry import Promotion
from tracking.run_context import set_data_digest
from tracking.store import FORECASTING_STUDY
from tracking.tuning import CategoricalParam, FloatParam, IntParam, Objective, Tuning

PROMOTION = Promotion("workload-predictor", metric="test_wape_mean", mode="min")
_D = ForecastTrainConfig()  # the training defaults live in core


@dataclass
class Params:
    """Train the DLinear workload predictor on a BurstGPT-format trace."""

    trace: str = "synthetic"  # "synthetic" or a path to a BurstGPT CSV
    num_days: int = 61  # length of the synthetic trace
    trace_seed: int = 0
    models: str = ""  # comma-separated Model filter (e.g. "ChatGPT"); empty = all
    log_types: str = ""  # comma-separated Log Type filter; empty = all
    seq_len: int = _D.seq_len  # minutes of history per window
    horizon: int = _D.horizon  # minutes forecast
    stride: int = _D.stride
    train_frac: float = 0.7  # chronological split: train share of the minutes
    val_frac: float = 0.1  # then validation; the rest is the held-out test
    kernel_size: int = _D.kernel_size  # DLinear's moving-average kernel
    individual: bool = _D.individual  # one linear head per channel
    decomposition: bool = _D.decomposition  # trend/seasonal decomposition
    batch_size: int = _D.batch_size
    lr: float = _D.lr
    weight_decay: float = _D.weight_decay
    num_epochs: int = _D.num_epochs
    patience: int = _D.patience  # epochs without a val-loss improvement before stopping
    num_threads: int = 1  # torch threads (one is fastest for this model on a busy 2-core machine)
    moving_average_window: int = 60  # minutes averaged by the moving-average baseline
    seed: int = _D.seed
    checkpoint_dir: str = ""  # resume training from here if a checkpoint exists
    register: bool = True
    model_name: str = PROMOTION.model_name
    log_system_metrics: bool = False


TUNING = Tuning(
    search_space=[
        FloatParam("lr", 1e-4, 3e-2, log=True),
        FloatParam("weight_decay", 1e-7, 1e-3, log=True),
        CategoricalParam("batch_size", (64, 128, 256, 512)),
        IntParam("kernel_size", 5, 49, step=4),
        CategoricalParam("decomposition", (True, False)),
    ],
    objective=Objective(metric="val_loss", direction="minimize"),
)
TRAINING_COLUMNS = ("train_loss", "lr", "epoch_time_s")
VALIDATION_COLUMNS = ("val_loss", "val_mae", "is_best")


@dataclass
class Prepared:
    series: pd.DataFrame
    data: ForecastDatasets
    source: str | dict[str, str]


def prepare(params: Params) -> Prepared:
    """Check the parameters, read (or generate) the trace and build the windows: every input error surfaces here."""
    for name in ("num_days", "num_threads", "moving_average_window"):
        if getattr(params, name) <= 0:
            raise ForecastDataError(f"{name} must be > 0, got {getattr(params, name)}")
    config_from_params(ForecastTrainConfig, params).validate()
    if not 0 < params.train_frac < 1 or not 0 < params.val_frac < 1 or params.train_frac + params.val_frac >= 1:
        raise ForecastDataError(
            f"train_frac={params.train_frac} and val_frac={params.val_frac} must be in (0, 1) and sum below 1")
    if params.trace != "synthetic" and not Path(params.trace).is_file():
        raise FileNotFoundError(f"trace file {params.trace} does not exist")
    trace = load_trace(params.trace, seed=params.trace_seed, num_days=params.num_days,
                       models=comma_list(params.models, "models") or None,
                       log_types=comma_list(params.log_types, "log_types") or None)
    series = per_minute_series(trace)
    data = build_datasets(series[list(CHANNELS)].to_numpy(), params.seq_len, params.horizon, params.stride,
                          params.train_frac, params.val_frac, channels=CHANNELS)
    source: str | dict[str, str] = (
        {"generator": "core.forecasting.burstgpt.generate_synthetic_trace", "seed": str(params.trace_seed),
         "num_days": str(params.num_days)} if params.trace == "synthetic" else str(Path(params.trace).resolve()))
    return Prepared(series, data, source)


def _log_split(prepared: Prepared) -> None:
    series, split = prepared.series, prepared.data.split
    set_data_digest(frame_digest(series))
    for context, start, end in (("training", 0, split.val_start), ("validation", split.val_start, split.test_start),
                                ("test", split.test_start, len(series))):
        log_dataset_input(series.iloc[start:end], name=f"burstgpt-per-minute-{context}", context=context,
                          source=prepared.source)
    mlflow.log_params({"split_train_minutes": split.val_start, "split_val_minutes": split.test_start - split.val_start,
                       "split_test_minutes": len(series) - split.test_start, "split": "chronological"})


def execute(params: Params, prepared: Prepared, epoch_hook: EpochHook | None = None) -> dict[str, float]:
    """Train, score DLinear and the baselines on the same val/test windows (original units), log, register."""
    data = prepared.data
    _log_split(prepared)
    config = config_from_params(ForecastTrainConfig, params)
    logger = EpochLogger(TRAINING_COLUMNS, VALIDATION_COLUMNS)
    on_epoch = epoch_callback(logger, epoch_hook)
    checkpoint = Path(params.checkpoint_dir) / "dlinear_checkpoint.pt" if params.checkpoint_dir else None
    try:
        result = train_dlinear(data, config, on_epoch=lambda record: on_epoch(record.epoch, asdict(record)),
                               checkpoint_path=checkpoint)
    finally:
        logger.close()

    # `best_val_loss`, not `val_loss`: a final value logged at step 0 would pollute the per-epoch curve.
    metrics: dict[str, float] = {"best_val_loss": result.best_val_loss, "best_epoch": float(result.best_epoch),
                                 "stopped_early": float(result.stopped_early)}
    y_val, y_test = data.unscaled("val")[1], data.unscaled("test")[1]
    pred_test = predict(result.model, data.X_test, data.scaler)
    metrics.update(evaluation.scores(y_val, predict(result.model, data.X_val, data.scaler), CHANNELS, "val_"))
    metrics.update(evaluation.scores(y_test, pred_test, CHANNELS, "test_"))
    metrics.update(evaluation.baseline_scores(data.split.full, data.t0_test, y_test, params.horizon, CHANNELS, metrics,
                                              params.moving_average_window))
    mlflow.log_metrics(metrics)
    metrics["val_loss"] = result.best_val_loss  # the tuning objective, returned only

    by_level = error_by_load_level(y_test, pred_test, CHANNELS)
    log_csv(by_level, "evaluation/error_by_load_level.csv")
    log_figure(plots.plot_loss_curves(result.history), "plots/loss_curves.png")
    log_figure(plots.plot_forecast_vs_actual(y_test, pred_test, CHANNELS), "plots/forecast_vs_actual_test.png")
    log_figure(plots.plot_error_by_load_level(by_level), "plots/error_by_load_level.png")
    log_json({"params": asdict(params), "train_config": asdict(config), "best_epoch": result.best_epoch,
              "resumed_from_epoch": result.resumed_from_epoch}, "training_config.json")
    log_text(evaluation.report_markdown(metrics, CHANNELS, params.trace, params.seq_len, params.horizon,
                                        params.train_frac, params.val_frac), "report.md")

    forecaster = Forecaster.from_training(result.model, data.scaler, CHANNELS)
    with tempfile.TemporaryDirectory() as tmp:
        forecaster.save(Path(tmp) / "forecaster")
        history = prepared.series[list(CHANNELS)].iloc[-params.seq_len:].reset_index(drop=True)
        output = forecaster.forecast(history).rename_axis("step").reset_index()
        version = log_pyfunc_model("model", ForecasterPyfunc(), {"forecaster": str(Path(tmp) / "forecaster")}, history,
                                   output, registered_model_name=params.model_name if params.register else None,
                                   promotion=PROMOTION)
    if version is not None:
        metrics["registered_version"] = float(version)
    return metrics


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    version = f"; registered {params.model_name} version {int(metrics['registered_version'])}" if "registered_version" in metrics else ""
    return ("test MAE " + ", ".join(f"{ch}={metrics[f'test_mae_{ch}']:.3f}" for ch in CHANNELS)
            + " (persistence: " + ", ".join(f"{metrics[f'baseline_persistence_test_mae_{ch}']:.3f}" for ch in CHANNELS)
            + f"), test WAPE {metrics['test_wape_mean']:.4f}{version}")


ENTRY_POINT = EntryPoint("train_predictor", Params, study=FORECASTING_STUDY, execute=execute, summary=summary,
                         prepare=prepare, tuning=TUNING, promotion=PROMOTION)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
