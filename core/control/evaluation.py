"""Every method on the held-out part of a measured table, scored by the one scorer (core.control.scoring).

  controller_decisions   a LearnedController's decisions for every held-out sample and budget fraction
  yardstick_decisions    static_full, lookup, lookup_dataset and oracle (core.control.yardsticks)
  evaluate_methods       metrics of every method (prefixed), per-fraction curves for the plots, the knob
                         distribution per budget and every decision replayed on the measured runs
  knob_label_accuracy    the seed's secondary figures: how often a method's knobs equal the oracle's
  measured_setup         a measured table made ready: checked, split 70/30 by sample, L_full, the fractions
  table_features         the controller features of a measured table's samples, rebuilt by id (suite or data_root)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from core.control.budgets import EVAL_FRACTIONS, budget_percent, check_fractions, full_latency_ms
from core.control.decision import ControllerError, LearnedController, check_space
from core.control.measured import CalibrationSplit, check_measured_table, samples_of, split_calibration
from core.control.scoring import decision_rows, knob_distribution, score_decisions
from core.control.yardsticks import DECISION_COLUMNS, lookup, oracle, static_full
from core.knobs import KNOBS, KnobConfig, KnobSpace
from core.vlm.backend import StagedVLM

ORACLE_PREFIX = "oracle_"
CALIBRATION_FRACTION = 0.7  # issue 14: 70% of a measured table's samples calibrate, 30% are held out
YARDSTICK_PREFIXES: tuple[str, ...] = ("static_full_", "lookup_", "lookup_dataset_", ORACLE_PREFIX)


def controller_decisions(controller: LearnedController, features: pd.DataFrame, heldout: pd.DataFrame, l_full: float,
                         fractions: Sequence[float]) -> pd.DataFrame:
    """Per held-out sample and fraction f, the controller's decision at B = f x l_full, from the sample's
    row of `features` (the samples-frame columns). Decision columns plus fits and T_total_upper_ms.

    ControllerError (one line) when the table's knob options are not the controller's or a sample lacks features.
    """
    check_space(controller.options, heldout, "measured table")
    fractions = check_fractions(fractions)
    samples = samples_of(heldout)
    by_id = features.assign(sample_id=features["sample_id"].astype(str)).drop_duplicates("sample_id").set_index("sample_id")
    absent = [s for s in samples["sample_id"] if s not in by_id.index]
    if absent:
        raise ControllerError(f"features: held-out sample {absent[0]} has no features")
    requests = by_id.loc[samples["sample_id"]].reset_index()
    controller.check(requests, "features")
    # One decision call for every (sample, fraction): the rule is vectorised over requests.
    stacked = pd.concat([requests] * len(fractions), ignore_index=True)
    budget_ms = np.repeat(np.asarray(fractions, dtype=np.float64) * l_full, len(requests))
    decided = controller.decide(stacked, budget_ms)
    out = pd.concat([samples] * len(fractions), ignore_index=True).assign(fraction=np.repeat(fractions, len(requests)))
    return pd.concat([out, decided], axis=1)[[*DECISION_COLUMNS, "fits", "T_total_upper_ms"]]


def yardstick_decisions(calibration: pd.DataFrame, heldout: pd.DataFrame, l_full: float, full: KnobConfig,
                        fractions: Sequence[float], quantile: float = 0.97) -> dict[str, pd.DataFrame]:
    """{prefix: decisions} of the yardsticks, the lookups learned on the calibration part at `quantile`."""
    return {
        "static_full_": static_full(heldout, full, fractions),
        "lookup_": lookup(calibration, heldout, l_full, fractions, quantile=quantile),
        "lookup_dataset_": lookup(calibration, heldout, l_full, fractions, quantile=quantile, by_dataset=True),
        ORACLE_PREFIX: oracle(heldout, l_full, fractions, adherence=quantile),
    }


def knob_label_accuracy(decisions: pd.DataFrame, oracle_decisions: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    """Share of (sample, fraction) decisions equal to the oracle's: all three knobs, and each knob."""
    key = ["sample_id", "budget"]
    left = decisions.assign(sample_id=decisions["sample_id"].astype(str), budget=decisions["fraction"].map(budget_percent))
    right = oracle_decisions.assign(sample_id=oracle_decisions["sample_id"].astype(str),
                                    budget=oracle_decisions["fraction"].map(budget_percent))
    both = left[[*key, *KNOBS]].merge(right[[*key, *KNOBS]], on=key, suffixes=("", "_oracle"))
    same = {k: (both[k].astype(str) == both[f"{k}_oracle"].astype(str)).to_numpy() for k in KNOBS}
    out = {f"{prefix}test_knob_accuracy_all": float(np.logical_and.reduce(list(same.values())).mean())}
    out.update({f"{prefix}test_knob_accuracy_{k}": float(v.mean()) for k, v in same.items()})
    return out


