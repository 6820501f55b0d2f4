"""Entry point `evaluate_estimator`: score a latency estimator on rows it never trained on: MAE,
RMSE, MAPE, R² and share within ±10% per component, a per-config table, and a JSON of it all."""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

import mlflow

from core.latency.evaluation import evaluate
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_json
from tracking.entry_point import EntryPoint
from tracking.estimator_refs import EstimatorEvaluationParams, EvaluationTarget, per_config_artifact, prepare_evaluation
from tracking.run_context import set_data_digest
from tracking.store import ADAPTIVE_VLM_STUDY

Params = EstimatorEvaluationParams  # the same parameters as visualize_estimator
HEADLINE = ("mape_prefill", "mape_decode", "r2_prefill", "r2_decode", "within10_prefill", "within10_decode")


def execute(params: Params, prepared: EvaluationTarget) -> dict[str, float]:
    """Score every evaluation set; log the metrics, per-config and prediction CSVs and `evaluation/estimator_evaluation.json`."""
    set_data_digest(frame_digest(prepared.table))
    mlflow.set_tags({"evaluated_model": params.model, "estimator_run_id": prepared.resolved.run_id or ""})
    metrics: dict[str, float] = {}
    record = prepared.record(params)
    for prefix, (estimator, rows) in prepared.sets.items():
        log_dataset_input(rows, name=f"profile-{prefix.rstrip('_')}", context="test", source=params.results_dir)
        scores = evaluate(estimator, rows, prefix)
        metrics.update(scores.metrics)
        per_config = scores.per_config()
        log_csv(per_config, per_config_artifact(prefix))
        # Truth and prediction per (sample, config), as train_estimator logs them: another tool can be scored on it.
        log_csv(scores.predictions(), f"evaluation/predictions_{prefix.rstrip('_')}.csv")
        record["sets"][prefix.rstrip("_")] = {
            "rows": len(rows), "samples": int(rows["sample_id"].nunique()),
            "metrics": {k[len(prefix):]: v for k, v in scores.metrics.items()},
            "per_config": per_config.to_dict(orient="records"),
        }
    mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    log_json(record, "evaluation/estimator_evaluation.json")
    return metrics


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    prefixes = ("test_", "heldout_config_")
    return f"{params.model}: " + ", ".join(f"{p}{m}={metrics[p + m]:.4g}" for p in prefixes for m in HEADLINE if p + m in metrics)


ENTRY_POINT = EntryPoint("evaluate_estimator", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare_evaluation)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
