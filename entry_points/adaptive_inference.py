"""Entry point `adaptive_inference` (Experiment 8): the promoted base VLM, budget controller and
latency estimator answer live requests under a latency budget, with a guardrail and online
calibration (core.adaptive); the same requests answered by the static full config and the lookup
table in the same run; optionally a contention experiment with calibration on and off."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow
import pandas as pd
import torch

from core.adaptive import plots, report
from core.adaptive.calibration import METHODS, OnlineCalibration
from core.adaptive.experiment import CalibrationSettings, ExperimentSettings, run_experiment
from core.control.budgets import check_fractions
from core.control.decision import ControllerError, LearnedController, describe_rule
from core.control.measured import check_measured_table, split_calibration
from core.control.budgets import full_latency_ms
from core.control.policies import knob_options
from core.control.yardsticks import lookup_table
from core.knobs import KnobConfig
from core.latency.estimator import LatencyEstimator
from core.profiling.store import ProfileStore
from core.vlm.base_vlm import BaseVLMBackend
from core.vqa.sample import VQASample, samples_frame
from core.vqa.suite import DATASETS, SPLITS, SPLIT_SIZES, load_split
from tracking.artifacts import log_csv, log_dataset_input, log_figure, log_json
from tracking.cli import ParameterError, comma_list, number_list
from tracking.controller_models import MODEL_NAME as CONTROLLER_MODEL, resolve_controller
from tracking.entry_point import EntryPoint
from tracking.estimator_refs import resolve_estimator
from tracking.model_refs import resolve_base_model_dir, resolve_drop_order
from tracking.registry import resolved_version
from tracking.store import ADAPTIVE_VLM_STUDY

CALIBRATION_FRACTION = 0.7  # the measured table's split, as evaluate_controller's


@dataclass
class Params:
    """Answer live requests adaptively under a latency budget with the promoted models."""

    model_path: str = "models:/base-vlm@champion"  # the base VLM: registry URI or checkpoint directory
    controller_path: str = f"models:/{CONTROLLER_MODEL}@champion"  # models:/ URI, trainer run id or directory
    estimator: str = "models:/latency-estimator@champion"  # the guardrail's estimator; '' = the controller's own
    dataset: str = ""  # comma-separated data sets of the suite ('' = all)
    split: str = "test"
    num_samples: int = 20  # requests per data set
    latency_budget: float = 0.0  # ms; > 0 replaces budget_fraction
    budget_fraction: str = "0.6,0.8,1.0"  # budgets as fractions of the full config's latency measured in this run
    device: str = "cpu"
    guardrail: bool = True
    calibration_window: int = 50  # requests per stage in the running quantile
    calibration_quantile: float = 0.95
    calibration_method: str = "quantile"  # quantile | ewma
    warmup: int = 5  # unscored full-config requests that measure L_full
    compare: bool = True  # also answer with the static full config and the lookup table
    measured_table: str = "data/profiles/cpu-base-vlm"  # the lookup table's measured runs (its calibration part)
    contention: str = "off"  # on: a background load mid-run, calibration on and off
    contention_fraction: float = 0.8
    contention_workers: int = 2
    importance: str = ""  # an importance run id or JSON file; '' = the checkpoint's drop order
    seed: int = 0  # request order
    num_threads: int = 1  # torch intra-op threads


@dataclass
class Prepared:
    backend: BaseVLMBackend
    controller: LearnedController
    estimator: LatencyEstimator
    requests: list[VQASample]
    warmup: list[VQASample]
    settings: ExperimentSettings
    lookup: pd.DataFrame | None
    resolved: dict[str, str]


def _requests(params: Params, datasets: list[str]) -> tuple[list[VQASample], list[VQASample]]:
    per_dataset = params.num_samples + params.warmup
    drawn = {d: load_split(d, params.split, min(per_dataset, SPLIT_SIZES[params.split])) for d in datasets}
    requests = [s for d in datasets for s in drawn[d][: params.num_samples]]
    random.Random(params.seed).shuffle(requests)  # data sets interleaved, the same order in every pass
    warmup = [s for d in datasets for s in drawn[d][params.num_samples:]][: params.warmup]
    return requests, warmup or requests[: params.warmup]


def _lookup(params: Params, backend: BaseVLMBackend, fractions: tuple[float, ...]) -> pd.DataFrame:
    table = check_measured_table(ProfileStore(params.measured_table).load(), params.measured_table)
    calibration = split_calibration(table, CALIBRATION_FRACTION, 0).calibration
    return lookup_table(calibration, full_latency_ms(table, backend.space.full()), fractions)


def prepare(params: Params) -> Prepared:
    for name in ("num_samples", "warmup", "calibration_window", "contention_workers", "num_threads"):
        if getattr(params, name) < 1:
            raise ParameterError(f"parameter {name} must be >= 1, got {getattr(params, name)}")
    if params.split not in SPLITS:
        raise ParameterError(f"parameter split must be one of {list(SPLITS)}, got {params.split!r}")
    if params.num_samples + params.warmup > SPLIT_SIZES[params.split]:
        raise ParameterError(f"parameter num_samples: {params.num_samples} + warmup {params.warmup} exceed the "
                             f"{params.split} split's {SPLIT_SIZES[params.split]} samples")
    if params.latency_budget < 0 or params.latency_budget != params.latency_budget:
        raise ParameterError(f"parameter latency_budget must be a number > 0 (or 0: use budget_fraction), got {params.latency_budget}")
    if params.contention not in ("on", "off"):
        raise ParameterError(f"parameter contention must be on or off, got {params.contention!r}")
    if params.calibration_method not in METHODS:
        raise ParameterError(f"parameter calibration_method must be one of {list(METHODS)}, got {params.calibration_method!r}")
    fractions = check_fractions(number_list(params.budget_fraction, "budget_fraction"), "budget_fraction")
    check_fractions([params.contention_fraction], "contention_fraction")
    OnlineCalibration(1.0, params.calibration_window, params.calibration_quantile, params.calibration_method)
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"parameter device={params.device!r} but no CUDA device is available")
    datasets = comma_list(params.dataset, "dataset", DATASETS) or list(DATASETS)

    resolved = {key: resolved_version(ref) for key, ref in
                (("base_model", params.model_path), ("controller", params.controller_path), ("estimator", params.estimator))}
    backend = BaseVLMBackend.from_pretrained(resolve_base_model_dir(params.model_path), params.device)
    if (order := resolve_drop_order(params.importance, backend.space.num_blocks)) is not None:
        backend.set_drop_order(order)
    controller, _ = resolve_controller(params.controller_path)
    if controller.options != knob_options(backend.space):
        raise ControllerError(f"controller_path={params.controller_path!r}: its knob space {controller.options} is not the "
                              f"base VLM's {knob_options(backend.space)}")
    estimator = resolve_estimator(params.estimator).estimator if params.estimator else controller.estimator
    requests, warmup = _requests(params, datasets)
    settings = ExperimentSettings(
        fractions=fractions, budget_ms=params.latency_budget, warmup=params.warmup, guardrail=params.guardrail,
        calibration=CalibrationSettings(params.calibration_window, params.calibration_quantile, params.calibration_method),
        compare=params.compare, contention=params.contention == "on", contention_fraction=params.contention_fraction,
        contention_workers=params.contention_workers)
    lookup = _lookup(params, backend, fractions) if params.compare and params.latency_budget == 0 else None
    return Prepared(backend, controller, estimator, requests, warmup, settings, lookup, resolved)


def execute(params: Params, prepared: Prepared, epoch_hook: None = None) -> dict[str, float]:
    torch.set_num_threads(params.num_threads)
    log_dataset_input(samples_frame(prepared.requests), f"synthetic-vqa-{params.split}", params.split,
                      {"generator": "core.vqa.suite.load_split", "order_seed": str(params.seed)})
    mlflow.log_params({f"resolved_{k}_version": v or "path" for k, v in prepared.resolved.items()})
    mlflow.set_tags({f"resolved_{k}": v for k, v in prepared.resolved.items() if v})
    mlflow.log_params({f"controller_{k}": v for k, v in describe_rule(prepared.controller).items()})

    lookup = prepared.lookup

    def lookup_config(fraction: float) -> KnobConfig:
        row = lookup.loc[(lookup["fraction"] - fraction).abs().idxmin()]
        return KnobConfig(str(row["tier"]), int(row["top_k"]), int(row["num_active_blocks"]))

    def on_load(event: str, pids: list[int]) -> None:
        mlflow.set_tag(f"contention_{event}_pids", ",".join(map(str, pids)))

    rows, l_full = run_experiment(prepared.backend, prepared.controller, prepared.estimator, prepared.requests,
                                  prepared.warmup, prepared.settings, lookup_config if lookup is not None else None,
                                  on_load)
    metrics = {"l_full_ms_measured": l_full, **report.budget_metrics(rows), **report.contention_metrics(rows)}
    mlflow.log_metrics(metrics)
    log_csv(rows, "adaptive/requests.csv")
    log_csv(report.knob_distribution(rows), "adaptive/knob_distribution.csv")
    if lookup is not None:
        log_csv(lookup, "adaptive/lookup_table.csv")
    log_json(metrics, "adaptive/metrics.json")
    log_figure(plots.plot_latency_over_time(rows), "plots/latency_vs_budget_over_time.png")
    log_figure(plots.plot_calibration_over_time(rows), "plots/calibration_factor_over_time.png")
    return metrics


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    percents = sorted({k.rsplit("_at_", 1)[1] for k in metrics if k.startswith("adaptive_accuracy_at_")})
    parts = [f"{p}%: acc {metrics[f'adaptive_accuracy_at_{p}']:.3f} adh {metrics[f'adaptive_adherence_at_{p}']:.3f}"
             + (f" (full {metrics[f'static_full_accuracy_at_{p}']:.3f}/{metrics[f'static_full_adherence_at_{p}']:.3f})"
                if f"static_full_accuracy_at_{p}" in metrics else "") for p in percents]
    line = (f"adaptive inference, L_full {metrics['l_full_ms_measured']:.1f} ms: " + "; ".join(parts)
            + f"; overhead {metrics.get('adaptive_overhead_ms_mean', float('nan')):.3f} ms/request")
    if "contention_on_adherence_during" in metrics:
        line += (f"\ncontention adherence during load: calibration on {metrics['contention_on_adherence_during']:.3f}, "
                 f"off {metrics['contention_off_adherence_during']:.3f}")
    return line


ENTRY_POINT = EntryPoint("adaptive_inference", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
