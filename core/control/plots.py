"""Figures of a controller evaluation: accuracy and adherence against the budget, every method on one plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

_LABELS = {"accuracy": "accuracy (mean VQA score)", "adherence": "adherence (share of runs with T_total <= B)"}


def plot_vs_budget(curves: pd.DataFrame, metric: str, target: float | None = None) -> plt.Figure:
    """`curves` (method, fraction, <metric>, as core.control.evaluation.Evaluation.curves) -> one line per
    method of `metric` against the budget in % of L_full; `target` draws a dashed horizontal line."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for method, part in curves.groupby("method", sort=False):
        part = part.sort_values("fraction")
        style = dict(linestyle=":", color="grey") if method == "oracle" else {}
        axes.plot(100 * part["fraction"], part[metric], marker="o", label=method, **style)
    if target is not None:
        axes.axhline(target, linestyle="--", color="black", linewidth=0.8, label=f"target {target:g}")
    axes.set_xlabel("budget B (% of L_full)")
    axes.set_ylabel(_LABELS.get(metric, metric))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure
