"""Estimator metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.latency.metrics import (
    COMPONENTS,
    component_metrics,
    evaluate_components,
    feature_twin_mape,
    mean_over_components,
    per_config_table,
    quantile_coverage,
    run_to_run_noise,
)
from core.timing import PREDICTED_COMPONENTS, coefficient_of_variation


def test_component_metrics_by_hand():
    # errors +10, -22, 0 on truths 100, 200, 50: relative 10%, 11%, 0%
    m = component_metrics(np.array([100.0, 200.0, 50.0]), np.array([110.0, 178.0, 50.0]))
    assert m["mae"] == pytest.approx(32 / 3)
    assert m["rmse"] == pytest.approx(np.sqrt((100 + 484) / 3))
    assert m["mape"] == pytest.approx(7.0)
    assert m["within10"] == pytest.approx(2 / 3)  # exactly 10% counts, 11% does not
    ss_tot = sum((y - 350 / 3) ** 2 for y in (100, 200, 50))
    assert m["r2"] == pytest.approx(1 - 584 / ss_tot)
    assert m["n"] == 3


def test_component_metrics_edge_cases():
    exact = component_metrics(np.array([5.0, 5.0]), np.array([5.0, 5.0]))
    assert exact["r2"] == 1.0 and exact["mape"] == 0.0
    assert np.isnan(component_metrics(np.array([5.0, 5.0]), np.array([4.0, 6.0]))["r2"])  # constant truth
    assert component_metrics(np.array([]), np.array([]))["n"] == 0
    with pytest.raises(ValueError, match="same length"):
        component_metrics(np.array([1.0]), np.array([1.0, 2.0]))


def _frames():
    truth = pd.DataFrame({
        "tier": ["low", "low", "high"], "top_k": [4, 4, 8], "num_active_blocks": [8, 8, 16],
        "output_tokens": [5, 1, 3],
        "T_vision_ms": [10.0, 10.0, 20.0], "T_prefill_ms": [100.0, 100.0, 200.0],
        "T_decode_per_token_ms": [2.0, 0.0, 4.0], "T_total_ms": [118.0, 110.0, 228.0],
    })
    pred = pd.DataFrame({
        "T_vision_ms": [11.0, 10.0, 20.0], "T_prefill_ms": [100.0, 90.0, 220.0],
        # row 1 has no decode forward: its wild decode prediction must not count
        "T_decode_per_token_ms": [2.0, 99.0, 5.0], "T_total_ms": [119.0, 100.0, 255.0],
    })
    return truth, pred


def test_evaluate_components_names_and_decode_mask():
    truth, pred = _frames()
    out = evaluate_components(truth, pred, prefix="test_")
    expected = {f"test_{m}_{c}" for m in ("mae", "rmse", "mape", "r2", "within10")
                for c in ("vision", "prefill", "decode", "total")} | {"test_within10", "test_n"}
    assert set(out) == expected
    assert out["test_mae_decode"] == pytest.approx(0.5)  # rows 0 and 2 only: |0| and |1|
    assert out["test_mape_decode"] == pytest.approx(12.5)
    assert out["test_mae_prefill"] == pytest.approx(10.0)
    assert out["test_within10_prefill"] == pytest.approx(1.0)
    assert out["test_within10"] == out["test_within10_total"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rows must correspond"):
        evaluate_components(truth, pred.iloc[:2])


def test_per_config_table_by_hand():
    truth, pred = _frames()
    table = per_config_table(truth, pred)
    assert list(table["tier"]) == ["low", "high"]
    low = table.iloc[0]
    assert low["n"] == 2
    assert low["mae_vision"] == pytest.approx(0.5)
    assert low["mape_prefill"] == pytest.approx(5.0)
    assert low["mae_decode"] == pytest.approx(0.0)  # the one-token row is left out
    assert table.iloc[1]["mape_total"] == pytest.approx(100 * 27 / 228)


def test_quantile_coverage_by_hand():
    truth, pred = _frames()
    upper = pred.add_suffix("_p90")
    upper["T_prefill_ms_p90"] = [101.0, 99.0, 250.0]
    out = quantile_coverage(truth, upper, prefix="test_")
    assert out["test_p90_coverage_prefill"] == pytest.approx(2 / 3)


def test_run_to_run_noise_by_hand():
    rows = pd.DataFrame({
        "sample_id": ["s"] * 3, "tier": ["low"] * 3, "top_k": [4] * 3, "num_active_blocks": [8] * 3,
        "T_prefill_ms": [100.0, 110.0, 90.0],
    })
    out = run_to_run_noise(rows)
    assert out["noise_cv_prefill"] == pytest.approx(0.1)  # std 10 (ddof 1) over mean 100
    assert out["noise_cv_prefill"] == pytest.approx(coefficient_of_variation([100.0, 110.0, 90.0]))
    # each run against the median of the other two: 0/100, 15/95, 15/105
    assert out["noise_mape_prefill"] == pytest.approx(100 * (0 + 15 / 95 + 15 / 105) / 3)


def test_run_to_run_noise_matches_a_direct_computation_on_uneven_groups():
    rng = np.random.default_rng(0)
    sizes = [2, 3, 4, 5, 1]
    rows = pd.DataFrame({
        "sample_id": np.repeat([f"s{i}" for i in range(len(sizes))], sizes), "tier": "low", "top_k": 4,
        "num_active_blocks": 8, "T_vision_ms": rng.uniform(10, 20, sum(sizes)),
    })
    expected = []
    for _, values in rows.groupby("sample_id")["T_vision_ms"]:
        v = values.to_numpy()
        expected += [abs(v[i] - np.median(np.delete(v, i))) / np.median(np.delete(v, i)) for i in range(len(v)) if len(v) > 1]
    assert run_to_run_noise(rows)["noise_mape_vision"] == pytest.approx(100 * np.mean(expected))


def test_feature_twin_mape_predicts_each_row_from_the_other_rows_with_its_features():
    truth = pd.DataFrame({
        "sample_id": ["a", "b", "c", "d"], "tier": "low", "top_k": 4, "num_active_blocks": 8,
        "vision_tokens": [8, 8, 8, 12], "text_tokens": 10,
        "T_prefill_ms": [100.0, 110.0, 90.0, 50.0],  # d has no twin: skipped
        "T_decode_per_token_ms": [2.0, 2.0, 4.0, 3.0], "output_tokens": [3, 3, 1, 3],  # c: no decode
    })
    out = feature_twin_mape(truth)
    # 100 vs median(110, 90) = 100; 110 vs 95; 90 vs 105 (relative to the truth, as test_mape)
    assert out["feature_twin_mape_prefill"] == pytest.approx(100 * (0 + 15 / 110 + 15 / 90) / 3)
    assert out["feature_twin_mape_decode"] == pytest.approx(0.0)  # a and b are the decode group
    assert "feature_twin_mape_vision" not in out
    with pytest.raises(ValueError, match="text_tokens"):
        feature_twin_mape(truth.drop(columns="text_tokens"))


def test_components_are_the_predicted_ones_plus_the_total():
    assert COMPONENTS == {**PREDICTED_COMPONENTS, "total": "T_total_ms"}
    assert list(COMPONENTS)[:3] == ["vision", "prefill", "decode"]


def test_mean_over_components_skips_what_is_not_finite():
    metrics = {"test_mape_vision": 1.0, "test_mape_prefill": 2.0, "test_mape_decode": float("nan"), "test_mape_total": 99.0}
    assert mean_over_components(metrics, "test_mape") == pytest.approx(1.5)  # the total is not a predicted component
    assert np.isnan(mean_over_components({f"x_{c}": float("nan") for c in PREDICTED_COMPONENTS}, "x"))
