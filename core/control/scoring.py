"""One scorer for every controller and yardstick on the held-out part of a measured table.

A method hands in a *decisions* frame (one row per held-out sample and budget fraction: sample_id,
fraction, tier, top_k, num_active_blocks); each decision is replayed against the measured runs of
that sample at that config. Per budget fraction f, named by its percent p of L_full:

  test_accuracy_at_<p>      mean over samples of the chosen config's accuracy on the sample (mean over runs)
  test_adherence_at_<p>     share of (sample, run) pairs whose measured per-run T_total_ms <= B (never medians)
  test_latency_mean_at_<p>  mean measured T_total_ms over those pairs
  test_oracle_share_at_<p>  accuracy over the oracle's accuracy at that f
  test_infeasible_at_<p>    samples where no config fits B in >= 97% of its runs (the oracle's feasible=False)

and the summaries `test_accuracy_auc` (mean accuracy over the EVAL_FRACTIONS scored) and
`test_adherence_min` (lowest adherence over the budgets where the oracle's own adherence is >= 0.97:
a budget even the oracle cannot keep fails every method and is left out). The same names follow per
data set with a `_<dataset>` suffix, and a `prefix` names the method (`lookup_dataset_test_accuracy_at_70`).

Infeasible samples stay in every method's figures with their measured runs: no config fits B in 97%
of runs there, so whatever a method picks exceeds B in more than 3% of those runs, and the sample
weighs on every method's adherence alike; `test_infeasible_at_<p>` says how many there are.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from core.control.budgets import EVAL_FRACTIONS, budget_percent, check_fractions
from core.control.measured import check_measured_table, samples_of
from core.knobs import KNOBS
from core.profiling.summaries import knob_order

# The adherence a budget must allow (the oracle reaches it) before it counts in test_adherence_min.
ADHERENCE_TARGET = 0.97
DECISION_ROW_COLUMNS: tuple[str, ...] = (
    "sample_id", "dataset", "fraction", *KNOBS, "run_index", "T_total_ms", "budget_ms", "within_budget", "accuracy")


def _check_decisions(decisions: pd.DataFrame, fractions: Sequence[float], samples: pd.DataFrame) -> pd.DataFrame:
    """One decision per held-out (sample, fraction), knobs typed; ValueError naming the first gap."""
    missing = [c for c in ("sample_id", "fraction", *KNOBS) if c not in decisions.columns]
    if missing:
        raise ValueError(f"decisions: field {missing[0]} missing")
    # Budgets are matched by their metric name, so 0.7 and 0.7000000001 are the same budget.
    decided = decisions.drop(columns=["dataset"], errors="ignore").assign(
        budget=decisions["fraction"].map(budget_percent), sample_id=decisions["sample_id"].astype(str))
    wanted = samples.merge(pd.DataFrame({"fraction": list(fractions), "budget": [budget_percent(f) for f in fractions]}),
                           how="cross")
    decided = decided[decided["budget"].isin(wanted["budget"]) & decided["sample_id"].isin(wanted["sample_id"])]
    twice = decided.duplicated(["sample_id", "budget"])
    if twice.any():
        first = decided[twice].iloc[0]
        raise ValueError(f"decisions: sample {first['sample_id']} at fraction {first['fraction']} is decided twice")
    chosen = wanted.merge(decided.drop(columns="fraction"), on=["sample_id", "budget"], how="left", indicator=True)
    gap = (chosen["_merge"] == "left_only") | chosen[list(KNOBS)].isna().any(axis=1)
    if gap.any():
        first = chosen[gap].iloc[0]
        raise ValueError(f"decisions: no config for held-out sample {first['sample_id']} at fraction {first['fraction']}")
    return chosen.drop(columns=["_merge", "budget"]).astype({"tier": str, "top_k": "int64", "num_active_blocks": "int64"})


def decision_rows(
    decisions: pd.DataFrame, heldout: pd.DataFrame, l_full: float, fractions: Sequence[float] | None = None
) -> pd.DataFrame:
    """Every decision replayed on the measured runs: one row per (held-out sample, fraction, run) with the
    chosen knobs, that run's T_total_ms, budget_ms, within_budget and accuracy (the CSV of every decision;
    other columns of `decisions`, such as fits or feasible, come along).

    `fractions` defaults to those in `decisions`. ValueError (one line) for a bad held-out table or L_full,
    a held-out (sample, fraction) without a decision, or a decision naming a config absent from the table
    for that sample.
    """
    check_measured_table(heldout, "held-out table")
    if not (math.isfinite(l_full) and l_full > 0):
        raise ValueError(f"parameter l_full must be a finite latency > 0 ms, got {l_full}")
    fractions = check_fractions(fractions if fractions is not None else decisions["fraction"].drop_duplicates(), "fractions")
    chosen = _check_decisions(decisions, fractions, samples_of(heldout))
    runs = heldout[["sample_id", *KNOBS, "run_index", "T_total_ms", "accuracy"]].astype({"sample_id": str})
    rows = chosen.merge(runs, on=["sample_id", *KNOBS], how="left", suffixes=("_decided", ""))
    absent = rows["run_index"].isna()
    if absent.any():
        first = rows[absent].iloc[0]
        config = "-".join(str(first[k]) for k in KNOBS)
        raise ValueError(f"decisions: config {config} is absent from the table for sample {first['sample_id']} "
                         f"(fraction {first['fraction']})")
    rows["budget_ms"] = rows["fraction"] * l_full
    rows["within_budget"] = rows["T_total_ms"] <= rows["budget_ms"]
    extras = [c for c in rows.columns if c not in DECISION_ROW_COLUMNS]
    return rows[[*DECISION_ROW_COLUMNS, *extras]].astype({"run_index": "int64"}).reset_index(drop=True)


def _per_fraction(rows: pd.DataFrame) -> pd.DataFrame:
    """Per fraction (index, in the rows' order): accuracy (mean over samples of the per-sample mean over
    runs), adherence and latency_mean (over (sample, run) pairs), and infeasible (samples whose decision
    says feasible=False; 0 without that column)."""
    by_fraction = rows.groupby("fraction", sort=False)
    per_sample = rows.groupby(["fraction", "sample_id"], sort=False)
    if "feasible" in rows:
        infeasible = (~per_sample["feasible"].first().astype(bool)).groupby(level="fraction", sort=False).sum()
    else:
        infeasible = by_fraction.size() * 0
    return pd.DataFrame({
        "accuracy": per_sample["accuracy"].mean().groupby(level="fraction", sort=False).mean(),
        "adherence": by_fraction["within_budget"].mean(),
        "latency_mean": by_fraction["T_total_ms"].mean(),
        "infeasible": infeasible,
    })


def _figures(method: pd.DataFrame, reference: pd.DataFrame, prefix: str, suffix: str) -> dict[str, float]:
    """The metrics of one method (a `_per_fraction` frame) against the oracle's (`reference`)."""
    out: dict[str, float] = {}
    for fraction, row in method.iterrows():
        p = budget_percent(fraction)
        oracle_accuracy = reference.at[fraction, "accuracy"]
        out[f"{prefix}test_accuracy_at_{p}{suffix}"] = float(row["accuracy"])
        out[f"{prefix}test_adherence_at_{p}{suffix}"] = float(row["adherence"])
        out[f"{prefix}test_latency_mean_at_{p}{suffix}"] = float(row["latency_mean"])
        out[f"{prefix}test_oracle_share_at_{p}{suffix}"] = (
            float(row["accuracy"] / oracle_accuracy) if oracle_accuracy > 0 else math.nan)
        out[f"{prefix}test_infeasible_at_{p}{suffix}"] = float(reference.at[fraction, "infeasible"])
    evaluated = [f for f in method.index if any(math.isclose(f, e) for e in EVAL_FRACTIONS)]
    out[f"{prefix}test_accuracy_auc{suffix}"] = float(method.loc[evaluated, "accuracy"].mean()) if evaluated else math.nan
    # A tolerance so that an oracle adherence of exactly 97% counts whatever the float rounding.
    keepable = [f for f in method.index if reference.at[f, "adherence"] >= ADHERENCE_TARGET - 1e-9]
    out[f"{prefix}test_adherence_min{suffix}"] = float(method.loc[keepable, "adherence"].min()) if keepable else math.nan
    return out


