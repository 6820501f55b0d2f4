"""Entry point `train_predictor`: DLinear forecaster of LLM serving load (requests, input and output
tokens per minute) from a BurstGPT-format trace, with baselines, registered as `workload-predictor`."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import pandas as pd

from core.forecasting import evaluation
from core.forecasting.burstgpt import CHANNELS, load_trace, per_minute_series, trace_source
from core.forecasting.training import Forecaster, ForecastTrainConfig, train_dlinear
from core.forecasting.windows import ForecastDataError, ForecastDatasets, build_datasets
from tracking.artifacts import log_csv, log_figures, log_json, log_split_inputs, log_text
from tracking.cli import comma_list, config_from_params
from tracking.entry_point import EntryPoint, EpochHook
from tracking.epoch_logging import EpochLogger, epoch_callback
from tracking.pyfunc_models import log_forecaster
from tracking.registry import Promotion
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


TUNING = Tuning([FloatParam("lr", 1e-4, 3e-2, log=True), FloatParam("weight_decay", 1e-7, 1e-3, log=True),
                 CategoricalParam("batch_size", (64, 128, 256, 512)), IntParam("kernel_size", 5, 49, step=4),
                 CategoricalParam("decomposition", (True, False))], Objective("val_loss", "minimize"))
HISTORY_COLUMNS = (("train_loss", "lr", "epoch_time_s"), ("val_loss", "val_mae", "is_best"))  # training / validation CSVs


@dataclass
class Prepared:
    series: pd.DataFrame  # load per minute, all channels
    data: ForecastDatasets  # the scaled windows of the chronological split
    source: str | dict[str, str]  # where the trace came from, for the dataset inputs


def prepare(params: Params) -> Prepared:
    """Check the parameters, read (or generate) the trace and build the windows: every input error surfaces here."""
    for name in (n for n in ("num_days", "num_threads", "moving_average_window") if getattr(params, n) <= 0):
        raise ForecastDataError(f"{name} must be > 0, got {getattr(params, name)}")
    config_from_params(ForecastTrainConfig, params).validate()
    if params.trace != "synthetic" and not Path(params.trace).is_file():
        raise FileNotFoundError(f"trace file {params.trace} does not exist")
    series = per_minute_series(load_trace(params.trace, params.trace_seed, params.num_days,
                                          comma_list(params.models, "models") or None,
                                          comma_list(params.log_types, "log_types") or None))
    data = build_datasets(series[list(CHANNELS)].to_numpy(), params.seq_len, params.horizon, params.stride,
                          params.train_frac, params.val_frac, channels=CHANNELS)
    return Prepared(series, data, trace_source(params.trace, params.trace_seed, params.num_days))


def execute(params: Params, prepared: Prepared, epoch_hook: EpochHook | None = None) -> dict[str, float]:
    """Train, score DLinear and the baselines on the same val/test windows (original units), log, register."""
    data, split = prepared.data, prepared.data.split
    log_split_inputs(prepared.series, {"training": slice(0, split.val_start), "validation": slice(split.val_start, split.test_start),
                                       "test": slice(split.test_start, None)}, "burstgpt-per-minute", prepared.source,
                     kind="chronological (rows are minutes)")
    config = config_from_params(ForecastTrainConfig, params)
    logger = EpochLogger(*HISTORY_COLUMNS)
    on_epoch = epoch_callback(logger, epoch_hook)
    checkpoint = Path(params.checkpoint_dir) / "dlinear_checkpoint.pt" if params.checkpoint_dir else None
    try:
        result = train_dlinear(data, config, lambda record: on_epoch(record.epoch, asdict(record)), checkpoint)
    finally:
        logger.close()

    evaluated = evaluation.evaluate_training(result, data, params.trace, params.train_frac, params.val_frac,
                                             params.moving_average_window)
    mlflow.log_metrics(evaluated.metrics)
    log_csv(evaluated.by_load_level, "evaluation/error_by_load_level.csv")
    log_figures(evaluated.figures)
    log_text(evaluated.report, "report.md")
    log_json({"params": asdict(params), "train_config": asdict(config), "best_epoch": result.best_epoch,
              "resumed_from_epoch": result.resumed_from_epoch}, "training_config.json")
    history = prepared.series[list(CHANNELS)].iloc[-params.seq_len:].reset_index(drop=True)
    version = log_forecaster(Forecaster.from_training(result.model, data.scaler, CHANNELS), history,
                             params.model_name if params.register else None, PROMOTION)
    # val_loss (the tuning objective) and the version are returned, not logged as final metrics.
    return {**evaluated.metrics, "val_loss": result.best_val_loss, **({"registered_version": version} if version else {})}


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    version = f"; registered {params.model_name} version {metrics['registered_version']}" if "registered_version" in metrics else ""
    return evaluation.headline(metrics, CHANNELS) + version


ENTRY_POINT = EntryPoint("train_predictor", Params, study=FORECASTING_STUDY, execute=execute, summary=summary,
                         prepare=prepare, tuning=TUNING, promotion=PROMOTION)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
