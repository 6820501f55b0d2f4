"""What the controller entry points share: their inputs checked before a run opens, and a trainer's
run body (fit the rule, train, score on the held-out measured runs, log, register).

`train_supervised_controller` and `train_two_stage_controller` differ in their parameter names (each
keeps its seed's) and in the heads trained; `evaluate_controller` reuses the measured-table half.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlflow
import numpy as np
import pandas as pd

from core.control.data import load_controller_data, read_manifest
from core.control.decision import ControllerError, check_space, describe_rule
from core.control.evaluation import (
    Evaluation,
    MeasuredSetup,
    controller_decisions,
    evaluate_methods,
    measured_setup,
    table_features,
    yardstick_decisions,
)
from core.control.grpo import BEST_FILE, LAST_FILE, GRPOConfig, train_grpo
from core.control.grpo import TRAINING_RECORD_KEYS as GRPO_TRAINING_KEYS
from core.control.grpo import VALIDATION_RECORD_KEYS as GRPO_VALIDATION_KEYS
from core.control.live import LiveRollouts
from core.control.measured import check_measured_table
from core.control.policies import ControllerNet
from core.control.policies import knob_options
from core.control.supervised import (
    TRAINING_RECORD_KEYS,
    VALIDATION_RECORD_KEYS,
    TrainedController,
    TrainingConfig,
    controller_arrays,
    fit_rule,
    split_samples,
    train_controller,
)
from core.latency.data import load_profile_table
from core.latency.estimator import LatencyEstimator
from core.vlm.backend import StagedVLM
from core.vqa import sources
from tracking.artifacts import frame_digest, log_csv, log_json
from tracking.controller_models import TensorBoardWriter, log_budget_controller
from tracking.entry_point import EpochHook
from tracking.epoch_logging import EpochLogger, epoch_callback
from tracking.estimator_refs import resolve_estimator
from tracking.model_refs import VLMReference
from tracking.registry import Promotion
from tracking.run_context import note_checkpoint, set_data_digest


@dataclass
class MeasuredInputs:
    """The measured table made ready, the VLM (its reference and the loaded backend) and the features of
    the table's samples (read from `data_root` when the table answered the real benchmarks)."""

    setup: MeasuredSetup
    backend: StagedVLM
    vlm: VLMReference
    data_root: str
    features: pd.DataFrame


def measured_inputs(measured_table: str, vlm: VLMReference, calibration_seed: int, budget_fractions: Sequence[float],
                    dataset_names: Sequence[str] | None = None, controller_options: dict | None = None,
                    data_root: str = "") -> MeasuredInputs:
    """Load and check the measured table (optionally some data sets; with `controller_options`, its knob
    options against a trained controller's), load the VLM and compute the features of the table's
    samples: every input error is one line here, before a run opens."""
    sources.check_data_root(data_root)
    table = load_profile_table(measured_table, list(dataset_names) if dataset_names else None)
    if controller_options is not None:
        check_measured_table(table, str(measured_table))
        check_space(controller_options, table, str(measured_table))
    backend = vlm.load()
    setup = measured_setup(table, str(measured_table), backend.space, calibration_seed, budget_fractions)
    features = table_features(backend, table, str(measured_table), data_root)
    return MeasuredInputs(setup, backend, vlm, data_root, features)


@dataclass
class TrainingInputs:
    samples: pd.DataFrame
    grid: pd.DataFrame
    estimator: LatencyEstimator
    measured: MeasuredInputs


