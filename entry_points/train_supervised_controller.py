"""Entry point `train_supervised_controller` (Experiment 2): the three-head controller trained by
cross-entropy on the best config under each sampled budget per training sample, its decisions checked
against the calibrated upper-quantile latency, scored on the held-out measured runs, registered as
`budget-controller` (controller_kind=supervised)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from core.control.budgets import check_fractions
from core.control.decision import LATENCY_QUANTILE
from core.control.supervised import TrainingConfig
from tracking.cli import config_from_params, number_list
from tracking.controller_models import MODEL_NAME
from tracking.controller_runs import TrainingInputs, headline, train_and_register, training_inputs
from tracking.model_refs import VLMReference
from tracking.entry_point import EntryPoint, EpochHook
from tracking.registry import Promotion
from tracking.store import ADAPTIVE_VLM_STUDY

PROMOTION = Promotion(MODEL_NAME, metric="test_accuracy_auc", mode="max")
_D = TrainingConfig()


@dataclass
class Params:
    """Train the supervised budget controller on the controller data."""

    profiling_results: str = "outputs/controller_data"  # the controller data directory (build_controller_data)
    output_dir: str = "outputs/controllers"  # <output_dir>/<run id>/: the controller, TensorBoard events
    batch_size: int = _D.batch_size
    num_epochs: int = _D.num_epochs
    lr: float = _D.lr  # Adam's learning rate
    train_split: float = _D.train_split  # share of the controller data's samples for training; the rest validates
    device: str = _D.device  # torch device of the training
    seed: int = _D.seed  # of the train/val split, the budgets drawn and the initial weights
    use_global_view: bool = _D.use_global_view  # feed the pooled global view (false: question + budget only)
    label_prior_weight: float = _D.label_prior_weight  # weight of the data set's mean accuracy in the labels (0: the sample's own)
    label_violation_target: float = _D.label_violation_target  # expected violation share the labels may spend where it buys accuracy (0: none)
    budgets_per_sample: int = _D.budgets_per_sample  # budgets f ~ U[0.4, 1.1] drawn per sample and epoch
    hidden_width: int = _D.hidden_width
    estimator: str = "models:/latency-estimator@champion"  # a models:/ URI, train_estimator run id or checkpoint file
    measured_table: str = "data/profiles/cpu-base-vlm"  # measured test-split profile: calibration + held-out scores
    model_path: str = "data/base_vlm"  # base_vlm: directory or models:/ URI; molmoe_arch: a MolmoE-1B release directory
    backend: str = "base_vlm"  # the VLM whose features the controller reads: base_vlm | molmoe_arch (the controller data's)
    data_root: str = ""  # the real benchmarks' files the measured table answered; '' = the synthetic suite
    vlm_device: str = "cpu"  # where the VLM computes the measured samples' features (cuda for MolmoE-1B)
    calibration_seed: int = 0  # of the measured table's 70/30 calibration/held-out split
    latency_quantile: float = LATENCY_QUANTILE  # the fit check: calibration runs' quantile of measured / predicted T_total
    budget_fractions: str = ""  # extra budget fractions to score, comma-separated (0.5 ... 1.0 always)
    tensorboard: bool = False  # write TensorBoard events under <output_dir>/<run id>/tensorboard
    register: bool = True  # register the model as model_name
    model_name: str = PROMOTION.model_name


def training_config(params: Params) -> TrainingConfig:
    return config_from_params(TrainingConfig, params, stage="supervised")


def check(params: Params) -> None:
    training_config(params).validate()
    if extra := number_list(params.budget_fractions, "budget_fractions"):
        check_fractions(extra)


def prepare(params: Params) -> TrainingInputs:
    vlm = VLMReference(params.backend, params.model_path, device=params.vlm_device)
    return training_inputs(params.profiling_results, vlm, params.estimator, params.measured_table,
                           params.calibration_seed, number_list(params.budget_fractions, "budget_fractions"),
                           data_root=params.data_root)


def execute(params: Params, prepared: TrainingInputs, epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    return train_and_register(prepared, training_config(params), params.latency_quantile, params.output_dir,
                              params.tensorboard, params.model_name if params.register else None, PROMOTION, epoch_hook)


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    return headline("supervised", dict(metrics), params.model_name)


ENTRY_POINT = EntryPoint("train_supervised_controller", Params, study=ADAPTIVE_VLM_STUDY, execute=execute,
                         summary=summary, prepare=prepare, promotion=PROMOTION, check=check)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
