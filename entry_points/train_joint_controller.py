"""Entry point `train_joint_controller` (the joint guide): both stages of the two-stage controller
trained together by GRPO, a config's log-prob log p(tier) + log p(top_k | tier) + log p(blocks | tier),
stage 1 at lr x stage1_lr_ratio, optionally starting from a trained stage 1. Scored on the held-out
measured runs, registered as `budget-controller` (controller_kind=joint)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from entry_points.grpo_common import (
    PROMOTION, TUNING, GRPOParams, check_grpo, grpo_config, grpo_headline, grpo_inputs, run_grpo, stage1_net,
)
from core.control.grpo import GRPOConfig
from tracking.controller_runs import TrainingInputs
from tracking.entry_point import EntryPoint, EpochHook
from tracking.store import ADAPTIVE_VLM_STUDY

_G = GRPOConfig()


@dataclass
class Params(GRPOParams):
    """Train both stages of the two-stage budget controller together by GRPO on the controller data."""

    results_dir: str = "outputs/controller_data"  # the controller data directory (build_controller_data)
    batch_size: int = 8  # (sample, budget) rows per update (the joint guide's)
    num_epochs: int = _G.num_epochs
    stage1_lr_ratio: float = _G.stage1_lr_ratio  # stage 1's learning rate over stage 2's
    load_stage1_checkpoint: str = ""  # a stage-1 controller (run id, models:/ URI or directory) to start from; '' = fresh


@dataclass
class Prepared:
    inputs: TrainingInputs
    stage1: Any


def training_config(params: Params) -> GRPOConfig:
    return grpo_config(params, "joint", params.batch_size, params.num_epochs, stage1_lr_ratio=params.stage1_lr_ratio)


def check(params: Params) -> None:
    check_grpo(params, training_config(params))


def prepare(params: Params) -> Prepared:
    inputs = grpo_inputs(params, params.results_dir)
    stage1 = stage1_net(params.load_stage1_checkpoint, "load_stage1_checkpoint") if params.load_stage1_checkpoint else None
    return Prepared(inputs, stage1)


def execute(params: Params, prepared: Prepared, epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    return run_grpo(params, prepared.inputs, training_config(params), prepared.stage1, epoch_hook)


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    return grpo_headline("joint two-stage", metrics, params.model_name)


ENTRY_POINT = EntryPoint("train_joint_controller", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare, tuning=TUNING, promotion=PROMOTION, check=check)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