def training_inputs(data_dir: str, vlm: VLMReference, estimator_ref: str, measured_table: str, calibration_seed: int,
                    budget_fractions: Sequence[float], dataset_names: Sequence[str] | None = None,
                    data_root: str = "") -> TrainingInputs:
    """The controller data (optionally some data sets), the estimator and the measured inputs, all checked;
    the controller data must come from the same backend as `vlm` (its features are that model's)."""
    samples, grid = load_controller_data(data_dir)
    built_with = read_manifest(data_dir)["build"].get("backend", "base_vlm")
    if built_with != vlm.backend:
        raise ControllerError(f"controller data {data_dir} was built with backend={built_with}, this run has "
                              f"backend={vlm.backend}: pass the same backend (and model_path) it was built with")
    if dataset_names:
        unknown = sorted(set(dataset_names) - set(samples["dataset"]))
        if unknown:
            raise ControllerError(f"parameter dataset_names: {unknown[0]} is not in the controller data "
                                  f"(has {sorted(samples['dataset'].unique())})")
        samples = samples[samples["dataset"].isin(dataset_names)].reset_index(drop=True)
        grid = grid[grid["dataset"].isin(dataset_names)].reset_index(drop=True)
    estimator = resolve_estimator(estimator_ref).estimator
    measured = measured_inputs(measured_table, vlm, calibration_seed, budget_fractions, dataset_names, data_root=data_root)
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


def _fit(inputs: TrainingInputs, train_split: float, seed: int, latency_quantile: float, use_global_view: bool):
    """Log the inputs; fit the rule on the training samples and the calibration part; the arrays."""
    setup, space = inputs.measured.setup, inputs.measured.backend.space
    options = knob_options(space)
    set_data_digest(frame_digest(inputs.grid))
    mlflow.log_params({**setup.as_params(), "controller_data_samples": len(inputs.samples)})
    train_rows, _ = split_samples(inputs.samples["sample_id"].astype(str).tolist(), train_split, seed)
    rule = fit_rule(inputs.samples, inputs.grid, train_rows, inputs.measured.features, setup.split.calibration,
                    inputs.estimator, options, latency_quantile)
    arrays = controller_arrays(inputs.samples, inputs.grid, inputs.estimator, rule, options, use_global_view)
    return options, rule, arrays


def _train_logged(train: Callable[[Callable[[int, dict], None]], TrainedController], record_keys: tuple[tuple, tuple],
                  output_dir: str, tensorboard: bool, epoch_hook: EpochHook | None) -> tuple[TrainedController, str | None]:
    """Run `train(on_epoch)` with per-epoch metrics, history CSVs and (optionally) TensorBoard events."""
    logger = EpochLogger(*record_keys)
    callbacks = [epoch_callback(logger, epoch_hook)]
    writer = TensorBoardWriter(run_directory(output_dir) / "tensorboard") if tensorboard else None
    if writer is not None:
        callbacks.append(writer)
    try:
        trained = train(lambda epoch, record: [c(epoch, record) for c in callbacks])
    finally:
        logger.close()
        if writer is not None:
            writer.close()
    return trained, (str(writer.log_dir) if writer is not None else None)


def run_directory(output_dir: str) -> Path:
    """<output_dir>/<active run id>/: the controller, checkpoints, TensorBoard events."""
    return Path(output_dir) / mlflow.active_run().info.run_id


def _finish(trained: TrainedController, inputs: TrainingInputs, config: dict, extra_params: dict, output_dir: str,
            tensorboard_dir: str | None, model_name: str | None, promotion: Promotion) -> dict[str, Any]:
    """Log the rule and the split, score on the held-out runs, save, log and register the controller."""
    controller = trained.controller
    mlflow.log_params({**describe_rule(controller), **extra_params, "best_epoch": trained.best_epoch})
    log_json({"train": trained.train_ids, "val": trained.val_ids}, "split/controller_data_split.json")
    log_json(config, "training_config.json")
    evaluation = score_controller(controller, inputs.measured, with_yardsticks=False)
    metrics = {k: v for k, v in evaluation.metrics.items() if math.isfinite(v)}
    mlflow.log_metrics(metrics)
    log_csv(evaluation.rows, "evaluation/decisions.csv")
    controller.save(run_directory(output_dir) / "controller")
    version = log_budget_controller(controller, inputs.measured.features, inputs.measured.vlm, model_name, promotion)
    out: dict[str, Any] = {**metrics, "best_epoch": trained.best_epoch, "latency_factor": controller.latency_factor}
    if tensorboard_dir is not None:
        out["tensorboard_dir"] = tensorboard_dir
    if version is not None:
        out["registered_version"] = float(version)
    return out


