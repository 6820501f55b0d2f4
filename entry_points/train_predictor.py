"""Entry point `train_predictor`: workload forecaster of LLM serving load (requests, input and output
tokens per minute) from a BurstGPT-format trace, scored against DLinear and the baselines on the same
windows, registered as `workload-predictor` (tag `model_kind`)."""

from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow

from core.forecasting import evaluation
from core.forecasting.burstgpt import CHANNELS
from core.forecasting.training import (TRAINING_KEYS, VALIDATION_KEYS, Forecaster, ForecastStudy, ForecastTrainConfig,
                                       load_study, train_with_reference)
from tracking.artifacts import log_csv, log_figures, log_json, log_split_inputs, log_text
from tracking.cli import comma_list, config_from_params
from tracking.entry_point import EntryPoint, EpochHook
from tracking.epoch_logging import EpochLogger, epoch_callback
from tracking.pyfunc_models import log_forecaster
from tracking.registry import Promotion
from tracking.run_context import note_checkpoint
from tracking.store import FORECASTING_STUDY
from tracking.tuning import CategoricalParam, FloatParam, IntParam, Objective, Tuning

PROMOTION = Promotion("workload-predictor", metric="test_wape_mean", mode="min")
_D = ForecastTrainConfig()  # the training defaults live in core


@dataclass
class Params:
    """Train the workload predictor (calendar MLP or DLinear) on a BurstGPT-format trace."""

    trace: str = "synthetic"  # "synthetic" or a path to a BurstGPT CSV
    num_days: int = 61  # length of the synthetic trace
    trace_seed: int = 0
    models: str = ""  # comma-separated Model filter (e.g. "ChatGPT"); empty = all
    log_types: str = ""  # comma-separated Log Type filter; empty = all
    model_kind: str = _D.model_kind  # calendar_mlp (P50/P90, the default: wins on held-out data) or dlinear
    seq_len: int = _D.seq_len  # minutes of history per window
    horizon: int = _D.horizon  # minutes forecast
    stride: int = _D.stride
    split: str = "0.7,0.1"  # time-order fractions train,val (rest: test), train,val,test or train,val,gap,test
    kernel_size: int = _D.kernel_size  # DLinear's moving-average kernel
    hidden_width: int = _D.hidden_width  # calendar MLP: hidden units
    recent_minutes: int = _D.recent_minutes  # calendar MLP: last minutes fed raw
    lag_days: int = _D.lag_days  # calendar MLP: previous days' same minutes as features
    batch_size: int = _D.batch_size
    lr: float = _D.lr
    weight_decay: float = _D.weight_decay
    num_epochs: int = _D.num_epochs
    patience: int = _D.patience  # epochs without a val-loss improvement before stopping
    num_threads: int = _D.num_threads  # torch threads, in training and in the served model (wins over OMP_NUM_THREADS)
    moving_average_window: int = 60  # minutes averaged by the moving-average baseline
    seed: int = _D.seed
    checkpoint_dir: str = "outputs/train_predictor"  # resumes a run on the same data and settings
    register: bool = True
    model_name: str = PROMOTION.model_name
    log_system_metrics: bool = False


TUNING = Tuning([FloatParam("lr", 1e-4, 3e-2, log=True), FloatParam("weight_decay", 1e-7, 1e-3, log=True),
                 CategoricalParam("batch_size", (64, 128, 256, 512)), IntParam("hidden_width", 16, 128, step=16)],
                Objective("val_loss", "minimize"))


def check(params: Params) -> None:
    """The checks that need the parameters alone (the pipeline runs them before its first step)."""
    if params.num_days <= 0:
        raise ValueError(f"num_days must be > 0, got {params.num_days}")
    config_from_params(ForecastTrainConfig, params).validate()
    if params.trace != "synthetic" and not Path(params.trace).is_file():
        raise FileNotFoundError(f"trace file {params.trace} does not exist")


def prepare(params: Params) -> ForecastStudy:
    """Read (or generate) the trace and build the windows: every data error surfaces here."""
    return load_study(params.trace, params.trace_seed, params.num_days, comma_list(params.models, "models"),
                      comma_list(params.log_types, "log_types"), config_from_params(ForecastTrainConfig, params),
                      params.split, params.moving_average_window)


def execute(params: Params, prepared: ForecastStudy, epoch_hook: EpochHook | None = None) -> dict[str, float]:
    """Train (and a DLinear reference on the same windows), score against the baselines in original units, log, register."""
    data = prepared.data
    log_split_inputs(prepared.series, data.split.row_slices(), "burstgpt-per-minute", prepared.source,
                     kind="chronological, rows are minutes")
    config = config_from_params(ForecastTrainConfig, params)
    note_checkpoint(params.checkpoint_dir, "rerun the same command to resume")
    with closing(EpochLogger(TRAINING_KEYS, VALIDATION_KEYS)) as logger:
        on_epoch = epoch_callback(logger, epoch_hook)
        result, dlinear = train_with_reference(data, config, lambda r: on_epoch(r.epoch, asdict(r)), params.checkpoint_dir)

    evaluated = evaluation.evaluate_training(result, data, params.trace, params.split, params.moving_average_window, dlinear)
    mlflow.log_metrics(evaluated.metrics)
    log_csv(evaluated.by_load_level, "evaluation/error_by_load_level.csv")
    log_figures(evaluated.figures)
    log_text(evaluated.report, "report.md")
    log_json({"params": asdict(params), **result.record()}, "training_config.json")
    forecaster = Forecaster.from_training(result, data)
    version = log_forecaster(forecaster, forecaster.history_example(prepared.series),
                             params.model_name if params.register else None, PROMOTION)
    # val_loss (the tuning objective) and the version are returned, not logged as final metrics.
    return {**evaluated.metrics, "val_loss": result.best_val_loss, **({"registered_version": version} if version else {})}


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    version = metrics.get("registered_version")
    return evaluation.headline(metrics, CHANNELS) + (f"; registered {params.model_name} version {version}" if version else "")


ENTRY_POINT = EntryPoint("train_predictor", Params, study=FORECASTING_STUDY, execute=execute, summary=summary,
                         prepare=prepare, tuning=TUNING, promotion=PROMOTION, check=check)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