def score_decisions(
    decisions: pd.DataFrame, heldout: pd.DataFrame, l_full: float, oracle_decisions: pd.DataFrame, prefix: str = ""
) -> dict[str, float]:
    """The metrics of a method's decisions on the held-out table, overall and per data set (module doc).

    The budgets scored are those of `oracle_decisions` (the `core.control.yardsticks.oracle` of the same
    held-out table and fractions, which carries `feasible`); `prefix` names the method ("" for a
    controller, "lookup_dataset_" ...). ValueError (one line) for a missing decision or an absent config.
    """
    if "feasible" not in oracle_decisions.columns:
        raise ValueError("oracle decisions: field feasible missing")
    fractions = check_fractions(oracle_decisions["fraction"].drop_duplicates(), "fractions")
    rows = decision_rows(decisions, heldout, l_full, fractions)
    reference_rows = decision_rows(oracle_decisions, heldout, l_full, fractions)
    out = _figures(_per_fraction(rows), _per_fraction(reference_rows), prefix, "")
    for dataset in sorted(rows["dataset"].unique()):
        out.update(_figures(_per_fraction(rows[rows["dataset"] == dataset]),
                            _per_fraction(reference_rows[reference_rows["dataset"] == dataset]), prefix, f"_{dataset}"))
    return out


def knob_distribution(decisions: pd.DataFrame) -> pd.DataFrame:
    """Share of each option of each knob among the decisions, per fraction.

    Columns: fraction, knob, option (as text: tier names, numbers), share; options cheapest first.
    """
    out = []
    for fraction, part in decisions.groupby("fraction", sort=True):
        for knob in KNOBS:
            shares = part[knob].value_counts(normalize=True)
            out += [{"fraction": fraction, "knob": knob, "option": str(option), "share": float(shares[option])}
                    for option in knob_order(part, knob)]
    return pd.DataFrame(out, columns=["fraction", "knob", "option", "share"])
