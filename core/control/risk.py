"""Spending the adherence target where it buys accuracy: the risk-priced choice of a config.

The fit check alone (core.control.decision) holds every request to the same guarantee: its config
must fit B in `latency_quantile` of the calibration runs. The target is an aggregate one (a share of
all answers within B), and on the measured table one answer's tail over its median is the same for
every config (data/profiles/cpu-base-vlm/README.md: 2.02-2.16x at the 97th percentile). A request
whose next config up is worth much accuracy (a text question that the medium tier reads and the low
tier does not) may then take a few points of violation risk that a request whose cheap config
answers as well (a colour question) never needs. On the held-out measured runs the supervised
controller with priced labels reaches 0.656 at 80% of L_full where the per-data-set lookup (a 97th
percentile per config) reaches 0.478, at adherence 0.988 (data/controllers/README.md).

  FitModel          P(measured T_total <= B) of a config whose calibrated upper latency is U: the
                    empirical CDF of measured / U over the calibration runs, read at B / U
  price_violations  per budget fraction, the smallest price lambda on the probability of a violation
                    whose priced choices (value - lambda x P(violation), among configs that pass the
                    fit check) hold a population's expected violation rate at a target
  ViolationPrices   the lambda per fraction a controller keeps and reads at decision time
  priced_choice     the priced choice itself (vectorised over requests)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

FIT_LEVELS = 257  # points of the ratio CDF kept (its quantiles at 0, 1/256, ..., 1)
PRICE_FRACTIONS: tuple[float, ...] = tuple(np.round(np.arange(0.30, 1.5001, 0.02), 2).tolist())
MAX_PRICE = 1e3  # accuracy is in [0, 1]: at this price no violation risk is worth any accuracy
_BISECTIONS = 24
_PRICE_SAMPLE = 1024  # requests the prices are solved on (a seeded subset of larger populations)


@dataclass
class FitModel:
    """The CDF of measured T_total over the calibrated upper latency, as its quantiles."""

    ratios: np.ndarray  # (FIT_LEVELS,) non-decreasing quantiles of measured / calibrated upper

    @classmethod
    def from_ratios(cls, ratios: np.ndarray) -> "FitModel":
        ratios = np.asarray(ratios, dtype=np.float64)
        if len(ratios) == 0 or not np.isfinite(ratios).all():
            raise ValueError("calibration table: no finite measured / predicted ratio to fit the violation risk on")
        return cls(np.quantile(ratios, np.linspace(0.0, 1.0, FIT_LEVELS)))

    def fit_probability(self, budget_ms: np.ndarray, upper_ms: np.ndarray) -> np.ndarray:
        """(N,) budgets and (N, C) calibrated upper latencies -> (N, C) P(measured <= B)."""
        with np.errstate(divide="ignore"):  # an upper latency of 0 fits any budget: x = inf reads P = 1
            x = np.asarray(budget_ms, dtype=np.float64)[:, None] / np.asarray(upper_ms, dtype=np.float64)
        return np.interp(x, self.ratios, np.linspace(0.0, 1.0, FIT_LEVELS))

    def as_list(self) -> list[float]:
        return self.ratios.tolist()


@dataclass
class ViolationPrices:
    """lambda per budget fraction f = B / L_full, linear between the fractions solved for."""

    fractions: np.ndarray
    prices: np.ndarray
    target: float  # the expected violation rate the prices hold

    def at(self, fraction: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(fraction, dtype=np.float64), self.fractions, self.prices)

    def as_dict(self) -> dict:
        return {"fractions": self.fractions.tolist(), "prices": self.prices.tolist(), "target": self.target}

    @classmethod
    def from_dict(cls, values: dict) -> "ViolationPrices":
        return cls(np.asarray(values["fractions"], np.float64), np.asarray(values["prices"], np.float64),
                   float(values["target"]))


def priced_choice(value: np.ndarray, upper_ms: np.ndarray, budget_ms: np.ndarray, fit: FitModel,
                  price: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request, the config of highest value - price x P(violation) among those whose calibrated upper
    latency fits B (and `allowed`, (N, C) bool, if given); where none does, the config of lowest upper
    latency. A value tie goes to the lower upper latency. -> (config indices, fits, P(violation) of the pick)."""
    budget_ms = np.asarray(budget_ms, dtype=np.float64)
    violation = 1.0 - fit.fit_probability(budget_ms, upper_ms)
    fitting = upper_ms <= budget_ms[:, None]
    if allowed is not None:
        fitting = fitting & allowed
    key = np.round(value, 9) - np.asarray(price, dtype=np.float64)[:, None] * violation - upper_ms * 1e-12
    fits = fitting.any(axis=1)
    best = np.argmax(np.where(fitting, key, -np.inf), axis=1)
    index = np.where(fits, best, np.argmin(upper_ms, axis=1))
    return index, fits, violation[np.arange(len(index)), index]


def price_violations(value: np.ndarray, upper_ms: np.ndarray, fit: FitModel, l_full_ms: float, target: float,
                     fractions: Sequence[float] = PRICE_FRACTIONS, seed: int = 0,
                     allowed_at: Callable[[float, np.ndarray], np.ndarray] | None = None) -> ViolationPrices:
    """For each budget fraction, the smallest lambda in [0, MAX_PRICE] whose `priced_choice` over the
    population (`value`, `upper_ms`: (N, C)) has an expected violation rate <= `target`, over the requests
    some config can serve (the others get the fastest config at any price). Bisection in log lambda.
    `allowed_at(fraction, rows)` -> (len(rows), C) bool restricts the choice (stage 1: the tier it picks)."""
    if not 0 < target < 1:
        raise ValueError(f"parameter violation_target must lie in (0, 1), got {target}")
    rows = np.arange(len(value))
    if len(value) > _PRICE_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(len(value), _PRICE_SAMPLE, replace=False))
        value, upper_ms = value[rows], upper_ms[rows]
    prices = []
    for fraction in fractions:
        budget = np.full(len(value), fraction * l_full_ms)
        allowed = None if allowed_at is None else allowed_at(fraction, rows)
        servable = ((upper_ms <= budget[:, None]) & (True if allowed is None else allowed)).any(axis=1)
        if not servable.any():
            prices.append(MAX_PRICE)
            continue

        def rate(price: float) -> float:
            _, _, violation = priced_choice(value[servable], upper_ms[servable], budget[servable], fit,
                                            np.full(int(servable.sum()), price),
                                            None if allowed is None else allowed[servable])
            return float(violation.mean())

        if rate(0.0) <= target:
            prices.append(0.0)
            continue
        if rate(MAX_PRICE) > target:
            prices.append(MAX_PRICE)
            continue
        low, high = np.log(1e-4), np.log(MAX_PRICE)
        for _ in range(_BISECTIONS):
            middle = (low + high) / 2
            low, high = (low, middle) if rate(float(np.exp(middle))) <= target else (middle, high)
        prices.append(float(np.exp(high)))
    return ViolationPrices(np.asarray(fractions, np.float64), np.asarray(prices, np.float64), float(target))
