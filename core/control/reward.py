"""Rewards of the GRPO controllers: what one answer with one config under one budget is worth.

  penalty      the seed's r = alpha * accuracy - beta * max(0, T_total - B) / B (alpha 1, beta 0.5): a
               fixed price on the relative overshoot. A small overshoot costs almost nothing, so the
               policy sits on the budget's edge and violates it in a large share of runs.
  constrained  r = alpha * accuracy - lambda * [T_total > B]: the cost is the violation itself, and
               lambda is a Lagrange multiplier raised while the violation rate of the rollouts is
               above `violation_target` and lowered (not below 0) while it is under, so the policy is
               held at that rate instead of at a price someone guessed (Lagrangian relaxation of
               "maximise accuracy subject to P(T_total > B) <= target").

T_total is end to end (vision + prefill + decode), the same as the budget: the seed's reward used
prefill latency against an end-to-end budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REWARD_KINDS = ("constrained", "penalty")


@dataclass
class RewardConfig:
    kind: str = "constrained"  # REWARD_KINDS; constrained is the one that meets the adherence target
    alpha: float = 1.0  # weight of accuracy
    beta: float = 0.5  # penalty: weight of the relative overshoot
    violation_target: float = 0.03  # constrained: the violation rate the multiplier holds
    multiplier_lr: float = 0.5  # constrained: step of lambda per unit of (violation rate - target), per update
    initial_multiplier: float = 1.0  # constrained: lambda before the first update

    def validate(self) -> "RewardConfig":
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"parameter reward must be one of {list(REWARD_KINDS)}, got {self.kind!r}")
        for name in ("alpha", "beta", "multiplier_lr", "initial_multiplier"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"parameter {name} must be a finite number >= 0, got {value}")
        if not 0 <= self.violation_target < 1:
            raise ValueError(f"parameter violation_target must lie in [0, 1), got {self.violation_target}")
        return self


class Reward:
    """`__call__` scores rollouts; `update` moves the multiplier (constrained) after each update step."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config.validate()
        self.multiplier = float(config.initial_multiplier) if config.kind == "constrained" else float(config.beta)

    def __call__(self, accuracy: np.ndarray, latency_ms: np.ndarray, budget_ms: np.ndarray) -> np.ndarray:
        """Rewards of rollouts (any shape; `budget_ms` broadcasts against `latency_ms`)."""
        c = self.config
        if c.kind == "penalty":
            return c.alpha * accuracy - c.beta * np.maximum(0.0, latency_ms - budget_ms) / budget_ms
        return c.alpha * accuracy - self.multiplier * (latency_ms > budget_ms)

    def update(self, violation_rate: float) -> float:
        """After an update on rollouts that violated at `violation_rate`: the new multiplier."""
        c = self.config
        if c.kind == "constrained":
            self.multiplier = max(0.0, self.multiplier + c.multiplier_lr * (violation_rate - c.violation_target))
        return self.multiplier

    def state(self) -> dict[str, float]:
        return {"multiplier": self.multiplier}

    def load_state(self, state: dict[str, float]) -> None:
        self.multiplier = float(state["multiplier"])
