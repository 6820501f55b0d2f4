"""Entry point `visualize_estimator`: the estimator's figures as MLflow artifacts: predicted vs true,
error distributions, errors by tier / top_k / blocks, training curves, and `summary.json`."""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

import mlflow

from core.latency import plots
from core.latency.evaluation import evaluate
from tracking.artifacts import frame_digest, log_figure, log_json
from tracking.entry_point import EntryPoint
from tracking.estimator_refs import EstimatorEvaluationParams, EvaluationTarget, prepare_evaluation
from tracking.run_context import set_data_digest
from tracking.store import ADAPTIVE_VLM_STUDY

Params = EstimatorEvaluationParams  # the same parameters as evaluate_estimator
FIGURES = (("pred_vs_true", plots.plot_pred_vs_true), ("error_distribution", plots.plot_error_distribution),
           ("errors_by_knob", plots.plot_errors_by_knob))


def execute(params: Params, prepared: EvaluationTarget) -> dict[str, Any]:
    """Plot every evaluation set and the training curves; log them and `summary.json`."""
    set_data_digest(frame_digest(prepared.table))
    mlflow.set_tags({"visualized_model": params.model, "estimator_run_id": prepared.resolved.run_id or ""})
    record, figures = prepared.record(params), []
    for prefix, (estimator, rows) in prepared.sets.items():
        name, scores = prefix.rstrip("_"), evaluate(estimator, rows, prefix)
        title = f"{name} ({scores.truth['sample_id'].nunique()} samples, {len(scores.truth)} sample x config medians)"
        for figure_name, plot in FIGURES:
            figures.append(f"plots/{figure_name}_{name}.png")
            log_figure(plot(scores.truth, scores.pred, title=title), figures[-1])
        record["sets"][name] = {k[len(prefix):]: (v if math.isfinite(v) else None) for k, v in scores.metrics.items()}
    history = prepared.resolved.history
    if history:
        figures.append("plots/training_curves.png")
        log_figure(plots.plot_training_curves(history), figures[-1])
        best = [r for r in history if r.get("is_best")]
        record["training"] = {"epochs": len(history), "best_epoch": best[-1]["epoch"] if best else None,
                              "best_val_loss": best[-1]["val_loss"] if best else None}
    else:
        record["training"] = "no history: the model does not come from a train_estimator run"
    record["figures"] = figures
    log_json(record, "summary.json")
    return {"figures": figures}


def summary(params: Params, outcome: Mapping[str, Any]) -> str:
    return f"{params.model}: {len(outcome['figures'])} figures and summary.json"


ENTRY_POINT = EntryPoint("visualize_estimator", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare_evaluation)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
