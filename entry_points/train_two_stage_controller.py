"""Entry point `train_two_stage_controller`. `-P stage=stage1` (Experiment 3): the tier head alone, by
cross-entropy from what is known before the tiles are encoded (question, budget, global view); at
decision time the most likely tier with a fitting config, then within it the fitting config of highest
mean accuracy on the controller data. `-P stage=stage2` (Experiment 4): stage 1 (`stage1_checkpoint`)
frozen picks the tier by that rule; top_k and blocks per tier are trained by GRPO (core.control.grpo),
and replace the prior within the tier. Scored on the held-out measured runs, registered as
`budget-controller` (controller_kind=two_stage)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from core.control.budgets import check_fractions
from core.control.grpo import GRPOConfig
from core.control.supervised import TrainingConfig
from entry_points.grpo_common import (
    PROMOTION, TUNING, GRPOParams, check_grpo, grpo_config, grpo_headline, grpo_inputs, run_grpo, stage1_net,
)
from tracking.cli import ParameterError, comma_list, config_from_params, number_list
from tracking.controller_runs import TrainingInputs, headline, train_and_register
from tracking.entry_point import EntryPoint, EpochHook
from tracking.store import ADAPTIVE_VLM_STUDY

STAGES = ("stage1", "stage2")
STAGE_BATCH_SIZE = {"stage1": TrainingConfig().batch_size, "stage2": 32}  # the seeds' defaults
_D, _G = TrainingConfig(), GRPOConfig()


@dataclass
class Params(GRPOParams):
    """Train stage 1 (the tier, supervised) or stage 2 (top_k and blocks, GRPO) of the two-stage budget controller."""

    results_dir: str = "outputs/controller_data"  # the controller data directory (build_controller_data)
    dataset_names: str = ""  # comma-separated; empty = every data set of the controller data
    stage: str = "stage1"  # stage1 (the tier head, cross-entropy) | stage2 (top_k and blocks per tier, GRPO)
    batch_size: int = 0  # 0 = the stage's default: 64 (stage1), 32 (stage2)
    num_epochs_stage1: int = _D.num_epochs
    num_epochs_stage2: int = _G.num_epochs
    stage1_checkpoint: str = ""  # stage2: the trained stage-1 controller (run id, models:/ URI or directory)
    latency_estimator_path: str = ""  # stage2: the seed's name for the estimator; overrides `estimator` when given
    label_prior_weight: float = _D.label_prior_weight  # stage1: weight of the data set's mean accuracy in the labels
    label_violation_target: float = _D.label_violation_target  # stage1: expected violation share its labels may spend


@dataclass
class Prepared:
    inputs: TrainingInputs
    stage1: Any = None


def batch_size(params: Params) -> int:
    return params.batch_size or STAGE_BATCH_SIZE.get(params.stage, 64)


def training_config(params: Params) -> TrainingConfig:
    return config_from_params(TrainingConfig, params, stage="stage1", num_epochs=params.num_epochs_stage1,
                              batch_size=batch_size(params))


def stage2_config(params: Params) -> GRPOConfig:
    return grpo_config(params, "stage2", batch_size(params), params.num_epochs_stage2)


def check(params: Params) -> None:
    if params.stage not in STAGES:
        raise ParameterError(f"parameter stage must be one of {list(STAGES)}, got {params.stage!r}")
    if params.stage == "stage1":
        training_config(params).validate()
        if extra := number_list(params.budget_fractions, "budget_fractions"):
            check_fractions(extra)
        return
    if not params.stage1_checkpoint:
        raise ParameterError("parameter stage1_checkpoint: stage2 needs the trained stage-1 controller "
                             "(a train_two_stage_controller -P stage=stage1 run id, models:/ URI or directory)")
    check_grpo(params, stage2_config(params))


def prepare(params: Params) -> Prepared:
    datasets = comma_list(params.dataset_names, "dataset_names") or None
    inputs = grpo_inputs(params, params.results_dir, params.latency_estimator_path or None, datasets)
    if params.stage == "stage2":
        return Prepared(inputs, stage1_net(params.stage1_checkpoint, "stage1_checkpoint"))
    return Prepared(inputs)


def execute(params: Params, prepared: Prepared, epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    if params.stage == "stage2":
        return run_grpo(params, prepared.inputs, stage2_config(params), prepared.stage1, epoch_hook)
    return train_and_register(prepared.inputs, training_config(params), params.latency_quantile, params.output_dir,
                              params.tensorboard, params.model_name if params.register else None, PROMOTION, epoch_hook)


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    if params.stage == "stage2":
        return grpo_headline("two-stage (stage 1 + 2)", metrics, params.model_name)
    return headline("two-stage (stage 1)", dict(metrics), params.model_name)


ENTRY_POINT = EntryPoint("train_two_stage_controller", Params, study=ADAPTIVE_VLM_STUDY, execute=execute,
                         summary=summary, prepare=prepare, tuning=TUNING, promotion=PROMOTION, check=check)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
