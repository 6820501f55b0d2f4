"""Reference estimators the learned MLP must beat, with the MLP's predict_frame interface.

  LinearBaseline    ordinary least squares in ms on the MLP's FEATURES (+ intercept), per component
  AnalyticBaseline  a cost model with a handful of coefficients, fitted by least squares in ms:
                      vision  = a_v * vision_tokens + c_v
                      prefill = blocks * tokens * (a_p + b_p * top_k) + e_p * blocks + c_p   (tokens = vision + text)
                      decode  = blocks * (a_d + b_d * top_k) + c_d              (per decode forward)

Both fit on profiling rows (rows whose decode per token is undefined are left out of the decode
fit) and give an upper quantile the simplest honest way: point times the `quantile` of the
training ratio truth / prediction, per component.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.latency.data import TARGETS, EstimatorError, prepare_table, target_arrays
from core.latency.features import (
    FEATURES,
    OUTPUT_COLUMNS,
    QUANTILE_SUFFIX,
    STEP_KNOBS,
    STEP_LEVELS,
    add_total,
    features_from_raw,
    knob_levels,
    raw_matrix,
)

ANALYTIC_COEFFICIENTS: dict[str, tuple[str, ...]] = {
    "T_vision_ms": ("vision_ms_per_token", "vision_const_ms"),
    "T_prefill_ms": ("prefill_ms_per_block_token", "prefill_ms_per_block_token_per_expert", "prefill_ms_per_block",
                     "prefill_const_ms"),
    "T_decode_per_token_ms": ("decode_ms_per_block", "decode_ms_per_block_per_expert", "decode_const_ms"),
}


class _LeastSquaresBaseline:
    """Shared machinery: a design matrix per component, lstsq per component, ratio quantiles."""

    name = "baseline"

    def __init__(self, quantile: float = 0.9) -> None:
        if not 0 < quantile < 1:
            raise EstimatorError(f"parameter quantile must lie in (0, 1), got {quantile}")
        self.quantile = quantile
        self.coef_: dict[str, np.ndarray] = {}
        self.levels_ = np.full((len(STEP_KNOBS), STEP_LEVELS + 1), np.inf)
        self.upper_ratio_: dict[str, float] = {}

    def _design(self, raw: np.ndarray, target: str) -> np.ndarray:
        raise NotImplementedError

    def fit(self, train_df: pd.DataFrame) -> "_LeastSquaresBaseline":
        """Least squares per component on the rows of `train_df` (validated); returns self."""
        train_df = prepare_table(train_df, f"{self.name} train_df")
        raw = raw_matrix(train_df)
        self.levels_ = knob_levels(raw)  # the step ramps' ends, as the MLP fits them
        y, mask = target_arrays(train_df)
        for j, target in enumerate(TARGETS):
            rows = mask[:, j]
            if rows.sum() == 0:
                raise EstimatorError(f"field {target}: no training row defines it")
            design = self._design(raw[rows], target)
            # A column constant in training (other than the intercept, the last column) is left out
            # (coefficient 0): it is collinear with the intercept, and the min-norm split between
            # them would turn an unseen value of it into an arbitrary shift.
            spread = design.max(axis=0) - design.min(axis=0)
            used = spread > 1e-9 * np.maximum(np.abs(design).max(axis=0), 1.0)
            used[-1] = True
            # Columns are scaled to unit norm before lstsq so that ms-per-token and constant
            # coefficients of very different sizes are conditioned alike.
            norms = np.linalg.norm(design[:, used], axis=0)
            norms[norms == 0] = 1.0
            coef, *_ = np.linalg.lstsq(design[:, used] / norms, y[rows, j], rcond=None)
            self.coef_[target] = np.zeros(design.shape[1])
            self.coef_[target][used] = coef / norms
            pred = design @ self.coef_[target]
            ratio = y[rows, j] / np.where(pred > 0, pred, np.nan)
            ratio = ratio[np.isfinite(ratio)]
            self.upper_ratio_[target] = float(max(np.quantile(ratio, self.quantile), 1.0)) if len(ratio) else 1.0
        return self

    def predict_frame(self, df_configs: pd.DataFrame) -> pd.DataFrame:
        """Same interface and columns as LatencyEstimator.predict_frame (points clipped at 0 ms)."""
        if not self.coef_:
            raise EstimatorError(f"{self.name} is not fitted: call fit(train_df) first")
        raw = raw_matrix(df_configs)
        out = pd.DataFrame(index=df_configs.index, columns=list(OUTPUT_COLUMNS), dtype=np.float64)
        for target in TARGETS:
            point = np.clip(self._design(raw, target) @ self.coef_[target], 0.0, None)
            out[target] = point
            out[f"{target}{QUANTILE_SUFFIX}"] = point * self.upper_ratio_[target]
        return add_total(out, df_configs)


class LinearBaseline(_LeastSquaresBaseline):
    """Ordinary least squares in ms on FEATURES plus an intercept, one fit per component."""

    name = "linear baseline"

    def _design(self, raw: np.ndarray, target: str) -> np.ndarray:
        features = features_from_raw(raw, self.levels_).astype(np.float64)
        return np.hstack([features, np.ones((len(features), 1))])

    @property
    def coefficients(self) -> dict[str, dict[str, float]]:
        """{target: {feature or 'intercept': coefficient}} of the fit."""
        names = list(FEATURES) + ["intercept"]
        return {t: dict(zip(names, c.tolist())) for t, c in self.coef_.items()}


class AnalyticBaseline(_LeastSquaresBaseline):
    """The cost law of a MoE VLM with one coefficient per term (see the module docstring)."""

    name = "analytic baseline"

    def _design(self, raw: np.ndarray, target: str) -> np.ndarray:
        vision, text, _crops, _tier, top_k, blocks = (raw[:, j] for j in range(raw.shape[1]))
        ones = np.ones(len(raw))
        if target == "T_vision_ms":
            return np.stack([vision, ones], axis=1)
        if target == "T_prefill_ms":
            work = blocks * (vision + text)
            # e_p * blocks: a fixed cost per block (kernel launches, host work), which is all there
            # is when prefill is host-bound, as on the eager-PyTorch H100 profile (data/profiles/h100-molmoe-arch).
            return np.stack([work, work * top_k, blocks, ones], axis=1)
        return np.stack([blocks, blocks * top_k, ones], axis=1)

    @property
    def coefficients(self) -> dict[str, float]:
        """Named coefficients, e.g. prefill_ms_per_block_token (the a_p of the law)."""
        out: dict[str, float] = {}
        for target, names in ANALYTIC_COEFFICIENTS.items():
            out.update(zip(names, self.coef_[target].tolist()))
        return out


# Every baseline the estimator is scored against, by the name in its metrics (`baseline_<name>_test_...`).
BASELINES: dict[str, type[_LeastSquaresBaseline]] = {"linear": LinearBaseline, "analytic": AnalyticBaseline}

__all__ = ["ANALYTIC_COEFFICIENTS", "AnalyticBaseline", "BASELINES", "LinearBaseline"]
