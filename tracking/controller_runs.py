"""What the controller entry points share: their inputs checked before a run opens, and a trainer's
run body (fit the rule, train, score on the held-out measured runs, log, register).

`train_supervised_controller` and `train_two_stage_controller` differ in their parameter names (each
keeps its seed's) and in the heads trained; `evaluate_controller` reuses the measured-table half.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import mlflow
import pandas as pd

from core.control.data import load_controller_data
from core.control.decision import ControllerError, check_space, describe_rule
from core.control.evaluation import (
    Evaluation,
    MeasuredSetup,
    controller_decisions,
    evaluate_methods,
    measured_setup,
    suite_features,
    yardstick_decisions,
)
from core.control.measured import check_measured_table
from core.control.policies import knob_options
from core.control.supervised import (
    TRAINING_RECORD_KEYS,
    VALIDATION_RECORD_KEYS,
    TrainingConfig,
    controller_arrays,
    fit_rule,
    split_samples,
    train_controller,
)
from core.latency.data import load_profile_table
from core.latency.estimator import LatencyEstimator
from core.vlm.base_vlm import BaseVLMBackend
from tracking.artifacts import frame_digest, log_csv, log_json
from tracking.controller_models import TensorBoardWriter, log_budget_controller
from tracking.entry_point import EpochHook
from tracking.epoch_logging import EpochLogger, epoch_callback
from tracking.estimator_refs import resolve_estimator
from tracking.model_refs import resolve_base_model_dir
from tracking.registry import Promotion
from tracking.run_context import set_data_digest


@dataclass
class MeasuredInputs:
    """The measured table made ready, the base VLM and the features of the table's samples."""

    setup: MeasuredSetup
    backend: BaseVLMBackend
    base_vlm_dir: str
    features: pd.DataFrame


def measured_inputs(measured_table: str, model_path: str, calibration_seed: int, budget_fractions: Sequence[float],
                    dataset_names: Sequence[str] | None = None, controller_options: dict | None = None) -> MeasuredInputs:
    """Load and check the measured table (optionally some data sets; with `controller_options`, its knob
    options against a trained controller's), load the base VLM and compute the features of the table's
    samples: every input error is one line here, before a run opens."""
    table = load_profile_table(measured_table, list(dataset_names) if dataset_names else None)
    if controller_options is not None:
        check_measured_table(table, str(measured_table))
        check_space(controller_options, table, str(measured_table))
    base_vlm_dir = str(resolve_base_model_dir(model_path))
    backend = BaseVLMBackend.from_pretrained(base_vlm_dir)
    setup = measured_setup(table, str(measured_table), backend.space, calibration_seed, budget_fractions)
    return MeasuredInputs(setup, backend, base_vlm_dir, suite_features(backend, table, str(measured_table)))


@dataclass
class TrainingInputs:
    samples: pd.DataFrame
    grid: pd.DataFrame
    estimator: LatencyEstimator
    measured: MeasuredInputs


def training_inputs(data_dir: str, model_path: str, estimator_ref: str, measured_table: str, calibration_seed: int,
                    budget_fractions: Sequence[float], dataset_names: Sequence[str] | None = None) -> TrainingInputs:
    """The controller data (optionally some data sets), the estimator and the measured inputs, all checked."""
    samples, grid = load_controller_data(data_dir)
    if dataset_names:
        unknown = sorted(set(dataset_names) - set(samples["dataset"]))
        if unknown:
            raise ControllerError(f"parameter dataset_names: {unknown[0]} is not in the controller data "
                                  f"(has {sorted(samples['dataset'].unique())})")
        samples = samples[samples["dataset"].isin(dataset_names)].reset_index(drop=True)
        grid = grid[grid["dataset"].isin(dataset_names)].reset_index(drop=True)
    estimator = resolve_estimator(estimator_ref).estimator
    measured = measured_inputs(measured_table, model_path, calibration_seed, budget_fractions, dataset_names)
    check_space(knob_options(measured.backend.space), grid, f"controller data {data_dir}")
    return TrainingInputs(samples, grid, estimator, measured)


