"""Online calibration: how much slower (or faster) than the latency estimator this machine is now.

The estimator was fitted on a profiling table measured at another time, often on a quieter machine.
Every answered request gives, per stage, the ratio measured / predicted (the estimator's P90 for the
config that ran); a stage's factor is a robust running quantile of its last `window` ratios (or an
EWMA of them), and the guardrail multiplies that stage's prediction by it. Until a stage has
`min_count` ratios its factor is the controller's static one (fitted on the calibration runs), so the
first requests are no worse than without calibration. A frozen calibration (`enabled=False`) keeps
the static factor for ever: the ablation's "calibration off".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


STAGES: tuple[str, ...] = ("vision", "prefill", "decode")
METHODS: tuple[str, ...] = ("quantile", "ewma")


class CalibrationError(ValueError):
    """A calibration parameter out of range (one line naming it)."""


@dataclass
class OnlineCalibration:
    """Per-stage factors for the estimator's P90, learned from measured / predicted ratios."""

    static_factor: float  # used until a stage has min_count ratios, and always when not enabled
    window: int = 50
    quantile: float = 0.95
    method: str = "quantile"
    ewma_alpha: float = 0.1  # method "ewma": weight of the newest ratio
    min_count: int = 5
    enabled: bool = True
    _ratios: dict[str, deque] = field(default_factory=dict, repr=False)
    _ewma: dict[str, float] = field(default_factory=dict, repr=False)
    _factors: dict[str, float] = field(default_factory=dict, repr=False)  # recomputed once per update

    def __post_init__(self) -> None:
        if self.window < 1:
            raise CalibrationError(f"parameter calibration_window must be >= 1, got {self.window}")
        if not 0 < self.quantile < 1:
            raise CalibrationError(f"parameter calibration_quantile must lie in (0, 1), got {self.quantile}")
        if self.method not in METHODS:
            raise CalibrationError(f"parameter calibration_method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0 < self.ewma_alpha <= 1:
            raise CalibrationError(f"parameter ewma_alpha must lie in (0, 1], got {self.ewma_alpha}")
        if not self.static_factor > 0:
            raise CalibrationError(f"static calibration factor must be > 0, got {self.static_factor}")
        self.min_count = max(1, min(self.min_count, self.window))
        self._ratios = {stage: deque(maxlen=self.window) for stage in STAGES}

    def update(self, measured_ms: dict[str, float], predicted_ms: dict[str, float]) -> None:
        """Record one request's stages (a stage with no prediction, e.g. no decode step, is skipped)."""
        for stage in STAGES:
            predicted = predicted_ms.get(stage, 0.0)
            if predicted <= 0 or stage not in measured_ms:
                continue
            ratio = measured_ms[stage] / predicted
            self._ratios[stage].append(ratio)
            previous = self._ewma.get(stage)
            self._ewma[stage] = ratio if previous is None else (1 - self.ewma_alpha) * previous + self.ewma_alpha * ratio
            self._factors.pop(stage, None)

    def factor(self, stage: str) -> float:
        """The multiplier for `stage`'s P90 prediction now (computed once per update: the request path
        reads it several times)."""
        if stage not in self._factors:
            self._factors[stage] = self._compute(stage)
        return self._factors[stage]

    def _compute(self, stage: str) -> float:
        ratios = self._ratios[stage]
        if not self.enabled or len(ratios) < self.min_count:
            return self.static_factor
        if self.method == "ewma":
            return self._ewma[stage]
        # numpy's default (linear) quantile by hand: on a window of 50, np.quantile's array set-up costs
        # ~40 us a stage, sorting a list ~3 us, and this runs on every request
        values = sorted(ratios)
        position = self.quantile * (len(values) - 1)
        low = int(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)

    def factors(self) -> dict[str, float]:
        return {stage: self.factor(stage) for stage in STAGES}

    def drift(self, predicted_ms: dict[str, float]) -> float:
        """How much slower than the static calibration the machine is now, for a request whose stages
        the estimator predicts as `predicted_ms`: corrected total / statically corrected total. The
        controller's own rule is calibrated statically; dividing its budget by this keeps its tier
        choice honest when the machine changes."""
        total = sum(predicted_ms.values())
        if not self.enabled or total <= 0:
            return 1.0
        return sum(self.factor(s) * predicted_ms[s] for s in predicted_ms) / (self.static_factor * total)
