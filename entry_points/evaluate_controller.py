"""Entry point `evaluate_controller`: a registered or run-logged budget controller and every yardstick
(static full config, lookup overall and per data set, per-sample oracle) on the held-out part of a
measured table, in one run: metrics per budget percent and data set, knob distributions, every decision,
accuracy and adherence against the budget."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow

from core.control import plots
from core.control.decision import describe_rule
from core.control.scoring import ADHERENCE_TARGET
from tracking.artifacts import log_csv, log_figure
from tracking.cli import number_list
from tracking.controller_models import MODEL_NAME, resolve_controller
from tracking.controller_runs import MeasuredInputs, measured_inputs, score_controller
from tracking.model_refs import VLMReference
from tracking.entry_point import EntryPoint
from tracking.store import ADAPTIVE_VLM_STUDY


@dataclass
class Params:
    """Score a budget controller and the yardsticks on the held-out measured runs."""

    controller: str = f"models:/{MODEL_NAME}@champion"  # models:/ URI (alias or version), trainer run id or directory
    measured_table: str = "data/profiles/cpu-base-vlm"  # measured test-split profile
    model_path: str = "data/base_vlm"  # base_vlm: directory or models:/ URI; molmoe_arch: a MolmoE-1B release directory
    backend: str = "base_vlm"  # the VLM whose features the controller reads: base_vlm | molmoe_arch (the controller data's)
    data_root: str = ""  # the real benchmarks' files the measured table answered; '' = the synthetic suite
    vlm_device: str = "cpu"  # where the VLM computes the measured samples' features (cuda for MolmoE-1B)
    calibration_seed: int = 0  # of the 70/30 calibration/held-out split (the trainer's, to score unseen samples)
    budget_fractions: str = ""  # extra budget fractions, comma-separated (0.5 ... 1.0 always)


@dataclass
class Prepared:
    controller: Any
    source_run: str | None
    measured: MeasuredInputs


def prepare(params: Params) -> Prepared:
    controller, source_run = resolve_controller(params.controller)
    measured = measured_inputs(params.measured_table, VLMReference(params.backend, params.model_path, device=params.vlm_device),
                               params.calibration_seed, number_list(params.budget_fractions, "budget_fractions"),
                               controller_options=controller.options, data_root=params.data_root)
    return Prepared(controller, source_run, measured)


def execute(params: Params, prepared: Prepared) -> dict[str, float]:
    evaluation = score_controller(prepared.controller, prepared.measured, with_yardsticks=True)
    mlflow.log_params({**prepared.measured.setup.as_params(), **describe_rule(prepared.controller),
                       "controller_run": prepared.source_run or "none"})
    metrics = {k: v for k, v in evaluation.metrics.items() if math.isfinite(v)}
    mlflow.log_metrics(metrics)
    log_csv(evaluation.curves, "evaluation/curves.csv")
    log_csv(evaluation.distribution, "evaluation/knob_distribution.csv")
    log_csv(evaluation.rows, "evaluation/decisions.csv")
    log_figure(plots.plot_vs_budget(evaluation.curves, "accuracy"), "plots/accuracy_vs_budget.png")
    log_figure(plots.plot_vs_budget(evaluation.curves, "adherence", ADHERENCE_TARGET), "plots/adherence_vs_budget.png")
    return evaluation.metrics


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    def figure(prefix: str) -> str:
        return (f"{prefix.rstrip('_') or 'controller'} {metrics.get(prefix + 'test_accuracy_auc', math.nan):.4f}"
                f"/{metrics.get(prefix + 'test_adherence_min', math.nan):.3f}")

    return ("accuracy_auc/adherence_min: " + ", ".join(figure(p) for p in ("", "lookup_dataset_", "lookup_", "static_full_",
                                                                            "oracle_")))


ENTRY_POINT = EntryPoint("evaluate_controller", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
