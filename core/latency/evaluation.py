"""Scoring latency predictors (the MLP or a baseline) on rows they never trained on.

Point errors are taken against per-(sample, config) medians of the runs, the figure the profiler
calls "the latency"; P90 coverage against single rows, since a guardrail bounds one run. Every
metric name is `<prefix><metric>_<component>`, e.g. test_mape_prefill, heldout_config_r2_decode,
baseline_linear_test_mape_total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pandas as pd

from core.latency.baselines import BASELINES
from core.latency.data import EstimatorSplit, aggregate_runs, prepare_table
from core.latency.features import QUANTILE_SUFFIX
from core.latency.metrics import evaluate_components, feature_twin_mape, mean_over_components, per_config_table, quantile_coverage


class Predictor(Protocol):
    def predict_frame(self, df_configs: pd.DataFrame) -> pd.DataFrame: ...


def predict_groups(predictor: Predictor, df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-(sample, config) medians of `df`, the predictor's frame for them), rows aligned."""
    truth = aggregate_runs(df)
    return truth, predictor.predict_frame(truth)


@dataclass
class Evaluation:
    """A predictor's metrics on one set of rows and the row-aligned frames behind them."""

    metrics: dict[str, float]
    truth: pd.DataFrame  # per-(sample, config) medians
    pred: pd.DataFrame  # the predictor's frame for them

    def per_config(self) -> pd.DataFrame:
        """Errors per knob config (core.latency.metrics.per_config_table)."""
        return per_config_table(self.truth, self.pred)

    def predictions(self) -> pd.DataFrame:
        """Truth and prediction side by side, the prediction's columns prefixed `pred_`."""
        return pd.concat([self.truth.reset_index(drop=True), self.pred.add_prefix("pred_").reset_index(drop=True)], axis=1)


def _evaluation(predictor: Predictor, df: pd.DataFrame, prefix: str) -> Evaluation:
    df = prepare_table(df, source=f"{prefix or 'evaluation '}rows")  # NaN / negative latencies fail here, by name
    truth, pred = predict_groups(predictor, df)
    metrics = evaluate_components(truth, pred, prefix)
    metrics[f"{prefix}mape_mean"] = mean_over_components(metrics, f"{prefix}mape")
    metrics[f"{prefix}groups"] = metrics.pop(f"{prefix}n")
    metrics[f"{prefix}rows"] = float(len(df))
    row_pred = predictor.predict_frame(df)
    if any(c.endswith(QUANTILE_SUFFIX) for c in row_pred.columns):
        metrics.update(quantile_coverage(df, row_pred, prefix))
    return Evaluation(metrics, truth, pred)


def evaluate_predictor(predictor: Predictor, df: pd.DataFrame, prefix: str = "test_") -> dict[str, float]:
    """All metrics of `predictor` on profiling rows `df`.

    Point metrics (core.latency.metrics.evaluate_components) against per-(sample, config)
    medians and their `<prefix>mape_mean` over the predicted components; P90 coverage against
    single rows. `df` is validated (EstimatorError naming the field). Out: flat
    {<prefix>name: value}, e.g. test_mape_prefill, test_within10, test_p90_coverage_total.
    """
    return _evaluation(predictor, df, prefix).metrics


def evaluate(predictor: Predictor, rows: pd.DataFrame, prefix: str) -> Evaluation:
    """`evaluate_predictor` plus `<prefix>feature_twin_mape_<component>` (each row predicted from the other
    rows with its features: a reference, not a floor; see core.latency.metrics.feature_twin_mape)."""
    evaluation = _evaluation(predictor, rows, prefix)
    evaluation.metrics.update({f"{prefix}{k}": v for k, v in feature_twin_mape(evaluation.truth).items()})
    return evaluation


def baseline_scores(split: EstimatorSplit, quantile: float, prefix: str) -> dict[str, float]:
    """Every baseline (core.latency.baselines.BASELINES) on `split.test`, as `baseline_<name>_<prefix>...`.

    Baselines have nothing to select on validation rows, so they fit on train + val: the strongest
    version of each, on exactly the samples the MLP may learn from.
    """
    rows = pd.concat([split.train, split.val], ignore_index=True)
    out: dict[str, float] = {}
    for name, baseline in BASELINES.items():
        out.update(evaluate_predictor(baseline(quantile).fit(rows), split.test, f"baseline_{name}_{prefix}"))
    return out


def score_split(model: Predictor, split: EstimatorSplit, quantile: float, prefix: str) -> Evaluation:
    """The model trained on `split` scored on its test rows, with every baseline beside it."""
    evaluation = evaluate(model, split.test, prefix)
    evaluation.metrics.update(baseline_scores(split, quantile, prefix))
    return evaluation


__all__ = ["Evaluation", "Predictor", "baseline_scores", "evaluate", "evaluate_predictor", "predict_groups", "score_split"]
