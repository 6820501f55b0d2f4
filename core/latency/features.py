"""What a latency predictor reads and writes: the request columns, the model features computed from
them, and the prediction frame (components, their upper quantile and the end-to-end total).

The MLP (core.latency.estimator) and the least-squares baselines (core.latency.baselines) share all of
it, so they are scored on the same inputs and give the same output columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.knobs import KNOBS, TIERS
from core.latency.data import TARGETS, EstimatorError

# Columns a request/config must carry to be predicted (tier as a name from core.knobs.TIERS), in the
# order of the raw matrices below: the request's sizes, then the knobs.
RAW_COLUMNS: tuple[str, ...] = ("vision_tokens", "text_tokens", "crops", *KNOBS)
# Model inputs, all computed from RAW_COLUMNS by `features_from_raw` (standardised inside the model).
# The products follow the cost law of a MoE decoder (work ~ blocks x tokens x experts); the logs make
# a multiplicative law additive, which is what an MLP fitting log latency finds easiest.
_NUMERIC_FEATURES: tuple[str, ...] = (
    "vision_tokens",
    "text_tokens",
    "crops",
    "tier_index",
    "top_k",
    "num_active_blocks",
    "blocks_x_top_k",
    "blocks_x_tokens",
    "log_vision_tokens",
    "log_tokens",
    "log_top_k",
    "log_blocks",
)
# Step ramps. Knobs take few values and their latency steps are irregular (kernel shapes: on the
# H200 graph table (data/profiles/h200-molmoe-arch-graph) the top_k steps cost +0.14 / +0.07 / +0.17 / +0.03 ms per decode token), which an
# MLP of the numeric knob smooths over (1% decode error there, 0.5% with these). Ramp j of a knob
# rises from 0 to 1 between its (j-1)-th and j-th distinct value in training (`knob_levels`, stored
# with the model): 0/1 steps on every trained value, and a value never seen in training (the
# held-out config) lies part-way up the ramp of the step it falls in, i.e. it interpolates.
STEP_LEVELS = 4  # indicators per knob: the knob spaces have 5 top_k and 5 block options
STEP_KNOBS: tuple[str, ...] = ("top_k", "num_active_blocks")
FEATURES: tuple[str, ...] = _NUMERIC_FEATURES + tuple(
    f"{knob}_step_{j}" for knob in STEP_KNOBS for j in range(1, STEP_LEVELS + 1)) + ("tier_step_1", "tier_step_2")

# The prediction frame: the TARGETS as points, then their upper quantile (P90 by default).
QUANTILE_SUFFIX = "_p90"
OUTPUT_COLUMNS: tuple[str, ...] = TARGETS + tuple(f"{t}{QUANTILE_SUFFIX}" for t in TARGETS)


def raw_matrix(df: pd.DataFrame) -> np.ndarray:
    """(N, 6) float64 of RAW_COLUMNS with the tier as its index in core.knobs.TIERS."""
    missing = [c for c in RAW_COLUMNS if c not in df.columns]
    if missing:
        raise EstimatorError(f"field(s) {missing} missing: the estimator needs {list(RAW_COLUMNS)}")
    tier_index = pd.Categorical(df["tier"], categories=list(TIERS)).codes  # -1: not a tier (hash lookup, fast)
    if (tier_index < 0).any():
        bad = df["tier"].to_numpy()[np.flatnonzero(tier_index < 0)[0]]
        raise EstimatorError(f"field tier={bad!r} is not one of {list(TIERS)}")
    raw = np.empty((len(df), len(RAW_COLUMNS)), dtype=np.float64)
    for j, column in enumerate(RAW_COLUMNS):
        if column == "tier":
            values = tier_index.astype(np.float64)
        else:
            values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all() or (values < 0).any():
            raise EstimatorError(f"field {column} holds NaN or negative values")
        raw[:, j] = values
    return raw


def knob_levels(raw: np.ndarray) -> np.ndarray:
    """(len(STEP_KNOBS), STEP_LEVELS + 1) ramp ends from training rows' RAW_COLUMNS: each knob's lowest
    value, then its distinct values above it (evenly thinned if there are more than STEP_LEVELS),
    +inf where a knob has fewer (such a ramp is always 0: a constant the scaler ignores)."""
    raw = np.asarray(raw, dtype=np.float64)
    levels = np.full((len(STEP_KNOBS), STEP_LEVELS + 1), np.inf)
    for i, knob in enumerate(STEP_KNOBS):
        values = np.unique(raw[:, RAW_COLUMNS.index(knob)])
        above = values[1:]
        if len(above) > STEP_LEVELS:
            above = above[np.linspace(0, len(above) - 1, STEP_LEVELS).round().astype(int)]
        levels[i, 0] = values[0]
        levels[i, 1: 1 + len(above)] = above
    return levels


def features_from_raw(raw: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """FEATURES (N, F) float32 from RAW_COLUMNS values (N, 6), tier as an index, and the step ramps'
    ends (`knob_levels` of the training rows)."""
    raw = np.asarray(raw, dtype=np.float64)
    vision, text, crops, tier, top_k, blocks = (raw[:, j] for j in range(len(RAW_COLUMNS)))
    tokens = vision + text
    out = np.empty((len(raw), len(FEATURES)), dtype=np.float32)  # filled column by column: no float64 copy
    # log1p keeps zero counts finite; the scaler takes care of the offsets.
    for j, values in enumerate((vision, text, crops, tier, top_k, blocks, blocks * top_k, blocks * tokens,
                                np.log1p(vision), np.log1p(tokens), np.log1p(top_k), np.log1p(blocks))):
        out[:, j] = values
    j = FEATURES.index(f"{STEP_KNOBS[0]}_step_1")
    for knob_values, ends in zip((top_k, blocks), np.asarray(levels, dtype=np.float64)):
        for low, high in zip(ends[:-1], ends[1:]):
            out[:, j] = np.clip((knob_values - low) / (high - low), 0.0, 1.0) if np.isfinite(high) else 0.0
            j += 1
    out[:, j] = tier >= 1
    out[:, j + 1] = tier >= 2
    return out


def feature_matrix(df: pd.DataFrame, levels: np.ndarray) -> np.ndarray:
    """FEATURES (N, F) float32 of every row of `df` (needs RAW_COLUMNS), step-ramp ends `levels`."""
    return features_from_raw(raw_matrix(df), levels)


def add_total(pred: pd.DataFrame, df_configs: pd.DataFrame) -> pd.DataFrame:
    """Add T_total_ms (and _p90 where the components have one) from output_tokens, if given:
    vision + prefill + max(output_tokens - 1, 0) * decode_per_token (the first token comes from prefill)."""
    if "output_tokens" not in df_configs:
        return pred
    steps = np.maximum(df_configs["output_tokens"].to_numpy(dtype=np.float64) - 1, 0)
    pred["T_total_ms"] = pred["T_vision_ms"] + pred["T_prefill_ms"] + steps * pred["T_decode_per_token_ms"]
    if "T_vision_ms_p90" in pred:
        pred["T_total_ms_p90"] = pred["T_vision_ms_p90"] + pred["T_prefill_ms_p90"] + steps * pred["T_decode_per_token_ms_p90"]
    return pred
