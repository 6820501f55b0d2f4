"""Entry point `train_grpo_controller` (Experiment 5): one policy picks all three knobs per request,
trained end to end by GRPO (core.control.grpo) on rollouts under budgets f ~ U[0.4, 1.1], decisions
checked against the calibrated upper-quantile latency, scored on the held-out measured runs,
registered as `budget-controller` (controller_kind=grpo)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from core.control.grpo import GRPOConfig
from entry_points.grpo_common import PROMOTION, TUNING, GRPOParams, check_grpo, grpo_config, grpo_headline, grpo_inputs, run_grpo
from tracking.controller_runs import TrainingInputs
from tracking.entry_point import EntryPoint, EpochHook
from tracking.store import ADAPTIVE_VLM_STUDY

_G = GRPOConfig()


@dataclass
class Params(GRPOParams):
    """Train the end-to-end GRPO budget controller (all three knobs from one policy) on the controller data."""

    profiling_results: str = "outputs/controller_data"  # the controller data directory (build_controller_data)
    batch_size: int = _G.batch_size  # (sample, budget) rows per update
    num_epochs: int = _G.num_epochs


def training_config(params: Params) -> GRPOConfig:
    return grpo_config(params, "end_to_end", params.batch_size, params.num_epochs)


def check(params: Params) -> None:
    check_grpo(params, training_config(params))


def prepare(params: Params) -> TrainingInputs:
    return grpo_inputs(params, params.profiling_results)


def execute(params: Params, prepared: TrainingInputs, epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    return run_grpo(params, prepared, training_config(params), None, epoch_hook)


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    return grpo_headline("end-to-end", metrics, params.model_name)


ENTRY_POINT = EntryPoint("train_grpo_controller", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare, tuning=TUNING, promotion=PROMOTION, check=check)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
