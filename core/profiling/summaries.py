"""The small tables that summarise a profiling table (what the profile run logs and the plots draw).

  config_summary            one row per (dataset, config): median T_total_ms, mean accuracy, rows
  pareto_front              configs no other config beats on both latency and accuracy
  knob_step_effects         median paired change of a latency component per step of each knob
  medians_by_knob_option    median of each latency component per option of each knob
  run_to_run_cv             coefficient of variation over run_index per (sample, config)
  median_run_to_run_cv      its median per component (`median_cv_T_total_ms` is the T_total one)
  sweep_metrics             the run-level figures of one sweep over its table
  static_lookup_choices     per data set, the most accurate static config whose latency quantile fits
                            a budget of f x the full config's median T_total
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from core.control.budgets import full_latency_ms
from core.control.yardsticks import lookup_table
from core.knobs import KNOBS, TIERS, KnobConfig
from core.profiling.profiler import SweepSummary
from core.profiling.schema import LATENCY_COLUMNS
from core.timing import STAGE_COLUMNS


def knob_order(df: pd.DataFrame, knob: str) -> list:
    """The options of `knob` present in `df`, cheapest first (tiers in TIERS order, numbers ascending)."""
    values = df[knob].unique().tolist()
    return [t for t in TIERS if t in values] if knob == "tier" else sorted(values)


def config_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, config): median T_total_ms, mean accuracy, rows."""
    return (
        df.groupby(["dataset", *KNOBS], sort=True)
        .agg(T_total_ms=("T_total_ms", "median"), accuracy=("accuracy", "mean"), rows=("T_total_ms", "size"))
        .reset_index()
    )


def pareto_front(summary: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows of a `config_summary` no other row beats on both latency (lower) and
    accuracy (higher)."""
    order = summary.sort_values(["T_total_ms", "accuracy"], ascending=[True, False]).index
    best, mask = -np.inf, pd.Series(False, index=summary.index)
    for i in order:
        acc = summary.at[i, "accuracy"]
        if acc > best:
            mask.at[i], best = True, acc
    return mask


def knob_step_effects(df: pd.DataFrame, component: str = "T_total_ms") -> pd.DataFrame:
    """Median change of `component` per step of each knob, the other knobs and the sample held fixed.

    Rows: knob, step ('low->medium', '4->6', ...), delta_ms (median of paired differences), pairs.
    """
    out = []
    for knob in KNOBS:
        others = [k for k in KNOBS if k != knob]
        wide = df.pivot_table(index=["sample_id", "run_index", *others], columns=knob, values=component, aggfunc="median")
        order = knob_order(df, knob)
        for a, b in zip(order, order[1:]):
            diff = (wide[b] - wide[a]).dropna()
            out.append({"knob": knob, "step": f"{a}->{b}", "delta_ms": float(diff.median()) if len(diff) else np.nan,
                        "pairs": len(diff)})
    return pd.DataFrame(out)


def medians_by_knob_option(
    df: pd.DataFrame, components: Sequence[str] = LATENCY_COLUMNS
) -> dict[str, dict[str, dict[str, float]]]:
    """{knob: {option: {component: median ms}}} over all rows with that option, options cheapest first."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for knob in KNOBS:
        medians = df.groupby(knob)[list(components)].median().reindex(knob_order(df, knob))
        out[knob] = {str(option): {c: float(v) for c, v in row.items()} for option, row in medians.iterrows()}
    return out


def run_to_run_cv(df: pd.DataFrame, components: Sequence[str] = STAGE_COLUMNS) -> pd.DataFrame:
    """Coefficient of variation over run_index of each component per (sample, config), groups of >= 2 runs.

    The sample CV of `core.timing.coefficient_of_variation` (std with ddof 1, over the mean), vectorised;
    a non-positive mean gives NaN.
    """
    groups = df.groupby(["sample_id", *KNOBS], sort=True)[list(components)]
    mean, std, n = groups.mean(), groups.std(ddof=1), groups.size()
    return (std / mean.where(mean > 0)).loc[n >= 2].reset_index()


def median_run_to_run_cv(df: pd.DataFrame, components: Sequence[str] = STAGE_COLUMNS) -> pd.Series:
    """Median `run_to_run_cv` per component (index: component names; NaN without repeated runs)."""
    return run_to_run_cv(df, components)[list(components)].median()


def sweep_metrics(sweep: SweepSummary, table: pd.DataFrame, median_cv: pd.Series) -> dict[str, float]:
    """The figures of one sweep worker over the table it left: rows written, skipped (already there),
    planned (its shard's share) and in the table; the sweep's wall time; the median T_total_ms and, from
    `median_cv` (a `median_run_to_run_cv` of the table), its median run-to-run CV (NaN with one run per row)."""
    return {
        "rows_written": sweep.rows_written, "rows_skipped": sweep.rows_skipped, "rows_planned": sweep.rows_planned,
        "rows_total": len(table), "sweep_wall_time_s": sweep.wall_time_s,
        "median_cv_T_total_ms": float(median_cv.get("T_total_ms", np.nan)),
        "median_T_total_ms": float(table["T_total_ms"].median()),
    }


def static_lookup_choices(
    df: pd.DataFrame, full: Sequence[object], fractions: Sequence[float] = (0.6, 0.7, 0.8, 0.9), quantile: float = 0.95
) -> pd.DataFrame:
    """The lookup-table yardstick read off a profiling table, per data set and budget fraction f.

    B = f x L_full, L_full the median T_total_ms of the `full` config (tier, top_k, blocks) over the
    whole table; the choice is the config of highest mean accuracy (fewer ms breaks a tie) among those
    whose `quantile` of T_total_ms over the data set's rows is within B; where nothing fits, the config
    of lowest quantile latency with fits=False (`core.control.yardsticks.lookup_table`, by data set).
    Rows: dataset, fraction, budget_ms, the three knobs, accuracy, T_total_q_ms, fits.
    """
    l_full = full_latency_ms(df, KnobConfig(*full))  # type: ignore[arg-type]
    return lookup_table(df, l_full, fractions, quantile=quantile, by_dataset=True)
