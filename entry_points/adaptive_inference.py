"""Entry point `adaptive_inference` (Experiment 8): the promoted base VLM, budget controller and
latency estimator answer live requests under a latency budget, with a guardrail and online
calibration (core.adaptive); the same requests answered by the static full config and the lookup
table in the same run; optionally a contention experiment with calibration on and off; the three
models logged behind one served pyfunc (`adaptive-vlm`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow
import torch

from core.adaptive import report
from core.adaptive.experiment import (CalibrationSettings, ExperimentSettings, RequestPlan, plan_requests, replay_report,
                                     run_experiment)
from core.control.decision import describe_rule
from core.profiling.store import ProfileStore
from core.vqa import sources
from core.vqa.suite import SPLITS
from tracking.adaptive_model import ResolvedModels, log_request_plan, log_run_results, log_served_model, resolve_models
from tracking.cli import ParameterError, comma_list, number_list
from tracking.controller_models import MODEL_NAME as CONTROLLER_MODEL
from tracking.model_refs import VLMReference
from tracking.entry_point import EntryPoint
from tracking.store import ADAPTIVE_VLM_STUDY


@dataclass
class Params:
    """Answer live requests adaptively under a latency budget with the promoted models."""

    model_path: str = "models:/base-vlm@champion"  # base_vlm: registry URI or checkpoint directory; molmoe_arch: a MolmoE-1B release directory
    backend: str = "base_vlm"  # base_vlm | molmoe_arch (the backend the controller was trained on)
    engine: str = "eager"  # molmoe_arch: eager | graph | fused (CUDA-graph replay; graph and fused need device=cuda)
    data_root: str = ""  # the real benchmarks' files (the measured table's requests); '' = the synthetic suite
    controller_path: str = f"models:/{CONTROLLER_MODEL}@champion"  # models:/ URI, trainer run id or directory
    estimator: str = "models:/latency-estimator@champion"  # the guardrail's estimator; '' = the controller's own
    dataset: str = ""  # comma-separated data sets: the suite's, or with data_root the real ones ('' = all)
    split: str = "test"
    request_source: str = "heldout"  # heldout: measured_table's held-out samples (evaluate_controller's) | split: the suite split's first samples
    num_samples: int = 30  # requests per data set (heldout: at most the table's held-out samples of each)
    latency_budget: float = 0.0  # ms; > 0 replaces budget_fraction
    budget_fraction: str = "0.6,0.8,1.0"  # budgets as fractions of the full config's latency measured in this run
    device: str = "cpu"
    guardrail: bool = True
    calibration_window: int = 50  # requests per stage in the running quantile
    calibration_quantile: float = 0.99  # per stage; 0.99 of a window of 50 is about its second largest ratio
    calibration_method: str = "quantile"  # quantile | ewma
    warmup: int = 5  # unscored full-config warm-up requests before L_full is measured on the requests themselves
    compare: bool = True  # also answer with the static full config and the lookup table
    measured_table: str = "data/profiles/cpu-base-vlm"  # the lookup table (its calibration part) and the held-out requests
    calibration_seed: int = 0  # the measured table's calibration / held-out split, as evaluate_controller's
    contention: bool = False  # on: a background load mid-run, calibration on and off
    contention_fraction: float = 0.8
    contention_workers: int = 2  # background processes of the load
    contention_duty: float = ExperimentSettings.contention_duty  # share of each 20 ms a worker spins (1: always)
    importance: str = ""  # an importance run id or JSON file; '' = the checkpoint's drop order
    seed: int = 0  # request order
    num_threads: int = 1  # torch intra-op threads
    register_model: bool = True  # log the served pyfunc; registered as adaptive-vlm@champion when all three refs are models:/ URIs (or the VLM a release)


@dataclass
class Prepared:
    models: ResolvedModels
    plan: RequestPlan
    settings: ExperimentSettings


def check(params: Params) -> None:
    if params.split not in SPLITS:
        raise ParameterError(f"parameter split must be one of {list(SPLITS)}, got {params.split!r}")
    if params.num_threads < 1:
        raise ParameterError(f"parameter num_threads must be >= 1, got {params.num_threads}")
    comma_list(params.dataset, "dataset", sources.dataset_choices(params.data_root))


def prepare(params: Params) -> Prepared:
    check(params)
    settings = ExperimentSettings(
        number_list(params.budget_fraction, "budget_fraction"), params.latency_budget, params.warmup, params.guardrail,
        CalibrationSettings(params.calibration_window, params.calibration_quantile, params.calibration_method),
        params.compare, params.contention, params.contention_fraction, params.contention_workers, params.contention_duty)
    models = resolve_models(VLMReference(params.backend, params.model_path, params.engine, params.device),
                            params.controller_path, params.estimator, params.importance)
    table = ProfileStore(params.measured_table).load() if params.compare or params.request_source == "heldout" else None
    choices = sources.dataset_choices(params.data_root)
    plan = plan_requests(params.request_source, table, params.measured_table, models.backend.space, params.calibration_seed,
                         comma_list(params.dataset, "dataset", choices), choices, params.split, params.num_samples,
                         params.warmup, params.seed, settings, params.data_root)
    return Prepared(models, plan, settings)


def execute(params: Params, prepared: Prepared, epoch_hook: None = None) -> dict[str, float]:
    torch.set_num_threads(params.num_threads)
    plan, models = prepared.plan, prepared.models
    log_request_plan(plan, params.split, params.data_root, {"data_root": params.data_root, "order_seed": str(params.seed),
                     "request_source": params.request_source, "measured_table": params.measured_table})
    mlflow.log_params({f"resolved_{k}_version": v or "path" for k, v in models.versions.items()})
    mlflow.log_params({f"controller_{k}": v for k, v in describe_rule(models.controller).items()})

    def on_load(event: str, pids: list[int]) -> None:
        mlflow.set_tag(f"contention_{event}_pids", ",".join(map(str, pids)))

    rows, l_full = run_experiment(models.backend, models.controller, models.estimator, plan.requests, plan.warmup,
                                  prepared.settings, plan.lookup, on_load)
    metrics = {"l_full_ms_measured": l_full, **report.budget_metrics(rows), **report.contention_metrics(rows)}
    decisions = None
    if plan.heldout is not None and params.latency_budget == 0:  # evaluate_controller's replay of the same requests
        replay, decisions = replay_report(models.controller, models.backend, plan.heldout, rows, prepared.settings.fractions)
        metrics.update(replay)
    log_run_results(rows, metrics, plan.lookup, decisions)
    if params.register_model:
        log_served_model(models, plan.requests[0], l_full)
    return metrics


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    return report.headline(dict(metrics))


ENTRY_POINT = EntryPoint("adaptive_inference", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare, check=check)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
