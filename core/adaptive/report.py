"""What an adaptive-inference run reports, from its per-request rows.

Rows (one per answered request) carry: method ("adaptive", "static_full", "lookup"), fraction (the
budget as a share of the measured L_full), phase ("all", or "before" / "during" / "after" the
background load), calibration ("on" / "off"), dataset, accuracy, T_total_ms, budget_ms and, for the
adaptive method, intervened, fits and overhead_ms.

Metric names, per method m, budget percent p ("fixed" for a budget in ms) and phase:
  <m>_accuracy_at_<p>, <m>_adherence_at_<p> (share of requests with T_total_ms <= budget_ms),
  <m>_latency_p50_ms_at_<p> / _p95_ / _p99_; for the adaptive method also
  adaptive_interventions_at_<p> (guardrail step-downs per request), adaptive_unfit_at_<p>, and over the
  whole run adaptive_overhead_ms_mean / _p50 / _p99;
  contention runs: contention_<calibration>_<metric>_<phase> (e.g. contention_on_adherence_during);
  on a measured table's held-out requests, the replay of the same controller on the same samples:
  replay_accuracy_at_<p>, replay_adherence_at_<p>, adaptive_minus_replay_accuracy_at_<p>,
  adaptive_replay_agreement_at_<p>.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.control.budgets import budget_percent
from core.knobs import KNOBS

PHASES: tuple[str, ...] = ("before", "during", "after")


def _figures(part: pd.DataFrame) -> dict[str, float]:
    latency = part["T_total_ms"].to_numpy(dtype=np.float64)
    return {"accuracy": float(part["accuracy"].mean()),
            "adherence": float((part["T_total_ms"] <= part["budget_ms"]).mean()),
            "latency_p50_ms": float(np.percentile(latency, 50)), "latency_p95_ms": float(np.percentile(latency, 95)),
            "latency_p99_ms": float(np.percentile(latency, 99))}


def budget_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """Per method and budget percent (rows of phase "all")."""
    out: dict[str, float] = {}
    for (method, p), part in rows[rows["phase"] == "all"].groupby(["method", "budget_percent"], sort=True):
        out.update({f"{method}_{name}_at_{p}": value for name, value in _figures(part).items()})
        if method == "adaptive":
            out[f"adaptive_interventions_at_{p}"] = float(part["intervened"].mean())
            out[f"adaptive_unfit_at_{p}"] = float((~part["fits"].astype(bool)).mean())
    adaptive = rows[rows["method"] == "adaptive"]
    if len(adaptive):
        out["adaptive_overhead_ms_mean"] = float(adaptive["overhead_ms"].mean())
        out["adaptive_overhead_ms_p50"] = float(np.percentile(adaptive["overhead_ms"], 50))
        out["adaptive_overhead_ms_p99"] = float(np.percentile(adaptive["overhead_ms"], 99))
    return out


def contention_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """Per calibration setting and phase of the contention passes."""
    out: dict[str, float] = {}
    for (calibration, phase), part in rows[rows["phase"].isin(PHASES)].groupby(["calibration", "phase"]):
        out.update({f"contention_{calibration}_{name}_{phase}": value for name, value in _figures(part).items()})
        out[f"contention_{calibration}_interventions_{phase}"] = float(part["intervened"].mean())
    return out


def replay_comparison(rows: pd.DataFrame, replay: dict[str, float], decisions: pd.DataFrame) -> dict[str, float]:
    """Live against replay on the same requests (phase "all"), per budget percent p:
    adaptive_minus_replay_accuracy_at_<p> (points of accuracy, live - replay) and
    adaptive_replay_agreement_at_<p> (share of requests whose live config, after the guardrail, is the
    replayed decision)."""
    live = rows[(rows["method"] == "adaptive") & (rows["phase"] == "all")]
    key = ["sample_id", "budget_percent"]
    replayed = decisions.assign(sample_id=decisions["sample_id"].astype(str),
                                budget_percent=[budget_percent(f) for f in decisions["fraction"]])
    both = live[[*key, *KNOBS]].astype({"sample_id": str}).merge(replayed[[*key, *KNOBS]], on=key, suffixes=("", "_replay"))
    out: dict[str, float] = {}
    for p, part in both.groupby("budget_percent"):
        same = np.logical_and.reduce([part[k].astype(str) == part[f"{k}_replay"].astype(str) for k in KNOBS])
        out[f"adaptive_replay_agreement_at_{p}"] = float(np.mean(same))
        if f"replay_accuracy_at_{p}" in replay:
            accuracy = float(live.loc[live["budget_percent"] == p, "accuracy"].mean())
            out[f"adaptive_minus_replay_accuracy_at_{p}"] = accuracy - replay[f"replay_accuracy_at_{p}"]
    return out


def knob_distribution(rows: pd.DataFrame) -> pd.DataFrame:
    """Share of each (tier, top_k, blocks) per method, budget fraction and data set (phase "all")."""
    part = rows[rows["phase"] == "all"]
    counts = part.groupby(["method", "fraction", "dataset", *KNOBS]).size().rename("requests").reset_index()
    totals = counts.groupby(["method", "fraction", "dataset"])["requests"].transform("sum")
    return counts.assign(share=counts["requests"] / totals)


def headline(metrics: dict[str, float]) -> str:
    """The run's summary: accuracy / adherence per budget (the static full config's beside), the
    overhead, and the contention ablation's adherence during the load."""
    percents = sorted({k.rsplit("_at_", 1)[1] for k in metrics if k.startswith("adaptive_accuracy_at_")},
                      key=lambda p: (not p.isdigit(), int(p) if p.isdigit() else 0))  # 60 before 100; "fixed" last
    parts = [f"{p}%: acc {metrics[f'adaptive_accuracy_at_{p}']:.3f} adh {metrics[f'adaptive_adherence_at_{p}']:.3f}"
             + (f" (full {metrics[f'static_full_accuracy_at_{p}']:.3f}/{metrics[f'static_full_adherence_at_{p}']:.3f})"
                if f"static_full_accuracy_at_{p}" in metrics else "") for p in percents]
    line = (f"adaptive inference, L_full {metrics['l_full_ms_measured']:.1f} ms: " + "; ".join(parts)
            + f"; overhead {metrics.get('adaptive_overhead_ms_mean', float('nan')):.3f} ms/request "
            f"(median {metrics.get('adaptive_overhead_ms_p50', float('nan')):.3f})")
    gaps = [p for p in percents if f"adaptive_minus_replay_accuracy_at_{p}" in metrics]
    if gaps:
        line += "\nreplay of the same requests (evaluate_controller): " + "; ".join(
            f"{p}%: acc {metrics[f'replay_accuracy_at_{p}']:.3f} (live - replay {metrics[f'adaptive_minus_replay_accuracy_at_{p}']:+.3f}, "
            f"same config {metrics[f'adaptive_replay_agreement_at_{p}']:.2f})" for p in gaps)
    if "contention_on_adherence_during" in metrics:
        line += (f"\ncontention adherence during load: calibration on {metrics['contention_on_adherence_during']:.3f}, "
                 f"off {metrics['contention_off_adherence_during']:.3f}")
    return line