def score_controller(controller, measured: MeasuredInputs, with_yardsticks: bool) -> Evaluation:
    """The controller (prefix "") and, with `with_yardsticks`, every yardstick on the held-out runs."""
    setup = measured.setup
    heldout, calibration = setup.split.heldout, setup.split.calibration
    yardsticks = yardstick_decisions(calibration, heldout, setup.l_full, setup.full, setup.fractions)
    methods = {"": controller_decisions(controller, measured.features, heldout, setup.l_full, setup.fractions)}
    if with_yardsticks:
        methods.update(yardsticks)
    return evaluate_methods(methods, heldout, setup.l_full, yardsticks["oracle_"])


def train_and_register(inputs: TrainingInputs, config: TrainingConfig, latency_quantile: float, output_dir: str,
                       tensorboard: bool, model_name: str | None, promotion: Promotion,
                       epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    """The trainer's run body: rule, training (per-epoch metrics, history CSVs, TensorBoard), held-out
    scores, the controller logged and registered. The final metrics (with registered_version)."""
    setup, space = inputs.measured.setup, inputs.measured.backend.space
    options = knob_options(space)
    set_data_digest(frame_digest(inputs.grid))
    mlflow.log_params({**setup.as_params(), "controller_data_samples": len(inputs.samples)})
    train_rows, _ = split_samples(inputs.samples["sample_id"].astype(str).tolist(), config.train_split, config.seed)
    rule = fit_rule(inputs.samples, inputs.grid, train_rows, inputs.measured.features, setup.split.calibration,
                    inputs.estimator, options, latency_quantile)
    arrays = controller_arrays(inputs.samples, inputs.grid, inputs.estimator, rule, options, config.use_global_view)
    logger = EpochLogger(TRAINING_RECORD_KEYS, VALIDATION_RECORD_KEYS)
    callbacks = [epoch_callback(logger, epoch_hook)]
    run_dir = Path(output_dir) / mlflow.active_run().info.run_id
    writer = TensorBoardWriter(run_dir / "tensorboard") if tensorboard else None
    if writer is not None:
        callbacks.append(writer)
    try:
        trained = train_controller(arrays, rule, inputs.estimator, options, space.name, setup.l_full, config,
                                   lambda epoch, record: [c(epoch, record) for c in callbacks])
    finally:
        logger.close()
        if writer is not None:
            writer.close()
    controller = trained.controller
    mlflow.log_params({**describe_rule(controller), "calibration_runs": rule.calibration_runs, "best_epoch": trained.best_epoch})
    log_json({"train": trained.train_ids, "val": trained.val_ids}, "split/controller_data_split.json")
    log_json(asdict(config), "training_config.json")
    evaluation = score_controller(controller, inputs.measured, with_yardsticks=False)
    metrics = {k: v for k, v in evaluation.metrics.items() if math.isfinite(v)}
    mlflow.log_metrics(metrics)
    log_csv(evaluation.rows, "evaluation/decisions.csv")
    controller.save(run_dir / "controller")
    version = log_budget_controller(controller, inputs.measured.features, inputs.measured.base_vlm_dir, model_name, promotion)
    out: dict[str, Any] = {**metrics, "best_epoch": trained.best_epoch, "latency_factor": controller.latency_factor}
    if writer is not None:
        out["tensorboard_dir"] = str(writer.log_dir)
    if version is not None:
        out["registered_version"] = float(version)
    return out


def headline(kind: str, metrics: dict[str, Any], model_name: str) -> str:
    """One line: the held-out accuracy AUC and min adherence, the version registered."""
    version = f"; registered {model_name} version {int(metrics['registered_version'])}" if "registered_version" in metrics else ""
    return (f"{kind} controller: held-out test_accuracy_auc={metrics.get('test_accuracy_auc', float('nan')):.4f}, "
            f"test_adherence_min={metrics.get('test_adherence_min', float('nan')):.4f} "
            f"(latency factor {metrics['latency_factor']:.4f}, best epoch {metrics['best_epoch']}){version}")
