"""The yardsticks every controller is compared with, scored by the same code (core.control.scoring).

Each returns a *decisions* frame: one row per (held-out sample, budget fraction) with the knobs
chosen (sample_id, dataset, fraction, tier, top_k, num_active_blocks, plus what the method knew):

  static_full   the full config whatever the budget
  lookup        one static config per budget (per data set if told it): the most accurate whose
                `quantile` of measured T_total on the calibration part fits B (`lookup_table`)
  oracle        per sample, the most accurate config whose measured runs on that very sample fit B
                in >= 97% of runs: an upper bound that respects the same adherence, not a method

A config chosen at its median latency misses the budget in half of its runs, so the lookup and the
oracle both demand a high share of fitting runs: the margin is what the experiment measures.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from core.control.budgets import check_fractions
from core.control.measured import check_measured_table, samples_of
from core.knobs import KNOBS, TIERS, KnobConfig

DECISION_COLUMNS: tuple[str, ...] = ("sample_id", "dataset", "fraction", *KNOBS)
ALL_DATASETS = "all"  # the `dataset` of a lookup table learned over every data set
# Equal accuracy and latency: the cheaper config (lower tier, fewer experts, fewer blocks) wins.
_CHEAPEST_FIRST = ("tier_rank", "top_k", "num_active_blocks")
# Means of the same scores summed in another order differ in the last bits: compare them rounded.
_TIE_DECIMALS = 9


def _check_share(value: float, parameter: str) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"parameter {parameter} must lie in (0, 1], got {value}")


def _with_tier_rank(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(tier_rank=frame["tier"].map({t: i for i, t in enumerate(TIERS)}))


def static_full(heldout: pd.DataFrame, full: KnobConfig, fractions: Sequence[float]) -> pd.DataFrame:
    """The full config for every held-out sample and budget."""
    samples = samples_of(heldout)
    fractions = check_fractions(fractions, "fractions")
    return pd.DataFrame(
        [{"sample_id": s, "dataset": d, "fraction": f, **full.as_dict()}
         for f in fractions for s, d in samples.itertuples(index=False)],
        columns=list(DECISION_COLUMNS),
    )


def lookup_table(
    table: pd.DataFrame, l_full: float, fractions: Sequence[float], quantile: float = 0.97, by_dataset: bool = False
) -> pd.DataFrame:
    """Per data set (or "all") and fraction f, the static config of highest mean accuracy among those whose
    `quantile` of measured T_total_ms over the table's rows (all samples, all runs) is <= f x l_full;
    a tie goes to the lower quantile latency. Where nothing fits, the config of lowest quantile latency
    (so the method always answers) with fits=False.

    Columns: dataset, fraction, budget_ms, tier, top_k, num_active_blocks, accuracy, T_total_q_ms, fits.
    """
    fractions = check_fractions(fractions, "fractions")
    _check_share(quantile, "quantile")
    rows = table.assign(dataset=table["dataset"] if by_dataset else ALL_DATASETS)
    per_config = rows.groupby(["dataset", *KNOBS], sort=True).agg(accuracy=("accuracy", "mean"))
    per_config["T_total_q_ms"] = rows.groupby(["dataset", *KNOBS], sort=True)["T_total_ms"].quantile(quantile)
    per_config = _with_tier_rank(per_config.reset_index())
    per_config["accuracy_key"] = per_config["accuracy"].round(_TIE_DECIMALS)
    out = []
    for dataset, part in per_config.groupby("dataset", sort=True):
        for fraction in fractions:
            budget_ms = fraction * l_full
            fitting = part[part["T_total_q_ms"] <= budget_ms]
            if len(fitting):
                best = fitting.sort_values(["accuracy_key", "T_total_q_ms", *_CHEAPEST_FIRST],
                                           ascending=[False, True, True, True, True]).iloc[0]
            else:
                best = part.sort_values(["T_total_q_ms", "accuracy_key", *_CHEAPEST_FIRST],
                                        ascending=[True, False, True, True, True]).iloc[0]
            out.append({"dataset": dataset, "fraction": fraction, "budget_ms": budget_ms,
                        **{k: best[k] for k in KNOBS}, "accuracy": float(best["accuracy"]),
                        "T_total_q_ms": float(best["T_total_q_ms"]), "fits": bool(len(fitting))})
    return pd.DataFrame(out, columns=["dataset", "fraction", "budget_ms", *KNOBS, "accuracy", "T_total_q_ms", "fits"])


def lookup(
    calibration: pd.DataFrame, heldout: pd.DataFrame, l_full: float, fractions: Sequence[float],
    quantile: float = 0.97, by_dataset: bool = False,
) -> pd.DataFrame:
    """The lookup yardstick's decisions for the held-out samples: the `lookup_table` of the calibration
    part, read by fraction (and, with `by_dataset`, by the held-out sample's own data set: the per-data-set
    lookup is told the data set). Decision columns plus `fits`."""
    check_measured_table(calibration, "calibration table")
    table = lookup_table(calibration, l_full, fractions, quantile=quantile, by_dataset=by_dataset)
    samples = samples_of(check_measured_table(heldout, "held-out table"))
    if by_dataset:
        unknown = sorted(set(samples["dataset"]) - set(table["dataset"]))
        if unknown:
            raise ValueError(f"field dataset: held-out data set {unknown[0]} has no sample in the calibration part")
        decisions = samples.merge(table, on="dataset")
    else:
        decisions = samples.merge(table.drop(columns="dataset"), how="cross")
    return (decisions[[*DECISION_COLUMNS, "fits"]]
            .sort_values(["fraction", "sample_id"], kind="stable").reset_index(drop=True))


def oracle(heldout: pd.DataFrame, l_full: float, fractions: Sequence[float], adherence: float = 0.97) -> pd.DataFrame:
    """Per held-out sample and fraction, the config of highest accuracy on that sample (mean over its runs)
    among those whose measured runs on that sample fit B = f x l_full in >= `adherence` of runs; a tie
    goes to the faster (median T_total). Where none fits, the config with the highest share of fitting
    runs (then the faster), with feasible=False.

    Decision columns plus accuracy, T_total_median_ms, fit_share and feasible.
    """
    check_measured_table(heldout, "held-out table")
    fractions = check_fractions(fractions, "fractions")
    _check_share(adherence, "adherence")
    fit_columns = [f"fits_{i}" for i in range(len(fractions))]
    runs = heldout.assign(**{c: heldout["T_total_ms"] <= f * l_full for c, f in zip(fit_columns, fractions)})
    per_config = runs.groupby(["sample_id", *KNOBS], sort=True).agg(
        dataset=("dataset", "first"), accuracy=("accuracy", "mean"), T_total_median_ms=("T_total_ms", "median"),
        **{c: (c, "mean") for c in fit_columns})
    per_config = _with_tier_rank(per_config.reset_index())
    out = []
    for fraction, fit_column in zip(fractions, fit_columns):
        scored = per_config.assign(fit_share=per_config[fit_column])
        # A tolerance so that 97 fitting runs of 100 count as 0.97 whatever the float rounding.
        scored["feasible"] = scored["fit_share"] >= adherence - 1e-9
        # Feasible configs first, ranked by accuracy; the others by their share of fitting runs.
        scored["rank_score"] = np.where(scored["feasible"], scored["accuracy"], scored["fit_share"]).round(_TIE_DECIMALS)
        best = (scored.sort_values(["sample_id", "feasible", "rank_score", "T_total_median_ms", *_CHEAPEST_FIRST],
                                   ascending=[True, False, False, True, True, True, True])
                .drop_duplicates("sample_id"))
        out.append(best.assign(fraction=fraction))
    columns = [*DECISION_COLUMNS, "accuracy", "T_total_median_ms", "fit_share", "feasible"]
    return pd.concat(out, ignore_index=True)[columns]
