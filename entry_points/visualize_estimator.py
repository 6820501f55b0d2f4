"""Entry point `visualize_estimator`: the estimator's figures as MLflow artifacts: predicted vs true,
error distributions, errors by tier / top_k / blocks, training curves, and `summary.json`."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import mlflow

from core.latency import plots as estimator_plots
from core.latency.estimator import evaluate_predictor, load_profile_table, predict_groups
from entry_points.train_estimator import dataset_list
from tracking.artifacts import frame_digest, log_figure, log_json
from tracking.cli import exit_on_input_error, parse_params, params_as_dict
from tracking.estimator_refs import SPLIT_MODES, EstimatorReferenceError, evaluation_sets, resolve_estimator
from tracking.run_context import entry_point_run, set_data_digest
from tracking.store import configure_tracking


@dataclass
class Params:
    """Plot a latency estimator's errors on held-out rows and its training curves."""

    model: str = "models:/latency-estimator@champion"  # or a train_estimator run id, runs:/ URI, checkpoint file
    results_dir: str = "data/profiles/h200-molmoe-arch-graph"
    dataset_names: str = ""
    split: str = "recorded"  # recorded | all (as in evaluate_estimator)


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="visualize_estimator")
    if params.split not in SPLIT_MODES:
        raise EstimatorReferenceError(f"split must be one of {list(SPLIT_MODES)}, got {params.split!r}")
    table = load_profile_table(params.results_dir, dataset_list(params.dataset_names))
    configure_tracking()
    resolved = resolve_estimator(params.model)
    sets = evaluation_sets(resolved, table, params.split)
    figures: list[str] = []
    with entry_point_run("visualize_estimator", params_as_dict(params)) as run:
        set_data_digest(frame_digest(table))
        mlflow.set_tags({"visualized_model": params.model, "estimator_run_id": resolved.run_id or ""})
        summary: dict[str, object] = {"model": params.model, "training_run": resolved.run_id, "results_dir": params.results_dir,
                                      "split": params.split, "sets": {}}
        for prefix, (estimator, rows) in sets.items():
            name = prefix.rstrip("_")
            truth, pred = predict_groups(estimator, rows)
            title = f"{name} ({truth['sample_id'].nunique()} samples, {len(truth)} sample x config medians)"
            for figure_name, plot in (("pred_vs_true", estimator_plots.plot_pred_vs_true),
                                      ("error_distribution", estimator_plots.plot_error_distribution),
                                      ("errors_by_knob", estimator_plots.plot_errors_by_knob)):
                path = f"plots/{figure_name}_{name}.png"
                log_figure(plot(truth, pred, title=title), path)
                figures.append(path)
            scores = evaluate_predictor(estimator, rows, prefix)
            summary["sets"][name] = {k[len(prefix):]: (v if math.isfinite(v) else None) for k, v in scores.items()}  # type: ignore[index]
        if resolved.history:
            log_figure(estimator_plots.plot_training_curves(resolved.history), "plots/training_curves.png")
            figures.append("plots/training_curves.png")
            best = [r for r in resolved.history if r.get("is_best")]
            summary["training"] = {"epochs": len(resolved.history), "best_epoch": best[-1]["epoch"] if best else None,
                                   "best_val_loss": best[-1]["val_loss"] if best else None}
        else:
            summary["training"] = "no history: the model does not come from a train_estimator run"
        summary["figures"] = figures
        log_json(summary, "summary.json")
    print(f"visualize_estimator {params.model}: {len(figures)} figures and summary.json in run {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