@dataclass
class Evaluation:
    metrics: dict[str, float]
    curves: pd.DataFrame  # method, fraction, percent, accuracy, adherence, latency_mean, oracle_share
    distribution: pd.DataFrame  # method, fraction, knob, option, share
    rows: pd.DataFrame  # every decision replayed on the measured runs, with a method column


def evaluate_methods(methods: Mapping[str, pd.DataFrame], heldout: pd.DataFrame, l_full: float,
                     oracle_decisions: pd.DataFrame) -> Evaluation:
    """Score every method's decisions ({prefix: decisions}; "" for the controller) against the held-out runs."""
    metrics: dict[str, float] = {}
    curves, distributions, rows = [], [], []
    fractions = check_fractions(oracle_decisions["fraction"].drop_duplicates(), "fractions")
    for prefix, decisions in methods.items():
        scored = score_decisions(decisions, heldout, l_full, oracle_decisions, prefix=prefix)
        metrics.update(scored)
        if prefix != ORACLE_PREFIX:
            metrics.update(knob_label_accuracy(decisions, oracle_decisions, prefix))
        method = prefix.rstrip("_") or "controller"
        for f in fractions:
            p = budget_percent(f)
            curves.append({"method": method, "fraction": f, "percent": p,
                           **{m: scored[f"{prefix}test_{m}_at_{p}"] for m in ("accuracy", "adherence", "latency_mean",
                                                                            "oracle_share")}})
        distributions.append(knob_distribution(decisions).assign(method=method))
        rows.append(decision_rows(decisions, heldout, l_full, fractions).assign(method=method))
    distribution = pd.concat(distributions, ignore_index=True)
    return Evaluation(metrics, pd.DataFrame(curves), distribution[["method", *distribution.columns[:-1]]],
                      pd.concat(rows, ignore_index=True))


@dataclass
class MeasuredSetup:
    """A measured table ready for scoring: its calibration/held-out split, L_full and the fractions scored."""

    table: pd.DataFrame
    split: CalibrationSplit
    l_full: float
    full: KnobConfig
    fractions: tuple[float, ...]

    def as_params(self) -> dict[str, object]:
        return {"l_full_ms": round(self.l_full, 6), **self.split.as_params(),
                "budget_percents": ",".join(budget_percent(f) for f in self.fractions)}


def measured_setup(table: pd.DataFrame, source: str, space: KnobSpace, calibration_seed: int,
                   extra_fractions: Sequence[float] = ()) -> MeasuredSetup:
    """Check `table` (the measured-table gate, its knob options against `space`), split it by sample,
    take L_full from its full-config runs; the fractions are EVAL_FRACTIONS plus `extra_fractions`
    (each > 0). ValueError (one line naming `source`, the field or parameter) otherwise."""
    check_measured_table(table, source)
    check_space({"tier": list(space.tier_max_crops), "top_k": list(space.top_k_options),
                 "num_active_blocks": list(space.block_options)}, table, source, f"the base VLM's knob space {space.name!r}")
    extra = check_fractions(extra_fractions) if len(extra_fractions) else ()
    fractions = check_fractions([*EVAL_FRACTIONS, *(f for f in extra
                                                    if budget_percent(f) not in map(budget_percent, EVAL_FRACTIONS))])
    full = space.full()
    split = split_calibration(table, CALIBRATION_FRACTION, calibration_seed)
    return MeasuredSetup(table, split, full_latency_ms(table, full), full, fractions)


def table_features(backend: StagedVLM, table: pd.DataFrame, source: str, data_root: str = "") -> pd.DataFrame:
    """The controller features (core.control.data.sample_features) of every sample of a measured table,
    the samples rebuilt by id: from the VQA suite, or read from the real files under `data_root`.
    ValueError (one line) for an id neither can give or a question that differs from the table's (a
    table profiled on another suite version or other files)."""
    from core.control.data import sample_features
    from core.vqa.sources import samples_from_ids

    rows = table.astype({"sample_id": str}).drop_duplicates("sample_id").sort_values("sample_id")
    where = f"the real files under {data_root}" if data_root else "the suite"
    try:
        samples = samples_from_ids(list(rows["sample_id"]), data_root)
    except ValueError as exc:
        raise ControllerError(f"{source}: field sample_id: not a sample of {where} ({exc})") from None
    for sample, question in zip(samples, rows["question"] if "question" in rows else [None] * len(rows)):
        if question is not None and sample.question != question:
            raise ControllerError(f"{source}: sample {sample.sample_id} asks {question!r}, {where} now asks "
                                  f"{sample.question!r} (the table was profiled on other samples: profile it again)")
    return sample_features(backend, samples)
