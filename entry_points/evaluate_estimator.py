"""Entry point `evaluate_estimator`: score a latency estimator on rows it never trained on: MAE,
RMSE, MAPE, R² and share within ±10% per component, a per-config table, and a JSON of it all."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import mlflow

from core.latency.estimator import evaluate_predictor, load_profile_table, predict_groups
from core.latency.metrics import feature_floor, per_config_table
from entry_points.train_estimator import dataset_list
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_json
from tracking.cli import exit_on_input_error, parse_params, params_as_dict
from tracking.estimator_refs import SPLIT_MODES, EstimatorReferenceError, evaluation_sets, resolve_estimator
from tracking.run_context import entry_point_run, set_data_digest
from tracking.store import configure_tracking

HEADLINE = ("mape_prefill", "mape_decode", "r2_prefill", "r2_decode", "within10_prefill", "within10_decode")


@dataclass
class Params:
    """Evaluate a latency estimator on held-out rows of a profiling table."""

    model: str = "models:/latency-estimator@champion"  # or a train_estimator run id, runs:/ URI, checkpoint file
    results_dir: str = "data/profiles/h200-molmoe-arch-graph"
    dataset_names: str = ""  # comma-separated; empty = all
    split: str = "recorded"  # recorded: the training run's test samples (+ held-out config); all: every row


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="evaluate_estimator")
    if params.split not in SPLIT_MODES:
        raise EstimatorReferenceError(f"split must be one of {list(SPLIT_MODES)}, got {params.split!r}")
    table = load_profile_table(params.results_dir, dataset_list(params.dataset_names))
    configure_tracking()
    resolved = resolve_estimator(params.model)  # all before a run opens: a typo leaves nothing behind
    sets = evaluation_sets(resolved, table, params.split)
    with entry_point_run("evaluate_estimator", params_as_dict(params)) as run:
        set_data_digest(frame_digest(table))
        mlflow.set_tags({"evaluated_model": params.model, "estimator_run_id": resolved.run_id or ""})
        metrics: dict[str, float] = {}
        report: dict[str, object] = {"model": params.model, "training_run": resolved.run_id, "results_dir": params.results_dir,
                                     "split": params.split, "sets": {}}
        for prefix, (estimator, rows) in sets.items():
            name = prefix.rstrip("_")
            log_dataset_input(rows, name=f"profile-{name}", context="test", source=params.results_dir)
            scores = evaluate_predictor(estimator, rows, prefix)
            truth, pred = predict_groups(estimator, rows)
            scores.update({f"{prefix}{k}": v for k, v in feature_floor(truth).items()})  # the noise floor under test_mape
            metrics.update(scores)
            table_per_config = per_config_table(truth, pred)
            log_csv(table_per_config, f"evaluation/per_config_{name}.csv")
            report["sets"][name] = {  # type: ignore[index]
                "rows": len(rows), "samples": int(rows["sample_id"].nunique()),
                "metrics": {k[len(prefix):]: v for k, v in scores.items()},
                "per_config": table_per_config.to_dict(orient="records"),
            }
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        log_json(report, "evaluation/estimator_evaluation.json")
    lines = [f"{prefix}{m}={metrics[prefix + m]:.4g}" for prefix in sets for m in HEADLINE if prefix + m in metrics]
    print(f"evaluate_estimator {params.model}: " + ", ".join(lines) + f"; run {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
