"""The risk-priced choice (core.control.risk): the fit model, the prices that hold an expected violation
rate, labels and stage 1's within-tier choice that spend it where accuracy is bought, and their persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.control.decision import LearnedController, fit_output_length
from core.control.risk import MAX_PRICE, FitModel, price_violations, priced_choice
from core.control.supervised import Rule, TrainingConfig, best_configs, label_accuracy, train_controller
from core.knobs import BASE_VLM_SPACE, TIERS
from core.latency.estimator import LatencyEstimator
from tests.test_controllers import OPTIONS, _requests, estimator_file, toy_arrays  # noqa: F401 (fixture)


def test_the_fit_model_is_the_cdf_of_measured_over_upper():
    fit = FitModel.from_ratios(np.linspace(0.5, 1.5, 10_001))
    p = fit.fit_probability(np.array([10.0, 10.0, 10.0]), np.array([[10.0, 20.0, 5.0, 6.0]] * 3))
    np.testing.assert_allclose(p[0], [0.5, 0.0, 1.0, 1.0], atol=2e-3)
    assert (np.diff(fit.fit_probability(np.full(1, 10.0), np.linspace(5, 25, 50)[None, :])[0]) <= 1e-12).all()
    with pytest.raises(ValueError, match="calibration table"):
        FitModel.from_ratios(np.zeros(0))


def _two_kinds(n: int = 400):
    """Config 0 safe (never violates), config 1 at a 10% violation risk. Kind A gains 0.5 from config 1,
    kind B 0.05: a 6% violation budget is best spent on A alone (5%)."""
    fit = FitModel.from_ratios(np.linspace(0.5, 1.5, 10_001))  # P(measured <= B) = B / U - 0.5
    kind = np.arange(n) % 2
    value = np.where(kind[:, None] == 0, [[0.4, 0.9]], [[0.5, 0.55]])
    upper = np.tile([10 / 1.6, 10 / 1.4], (n, 1))  # at B = 10 ms both pass the fit check; config 1 fits 90% of runs
    return fit, kind, value, upper


def test_prices_hold_the_target_and_spend_the_risk_where_it_buys_accuracy():
    fit, kind, value, upper = _two_kinds()
    prices = price_violations(value, upper, fit, l_full_ms=10.0, target=0.06, fractions=(1.0,))
    assert 0 < prices.prices[0] < MAX_PRICE
    index, fits, violation = priced_choice(value, upper, np.full(len(kind), 10.0), fit, np.full(len(kind), prices.prices[0]))
    assert fits.all() and violation.mean() <= 0.06
    assert (index[kind == 0] == 1).all() and (index[kind == 1] == 0).all()
    # no price: every request takes the risk; an impossible target: none does
    free, _, _ = priced_choice(value, upper, np.full(len(kind), 10.0), fit, np.zeros(len(kind)))
    assert (free == 1).all()
    strict = price_violations(value, upper, fit, 10.0, target=1e-6, fractions=(1.0,))
    assert strict.prices[0] == MAX_PRICE or (priced_choice(value, upper, np.full(len(kind), 10.0), fit,
                                                           np.full(len(kind), strict.prices[0]))[0] == 0).all()
    with pytest.raises(ValueError, match="violation_target"):
        price_violations(value, upper, fit, 10.0, target=0.0)


def test_priced_labels_keep_the_fit_check_and_fall_back_to_the_fastest():
    fit, kind, value, upper = _two_kinds(4)
    labels = best_configs(value, upper, np.full(4, 10.0), (fit, np.zeros(4)))
    assert (labels == 1).all()
    assert (best_configs(value, upper, np.full(4, 7.0), (fit, np.zeros(4))) == 0).all()  # config 1 fails the check
    assert (best_configs(value, upper, np.full(4, 1.0), (fit, np.zeros(4))) == 0).all()  # none fits: the fastest


@pytest.mark.parametrize("stage", ["supervised", "stage1"])
def test_a_risk_priced_controller_round_trips_and_its_labels_spend_no_more_than_the_target(stage, tmp_path, estimator_file):
    arrays = toy_arrays(200)
    # a spread of measured over calibrated upper latency: 0.7-1.2, so a config within B can still miss it
    rule = Rule(fit_output_length(np.zeros((4, 4)), np.full(4, 2.0)), 1.0, 0.9, 0,
                fit=FitModel.from_ratios(np.linspace(0.7, 1.2, 1001)))
    trained = train_controller(arrays, rule, LatencyEstimator.load(estimator_file), OPTIONS, BASE_VLM_SPACE.name, 26.0,
                               TrainingConfig(num_epochs=3, stage=stage, label_violation_target=0.05))
    controller = trained.controller
    assert controller.prices is not None and controller.prices.target == 0.05
    assert np.isfinite(trained.history[-1]["val_expected_violation_rate"])
    requests = _requests(arrays).assign(text_tokens=8, **{f"crops_{t}": c for t, c in zip(TIERS, (1, 2, 8))},
                                        **{f"vision_tokens_{t}": (c + 1) * 4 for t, c in zip(TIERS, (1, 2, 8))})
    loaded = LearnedController.load(controller.save(tmp_path / "c"))
    np.testing.assert_allclose(loaded.prices.prices, controller.prices.prices)
    pd.testing.assert_frame_equal(controller.decide(requests, 20.0), loaded.decide(requests, 20.0))
    if stage == "stage1":  # its prices hold its own choice within the tier (prior accuracy), not the labels'
        return
    # the labels' expected violation rate is held at the target per fraction (solved on the 80% that train)
    labels_value = label_accuracy(arrays, arrays, TrainingConfig().label_prior_weight)
    spent = []
    for fraction in (0.6, 0.8, 1.0):
        budget = np.full(len(arrays.sample_ids), fraction * 26.0)
        price = controller.prices.at(np.full(len(budget), fraction))
        _, fits, violation = priced_choice(labels_value, arrays.upper_ms, budget, rule.fit, price)
        spent.append(violation[fits].mean())
        assert spent[-1] <= 0.05 + 0.015, fraction
    assert max(spent) > 0.02  # the risk is spent, not refused
