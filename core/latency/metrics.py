"""Error metrics of a latency estimator, per latency component.

Components and their short names (used in every metric name):
  vision  T_vision_ms             prefill  T_prefill_ms
  decode  T_decode_per_token_ms   total    T_total_ms  (vision + prefill + (output_tokens - 1) * decode)

Truth and prediction are two frames of the same length whose rows correspond (checked, never
aligned by index or broadcast). Decode per token is undefined for rows without a decode forward
(output_tokens <= 1, stored as 0 ms), so those rows are left out of the decode metrics; MAPE and
within10 are taken over rows with a positive truth only.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from core.knobs import KNOBS, TIERS
from core.timing import PREDICTED_COMPONENTS

# The predicted components plus the end-to-end total a latency budget is checked against.
COMPONENTS: dict[str, str] = {**PREDICTED_COMPONENTS, "total": "T_total_ms"}
METRICS: tuple[str, ...] = ("mae", "rmse", "mape", "r2", "within10")
WITHIN_FRACTION = 0.10


def component_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Point-prediction errors of one component.

    In: y_true, y_pred (N,) in ms. Out: {mae (ms), rmse (ms), mape (%, over rows with truth > 0),
    r2 (nan for a constant truth unless the fit is exact), within10 (share of rows with truth > 0
    and |pred - truth| <= 10% of truth), n (rows)}. All nan when N = 0.
    """
    y_true, y_pred = np.asarray(y_true, dtype=float).ravel(), np.asarray(y_pred, dtype=float).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        return {**{m: float("nan") for m in METRICS}, "n": 0}
    error = y_pred - y_true
    positive = y_true > 0
    rel = np.abs(error[positive]) / y_true[positive]
    ss_res = float(np.sum(error**2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mape": float(100 * rel.mean()) if len(rel) else float("nan"),
        "r2": 1.0 if ss_res == 0 else (1 - ss_res / ss_tot if ss_tot > 0 else float("nan")),
        # A hair of slack so that an error of exactly 10% counts despite float rounding.
        "within10": float(np.mean(rel <= WITHIN_FRACTION + 1e-12)) if len(rel) else float("nan"),
        "n": int(len(y_true)),
    }


def mean_over_components(metrics: Mapping[str, float], name: str) -> float:
    """Mean of `<name>_<component>` over the predicted components (vision, prefill, decode), skipping
    non-finite values (decode is nan on a set of one-token answers); nan when none is finite.

    One figure across components of very different sizes: e.g. `test_mape_mean` (promotion) and
    `val_rel_error_mean` (the tuning objective)."""
    finite = [v for v in (metrics[f"{name}_{short}"] for short in PREDICTED_COMPONENTS) if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _check_frames(df_true: pd.DataFrame, df_pred: pd.DataFrame) -> None:
    if len(df_true) != len(df_pred):
        raise ValueError(f"df_true has {len(df_true)} rows but df_pred has {len(df_pred)}; rows must correspond")


def _component_rows(df_true: pd.DataFrame, short: str) -> np.ndarray:
    """Boolean mask of rows on which component `short` is defined."""
    if short == "decode" and "output_tokens" in df_true:
        return df_true["output_tokens"].to_numpy() > 1
    if short == "decode":
        return df_true[COMPONENTS["decode"]].to_numpy() > 0
    return np.ones(len(df_true), dtype=bool)


def evaluate_components(df_true: pd.DataFrame, df_pred: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    """All point metrics of every component both frames carry.

    In: df_true (latency columns; `output_tokens` if present masks decode), df_pred (the estimator's
    predict_frame output for the same rows, same order), a prefix such as 'test_', 'heldout_config_'
    or 'baseline_linear_test_'. Out: {<prefix><metric>_<component>} for metric in mae, rmse, mape,
    r2, within10 and component in vision, prefill, decode, total (total only when both frames have
    T_total_ms), plus <prefix>within10 = within10_total (the end-to-end figure a budget is checked
    against; within10_prefill when total is missing) and <prefix>n (rows compared).
    """
    _check_frames(df_true, df_pred)
    out: dict[str, float] = {}
    for short, column in COMPONENTS.items():
        if column not in df_true or column not in df_pred:
            continue
        rows = _component_rows(df_true, short)
        figures = component_metrics(df_true[column].to_numpy()[rows], df_pred[column].to_numpy()[rows])
        for metric in METRICS:
            out[f"{prefix}{metric}_{short}"] = figures[metric]
    out[f"{prefix}within10"] = out.get(f"{prefix}within10_total", out.get(f"{prefix}within10_prefill", float("nan")))
    out[f"{prefix}n"] = float(len(df_true))
    return out


def quantile_coverage(df_true: pd.DataFrame, df_pred: pd.DataFrame, prefix: str = "", suffix: str = "_p90") -> dict[str, float]:
    """Share of rows whose truth lies at or below the predicted upper quantile, per component.

    Use single-run rows as the truth here (the guardrail bounds one run, not a median); a
    calibrated P90 head gives about 0.9. Out: {<prefix>p90_coverage_<component>}.
    """
    _check_frames(df_true, df_pred)
    out: dict[str, float] = {}
    label = suffix.lstrip("_")
    for short, column in COMPONENTS.items():
        if column not in df_true or f"{column}{suffix}" not in df_pred:
            continue
        rows = _component_rows(df_true, short)
        truth = df_true[column].to_numpy()[rows]
        bound = df_pred[f"{column}{suffix}"].to_numpy()[rows]
        out[f"{prefix}{label}_coverage_{short}"] = float(np.mean(truth <= bound)) if len(truth) else float("nan")
    return out


def per_config_table(df_true: pd.DataFrame, df_pred: pd.DataFrame) -> pd.DataFrame:
    """Errors per knob config.

    In: df_true with tier, top_k, num_active_blocks and latency columns; df_pred row-aligned.
    Out: one row per config (tier order low->high, then top_k, blocks) with n and, per component
    present, mae_<component> (ms) and mape_<component> (%).
    """
    _check_frames(df_true, df_pred)
    missing = [k for k in KNOBS if k not in df_true]
    if missing:
        raise ValueError(f"df_true lacks knob column(s) {missing}")
    frame = df_true[list(KNOBS)].reset_index(drop=True).copy()
    shorts = [s for s, c in COMPONENTS.items() if c in df_true and c in df_pred]
    for short in shorts:
        column = COMPONENTS[short]
        truth, pred = df_true[column].to_numpy(dtype=float), df_pred[column].to_numpy(dtype=float)
        rows = _component_rows(df_true, short)
        abs_err = np.where(rows, np.abs(pred - truth), np.nan)
        frame[f"_abs_{short}"] = abs_err
        frame[f"_ape_{short}"] = np.where(rows & (truth > 0), 100 * abs_err / np.where(truth > 0, truth, 1), np.nan)
    grouped = frame.groupby(list(KNOBS), sort=False)
    table = grouped.size().rename("n").to_frame()
    for short in shorts:
        table[f"mae_{short}"] = grouped[f"_abs_{short}"].mean()
        table[f"mape_{short}"] = grouped[f"_ape_{short}"].mean()
    table = table.reset_index()
    tier_rank = {t: i for i, t in enumerate(TIERS)}  # tiers low -> high, not alphabetically
    order = table["tier"].map(tier_rank).fillna(len(tier_rank))
    return (
        table.assign(_tier=order).sort_values(["_tier", *KNOBS[1:]]).drop(columns="_tier").reset_index(drop=True)
    )


def _median_of_the_others(group_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For every row, the median of the other rows of its group (vectorised; groups of >= 2 rows)."""
    order = np.lexsort((values, group_ids))
    g, v = group_ids[order], values[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, len(g)])
    start = np.repeat(starts, sizes)
    n = np.repeat(sizes, sizes)
    rank = np.arange(len(g)) - start
    m = n - 1  # the others, still sorted once row `rank` is taken out

    def nth_other(j: np.ndarray) -> np.ndarray:
        return v[start + np.where(j < rank, j, j + 1)]

    lower, upper = nth_other((m - 1) // 2), nth_other(m // 2)
    out = np.empty(len(g))
    out[order] = (lower + upper) / 2
    return out


def _leave_one_out_references(
    frame: pd.DataFrame, group_columns: Sequence[str], short: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(group ids, values, median of the other rows of the same group) for component `short`, over
    the rows where it is defined and whose group has at least two; None when the column is absent."""
    column = COMPONENTS[short]
    if column not in frame:
        return None
    group_ids = frame.groupby(list(group_columns), sort=False).ngroup().to_numpy()
    rows = _component_rows(frame, short)
    ids, values = group_ids[rows], frame[column].to_numpy(dtype=float)[rows]
    repeated = np.bincount(ids)[ids] > 1 if len(ids) else np.zeros(0, dtype=bool)
    ids, values = ids[repeated], values[repeated]
    if len(ids) == 0:
        return ids, values, values
    return ids, values, _median_of_the_others(ids, values)


def run_to_run_noise(df_rows: pd.DataFrame, group_columns: tuple[str, ...] = ("sample_id", *KNOBS)) -> dict[str, float]:
    """How noisy the repeats are: the floor any estimator meets.

    In: a profiling table with several run_index per (sample, config). Out, per component:
    noise_cv_<c> (median over groups of the repeats' coefficient of variation, as
    core.timing.coefficient_of_variation defines it: sample std, ddof 1, over the mean) and noise_mape_<c>
    (mean over rows of |run - median of the other runs of its group| / that median, in %: roughly
    what a perfect per-group predictor scores against single runs). Groups of one run are skipped.
    """
    out: dict[str, float] = {}
    for short in COMPONENTS:
        pairs = _leave_one_out_references(df_rows, group_columns, short)
        if pairs is None:
            continue
        ids, values, reference = pairs
        if len(values) == 0:
            out[f"noise_cv_{short}"] = out[f"noise_mape_{short}"] = float("nan")
            continue
        # Vectorised core.timing.coefficient_of_variation (ddof 1) per group; groups with a mean of 0 are left out.
        grouped = pd.Series(values).groupby(ids)
        mean, std = grouped.mean(), grouped.std(ddof=1)
        out[f"noise_cv_{short}"] = float((std[mean > 0] / mean[mean > 0]).median())
        ok = reference > 0
        out[f"noise_mape_{short}"] = float(100 * np.mean(np.abs(values[ok] - reference[ok]) / reference[ok]))
    return out

FEATURE_GROUP_COLUMNS: tuple[str, ...] = (*KNOBS, "vision_tokens", "text_tokens")


def feature_twin_mape(truth: pd.DataFrame, group_columns: tuple[str, ...] = FEATURE_GROUP_COLUMNS) -> dict[str, float]:
    """A reference MAPE, not a lower bound: each row predicted from its feature twins.

    In: one row per (sample, config) with run-median latencies (`core.latency.data.aggregate_runs`). Rows
    with equal knobs and token counts are twins; predicting each from the median of its *other* twins
    gives feature_twin_mape_<c> (in %); groups of one row are skipped. It is no floor (it was once
    called one): the groups leave out output_tokens, and a median of a few noisy twins is itself noisy,
    so an estimator that pools over all rows can beat it (the test rows' run-to-run noise, test_noise_*,
    is the measured noise between runs).
    """
    missing = [c for c in group_columns if c not in truth]
    if missing:
        raise ValueError(f"field(s) {missing} missing: cannot group rows by their features")
    out: dict[str, float] = {}
    for short in COMPONENTS:
        pairs = _leave_one_out_references(truth, group_columns, short)
        if pairs is None:
            continue
        _, values, reference = pairs
        ok = values > 0
        out[f"feature_twin_mape_{short}"] = (float(100 * np.mean(np.abs(values[ok] - reference[ok]) / values[ok]))
                                      if ok.any() else float("nan"))
    return out
