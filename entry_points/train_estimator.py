"""Entry point `train_estimator`: the latency estimator (MLP with a P90 head) on a profiling table,
split by sample and by held-out config, scored against linear and analytic baselines, registered as
`latency-estimator`."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow

from core.latency import plots, report
from core.latency.data import EstimatorError, TrainingData, knob_value, training_data
from core.latency.estimator import TRAINING_RECORD_KEYS, VALIDATION_RECORD_KEYS, EstimatorConfig
from core.latency.study import check_resume, run_study
from tracking import estimator_refs as refs
from tracking.artifacts import log_csv, log_figure, log_json, log_text
from tracking.cli import comma_list, config_from_params
from tracking.entry_point import EntryPoint, EpochHook
from tracking.epoch_logging import EpochLogger, epoch_callback
from tracking.pyfunc_models import log_latency_estimator
from tracking.registry import Promotion
from tracking.run_context import note_checkpoint
from tracking.store import ADAPTIVE_VLM_STUDY
from tracking.tuning import CategoricalParam, FloatParam, IntParam, Objective, Tuning

# Promotion: mean held-out-sample MAPE over the three predicted components (lower is better).
PROMOTION = Promotion(refs.MODEL_NAME, metric="test_mape_mean", mode="min")
_D = EstimatorConfig()  # the training defaults live in core


@dataclass
class Params:
    """Train the latency estimator on a profiling table (a ProfileStore results directory)."""

    results_dir: str = refs.DEFAULT_RESULTS_DIR  # a ProfileStore results directory
    dataset_names: str = ""  # comma-separated; empty = every data set in results_dir
    output_dir: str = "outputs/estimator"  # checkpoints go to <output_dir>/<run id>/
    batch_size: int = _D.batch_size
    num_epochs: int = _D.num_epochs
    lr: float = _D.lr  # Adam's learning rate
    lr_schedule: str = _D.lr_schedule  # cosine (lr -> lr/100 over the epochs) | constant
    train_split: float = _D.train_split  # share of samples for train + val; the rest is the held-out test set
    device: str = _D.device  # torch device of the training
    seed: int = _D.seed  # of the splits, the initial weights and the batch order
    hidden_width: int = _D.hidden_width  # units per hidden layer
    depth: int = _D.depth  # hidden layers
    weight_decay: float = _D.weight_decay
    loss: str = _D.loss  # rel_l1 (mean |pred/true - 1|: MAPE itself) | log_mse | mse
    quantile: float = _D.quantile  # the upper-quantile head (guardrails read its P90)
    heldout_knob: str = "top_k"  # the held-out-config split never trains on one value of this knob
    heldout_value: str = ""  # empty: the middle option of the knob
    heldout_config: bool = True  # also train and score the held-out-config model
    resume_dir: str = ""  # continue from <resume_dir>/last.pt of an interrupted run (same parameters)
    output_tokens: int = 16  # the model's default answer length for T_total_ms when a row gives none
    profile_run_id: str = ""  # lineage: the profile run that wrote results_dir (the pipeline passes it)
    register: bool = True  # register the model as model_name
    model_name: str = PROMOTION.model_name
    log_system_metrics: bool = False  # CPU/memory curves of the run


TUNING = Tuning(  # the objective is not val_loss: its scale depends on the loss kind, which the search varies
    search_space=[CategoricalParam("hidden_width", (32, 64, 128, 256)), IntParam("depth", 1, 4),
                  FloatParam("lr", 1e-4, 1e-2, log=True), FloatParam("weight_decay", 1e-7, 1e-3, log=True),
                  CategoricalParam("loss", ("log_mse", "rel_l1", "mse")), CategoricalParam("lr_schedule", ("cosine", "constant"))],
    objective=Objective(metric="val_rel_error_mean", direction="minimize"))


def check(params: Params) -> None:
    """The parameters alone (device included): the pipeline checks them before its first step."""
    config_from_params(EstimatorConfig, params).validate()
    if params.output_tokens < 1:
        raise EstimatorError(f"parameter output_tokens must be >= 1, got {params.output_tokens}")


def prepare(params: Params) -> TrainingData:
    """Load and check the table, make both splits, check a resume's checkpoints: every input error surfaces here."""
    data = training_data(params.results_dir, comma_list(params.dataset_names, "dataset_names") or None, params.train_split,
                         params.seed, params.heldout_knob if params.heldout_config else None,
                         knob_value(params.heldout_knob, params.heldout_value, "heldout_value"))
    check_resume(data, config_from_params(EstimatorConfig, params), params.resume_dir)  # other data: refused, checkpoints kept
    return data


def execute(params: Params, prepared: TrainingData, epoch_hook: EpochHook | None = None) -> dict[str, float]:
    """Train and score on both splits, log, register; the final metrics (with registered_version when registered)."""
    config = config_from_params(EstimatorConfig, params)
    checkpoint_dir = Path(params.resume_dir or Path(params.output_dir) / mlflow.active_run().info.run_id)
    note_checkpoint(checkpoint_dir, f"rerun with -P resume_dir={checkpoint_dir} to resume")
    refs.log_training_data(prepared, params.results_dir, comma_list(params.dataset_names, "dataset_names") or None)
    logger = EpochLogger(TRAINING_RECORD_KEYS, VALIDATION_RECORD_KEYS)
    on_epoch = epoch_callback(logger, epoch_hook)
    try:
        study = run_study(prepared, config, checkpoint_dir, bool(params.resume_dir), lambda record: on_epoch(record["epoch"], record))
    finally:
        logger.close()
    for fit in study.fits:
        refs.log_fit(fit)
    model, metrics = study.by_sample.model, study.metrics
    log_figure(plots.plot_training_curves(study.by_sample.history), "plots/training_curves.png")
    log_csv(study.by_sample.scores.predictions(), "evaluation/predictions_test.csv")
    mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    metrics[TUNING.objective.metric] = metrics["best_val_rel_error_mean"]  # the tuning objective, returned only
    log_json({"params": asdict(params), "train_config": asdict(config), "meta": model.meta}, "training_config.json")
    log_text(report.report_markdown(metrics, params.results_dir, len(prepared.table), prepared.split, params.num_epochs,
                                    PROMOTION.metric), "report.md")
    if params.register or epoch_hook is None:  # a tuning trial logs no model
        version = log_latency_estimator(model, prepared.split.test, params.output_tokens,
                                        params.model_name if params.register else None, PROMOTION)
        if version is not None:
            metrics["registered_version"] = float(version)
    return metrics


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    version = f"; registered {params.model_name} version {int(metrics['registered_version'])}" if "registered_version" in metrics else ""
    return report.headline(metrics, params.heldout_knob) + version


ENTRY_POINT = EntryPoint("train_estimator", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare, tuning=TUNING, promotion=PROMOTION, check=check)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