def train_and_register(inputs: TrainingInputs, config: TrainingConfig, latency_quantile: float, output_dir: str,
                       tensorboard: bool, model_name: str | None, promotion: Promotion,
                       epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    """The supervised trainers' run body: rule, training (per-epoch metrics, history CSVs, TensorBoard),
    held-out scores, the controller logged and registered. The final metrics (with registered_version)."""
    options, rule, arrays = _fit(inputs, config.train_split, config.seed, latency_quantile, config.use_global_view)
    space, l_full = inputs.measured.backend.space, inputs.measured.setup.l_full
    trained, tensorboard_dir = _train_logged(
        lambda on_epoch: train_controller(arrays, rule, inputs.estimator, options, space.name, l_full, config, on_epoch),
        (TRAINING_RECORD_KEYS, VALIDATION_RECORD_KEYS), output_dir, tensorboard, epoch_hook)
    return _finish(trained, inputs, asdict(config), {"calibration_runs": rule.calibration_runs}, output_dir,
                   tensorboard_dir, model_name, promotion)


def train_grpo_and_register(inputs: TrainingInputs, config: GRPOConfig, latency_quantile: float, output_dir: str,
                            tensorboard: bool, model_name: str | None, promotion: Promotion, reward_source: str,
                            stage1: ControllerNet | None = None, resume_dir: str = "",
                            epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    """The GRPO trainers' run body: as `train_and_register`, with rollouts from `reward_source` (replay:
    the grid and the estimator times the calibration runs' spread; live: the base VLM answers), best.pt,
    last.pt and epoch checkpoints under <output_dir>/<run id>/checkpoints, `resume_dir` continued."""
    options, rule, arrays = _fit(inputs, config.train_split, config.seed, latency_quantile, config.use_global_view)
    setup, space = inputs.measured.setup, inputs.measured.backend.space
    noise = rule.median_ratios
    mlflow.log_params({"reward_source": reward_source, "replay_noise_runs": len(noise),
                       "replay_noise_p50": round(float(np.median(noise)), 6),
                       "replay_noise_p97": round(float(np.quantile(noise, 0.97)), 6)})
    source = None
    if reward_source == "live":
        backend, data_root = inputs.measured.backend, inputs.measured.data_root
        source = lambda train: LiveRollouts(backend, train.sample_ids, options, data_root)  # noqa: E731
    checkpoints = run_directory(output_dir) / "checkpoints"
    note_checkpoint(checkpoints, f"rerun with -P resume_dir={checkpoints} to resume")
    trained, tensorboard_dir = _train_logged(
        lambda on_epoch: train_grpo(arrays, rule, inputs.estimator, options, space.name, setup.l_full, noise, config,
                                    source, stage1, on_epoch, checkpoints, Path(resume_dir) if resume_dir else None),
        (GRPO_TRAINING_KEYS, GRPO_VALIDATION_KEYS), output_dir, tensorboard, epoch_hook)
    for name in (BEST_FILE, LAST_FILE):
        if (checkpoints / name).is_file():
            mlflow.log_artifact(str(checkpoints / name), "checkpoints")
    out = _finish(trained, inputs, config.as_dict(), {"calibration_runs": rule.calibration_runs}, output_dir,
                  tensorboard_dir, model_name, promotion)
    best = next((r for r in trained.history if r["epoch"] == trained.best_epoch), None)
    if best is not None:  # the kept weights' validation reward: what `tune` maximises
        out["val_reward_mean"] = best["val_reward_mean"]
    return out


def headline(kind: str, metrics: dict[str, Any], model_name: str) -> str:
    """One line: the held-out accuracy AUC and min adherence, the version registered."""
    version = f"; registered {model_name} version {int(metrics['registered_version'])}" if "registered_version" in metrics else ""
    return (f"{kind} controller: held-out test_accuracy_auc={metrics.get('test_accuracy_auc', float('nan')):.4f}, "
            f"test_adherence_min={metrics.get('test_adherence_min', float('nan')):.4f} "
            f"(latency factor {metrics['latency_factor']:.4f}, best epoch {metrics['best_epoch']}){version}")
