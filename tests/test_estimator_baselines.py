"""Reference estimators: the analytic cost model recovers a known law, the linear one is exact on a
linear law, and both speak the estimator's predict_frame interface."""

from __future__ import annotations

import pandas as pd
import pytest

from core.latency.baselines import BASELINES, AnalyticBaseline, LinearBaseline
from core.latency.data import EstimatorError, split_by_sample
from core.latency.evaluation import baseline_scores, evaluate_predictor
from core.latency.features import OUTPUT_COLUMNS
from tests.helpers import synthetic_profile


def linear_law(vision_tokens, text_tokens, top_k, blocks):
    """A law linear in the estimator's FEATURES (with products), so least squares must fit it exactly."""
    vision = 2.0 + 0.3 * vision_tokens
    prefill = 1.0 + 0.001 * blocks * (vision_tokens + text_tokens) + 0.2 * blocks * top_k
    decode = 0.5 + 0.1 * blocks + 0.02 * blocks * top_k
    return vision, prefill, decode


def test_analytic_baseline_recovers_the_law_coefficients():
    table = synthetic_profile(num_samples=12, num_runs=2, noise=0.01, seed=4)
    coefficients = AnalyticBaseline().fit(table).coefficients
    assert coefficients["vision_ms_per_token"] == pytest.approx(0.5, rel=0.02)
    assert coefficients["prefill_ms_per_block_token"] == pytest.approx(0.01, rel=0.05)
    assert coefficients["prefill_ms_per_block_token_per_expert"] == pytest.approx(0.002, rel=0.05)
    assert coefficients["decode_ms_per_block"] == pytest.approx(0.3, rel=0.05)
    assert coefficients["decode_ms_per_block_per_expert"] == pytest.approx(0.05, rel=0.05)
    # The law has no constant terms: what the fit puts there is small next to the latencies.
    assert abs(coefficients["vision_const_ms"]) < 0.01 * table["T_vision_ms"].median()
    assert abs(coefficients["prefill_const_ms"]) < 0.01 * table["T_prefill_ms"].median()
    assert abs(coefficients["prefill_ms_per_block"]) * 16 < 0.01 * table["T_prefill_ms"].median()
    assert abs(coefficients["decode_const_ms"]) < 0.01 * table["T_decode_per_token_ms"].median()


def test_a_feature_constant_in_training_gets_no_linear_weight():
    # Collinear with the intercept: lstsq's min-norm split would turn an unseen value into a shift.
    table = synthetic_profile(num_samples=4, num_runs=1, seed=8).assign(text_tokens=16)
    coefficients = LinearBaseline().fit(table).coefficients
    assert all(c["text_tokens"] == 0.0 for c in coefficients.values())
    assert all(c["intercept"] != 0.0 for c in coefficients.values())


def test_linear_baseline_is_exact_on_a_law_linear_in_the_features():
    table = synthetic_profile(num_samples=6, num_runs=1, noise=0.0, seed=5, law=linear_law)
    train, _, test = split_by_sample(table, 0.8, seed=0)
    metrics = evaluate_predictor(LinearBaseline().fit(train), test, "baseline_linear_test_")
    for component in ("vision", "prefill", "decode", "total"):
        assert metrics[f"baseline_linear_test_mape_{component}"] < 1e-6, component


@pytest.mark.parametrize("baseline", [LinearBaseline, AnalyticBaseline])
def test_baselines_share_the_estimator_interface(baseline):
    table = synthetic_profile(num_samples=5, num_runs=1, seed=6)
    with pytest.raises(EstimatorError, match="not fitted"):
        baseline().predict_frame(table)
    pred = baseline().fit(table).predict_frame(table)
    assert list(pred.columns) == list(OUTPUT_COLUMNS) + ["T_total_ms", "T_total_ms_p90"]
    assert pred.index.equals(table.index)
    for column in ("T_vision_ms", "T_prefill_ms", "T_decode_per_token_ms", "T_total_ms"):
        assert (pred[f"{column}_p90"] >= pred[column]).all()
    # the upper bound covers about the quantile's share of the training rows
    coverage = (table["T_prefill_ms"] <= pred["T_prefill_ms_p90"]).mean()
    assert 0.8 <= coverage <= 0.97


def test_the_cost_model_beats_least_squares_on_features_for_the_moe_law():
    table = synthetic_profile(num_samples=10, num_runs=1, seed=7)
    train, _, test = split_by_sample(table, 0.8, seed=0)
    analytic = evaluate_predictor(AnalyticBaseline().fit(train), test, "a_")
    linear = evaluate_predictor(LinearBaseline().fit(train), test, "l_")
    assert analytic["a_mape_prefill"] < 2.0 < linear["l_mape_prefill"]


def test_baseline_scores_fit_on_train_and_val_and_score_the_test_rows():
    table = synthetic_profile(num_samples=6, num_runs=1, noise=0.0, seed=5, law=linear_law)
    split = split_by_sample(table, 0.8, seed=0)
    scores = baseline_scores(split, 0.9, "heldout_config_")
    assert set(BASELINES) == {"linear", "analytic"}
    for name in BASELINES:
        assert scores[f"baseline_{name}_heldout_config_rows"] == len(split.test)
    assert scores["baseline_linear_heldout_config_mape_mean"] < 1e-6  # the law is linear in the features
    # fitted on train + val: the same as a fit by hand on those rows
    by_hand = evaluate_predictor(AnalyticBaseline().fit(pd.concat([split.train, split.val])), split.test, "x_")
    assert scores["baseline_analytic_heldout_config_mape_prefill"] == pytest.approx(by_hand["x_mape_prefill"])
