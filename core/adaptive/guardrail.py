"""The latency guardrail: after the vision stage is measured, does the controller's (top_k, blocks)
still fit what is left of the budget? If not, step down within the tier.

The check uses the estimator's P90 per stage for every config of the knob space (one estimator pass
per request size, cached), each multiplied by its online calibration factor:

    predicted remaining = f_prefill x P90(prefill) + f_decode x P90(decode step) x (length - 1)

where length is the controller's predicted answer length. A config fits when that is <= the budget
minus the time already spent (features, decision, vision). The vision stage is done, so the step
down stays in the controller's tier: the config of highest prior accuracy (the controller data's mean
accuracy per config) that fits, ties to the faster; if none fits, the fastest of the tier, flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.control.decision import grid_arrays, total_from_stages
from core.knobs import TIERS
from core.latency.estimator import LatencyEstimator

_CACHE_SIZE = 4096
_TIE_DECIMALS = 9


def stage_p90_ms(estimator: LatencyEstimator, sizes: np.ndarray, options: dict[str, list]) -> np.ndarray:
    """(configs, 3) the estimator's P90 of vision, prefill and one decode step for one request whose
    sizes are `sizes` (7,) in `core.control.decision.request_columns()` order, tier-major grid order."""
    grid = grid_arrays(options)
    tier_index = grid["tier_index"]
    n_tiers = len(TIERS)
    crops = sizes[1:1 + n_tiers][tier_index]
    vision = sizes[1 + n_tiers:1 + 2 * n_tiers][tier_index]
    raw = np.column_stack([vision, np.full(len(tier_index), sizes[0]), crops, tier_index,
                           grid["top_k"].astype(np.float64), grid["num_active_blocks"].astype(np.float64)])
    return estimator.predict_array(raw)[:, 3:6]


class RequestLatency:
    """One request size's stage P90s (configs, 3) and what the request path derives from them, each
    computed once per size: on the live path every numpy call costs microseconds with cold caches."""

    def __init__(self, p90: np.ndarray) -> None:
        self.p90 = p90
        self.stage_means = {stage: float(m) for stage, m in zip(("vision", "prefill", "decode"), p90.mean(axis=0))}
        self._totals: dict[int, np.ndarray] = {}

    def total(self, decode_steps: int) -> np.ndarray:
        """(configs,) P90 of T_total for an answer of `decode_steps` forwards after the first token."""
        found = self._totals.get(decode_steps)
        if found is None:
            found = self._totals[decode_steps] = total_from_stages(self.p90, decode_steps)
        return found


@dataclass
class GuardrailDecision:
    index: int  # config index into the grid
    intervened: bool  # the controller's config was replaced
    fits: bool  # the final config's predicted remaining latency fits the remaining budget
    predicted_remaining_ms: float  # of the final config


class Guardrail:
    """Checks and steps down the controller's config (module doc); `enabled=False` only reports."""

    def __init__(self, estimator: LatencyEstimator, options: dict[str, list], prior_accuracy: np.ndarray,
                 enabled: bool = True) -> None:
        self.estimator, self.options, self.enabled = estimator, options, enabled
        self.grid = grid_arrays(options)
        self.prior = np.round(np.asarray(prior_accuracy, dtype=np.float64), _TIE_DECIMALS)
        self._cache: dict[bytes, np.ndarray] = {}

    def stage_p90(self, sizes: np.ndarray) -> np.ndarray:
        """`stage_p90_ms` for one request, cached by its sizes (the estimator is deterministic)."""
        return self.request_latency(sizes).p90

    def request_latency(self, sizes: np.ndarray) -> "RequestLatency":
        """The estimator's figures for one request's sizes, cached by them (the estimator is deterministic)."""
        key = np.asarray(sizes, dtype=np.float64).tobytes()
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            found = self._cache[key] = RequestLatency(stage_p90_ms(self.estimator, np.asarray(sizes, dtype=np.float64),
                                                                   self.options))
        return found

    def check(self, index: int, p90: np.ndarray, decode_steps: int, factors: dict[str, float],
              remaining_ms: float) -> GuardrailDecision:
        """The final config for a request whose controller chose `index`, given its (configs, 3) stage
        P90s, the predicted decode steps, the calibration factors and the budget left."""
        steps = max(decode_steps, 0)
        # The controller's config first, in scalars: it fits on most requests, and then no array is needed.
        own = factors["prefill"] * float(p90[index, 1]) + factors["decode"] * float(p90[index, 2]) * steps
        if own <= remaining_ms or not self.enabled:
            return GuardrailDecision(index, False, bool(own <= remaining_ms), own)
        remaining = factors["prefill"] * p90[:, 1] + factors["decode"] * p90[:, 2] * steps
        in_tier = self.grid["tier_index"] == self.grid["tier_index"][index]
        fitting = in_tier & (remaining <= remaining_ms)
        if fitting.any():
            key = np.where(fitting, self.prior - remaining * 1e-12, -np.inf)  # accuracy first, then speed
            chosen, fits = int(np.argmax(key)), True
        else:
            chosen, fits = int(np.argmin(np.where(in_tier, remaining, np.inf))), False
        return GuardrailDecision(chosen, chosen != index, fits, float(remaining[chosen]))
