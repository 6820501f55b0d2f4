"""Figures of a profiling table.

  plot_accuracy_latency_pareto  per data set: every config at (median T_total_ms, mean accuracy), Pareto front
  plot_latency_by_knob          a latency component by tier / top_k / active blocks (box plots + medians)
  plot_repeatability            run-to-run coefficient of variation per latency component
All return matplotlib Figures (Agg backend; the caller saves or logs them); the tables behind them are
in `core/profiling/summaries.py`.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core.knobs import KNOBS, TIERS  # noqa: E402
from core.profiling.summaries import config_summary, knob_order, pareto_front, run_to_run_cv  # noqa: E402
from core.timing import STAGE_COLUMNS  # noqa: E402


def plot_accuracy_latency_pareto(df: pd.DataFrame) -> Figure:
    """Accuracy vs median end-to-end latency per config, one panel per data set, front highlighted."""
    summary = config_summary(df)
    datasets = sorted(summary["dataset"].unique())
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        part = summary[summary["dataset"] == ds]
        if part["accuracy"].isna().all():
            ax.set_title(f"{ds}: latency only (no accuracy)")
            ax.scatter(part["T_total_ms"], np.zeros(len(part)), s=10, c="grey")
        else:
            part = part.dropna(subset=["accuracy"])
            colours = part["tier"].map({t: i for i, t in enumerate(TIERS)})
            ax.scatter(part["T_total_ms"], part["accuracy"], c=colours, cmap="viridis", s=14, vmin=0, vmax=len(TIERS) - 1)
            front = part[pareto_front(part)].sort_values("T_total_ms")
            ax.step(front["T_total_ms"], front["accuracy"], where="post", color="crimson", label="Pareto front")
            ax.legend(loc="lower right")
            ax.set_title(ds)
        ax.set_xlabel("median T_total (ms)")
        ax.set_ylabel("mean accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_latency_by_knob(df: pd.DataFrame, component: str = "T_total_ms") -> Figure:
    """Box plots of `component` per option of each knob, medians joined by a line."""
    fig, axes = plt.subplots(1, len(KNOBS), figsize=(5 * len(KNOBS), 4), sharey=True)
    for ax, knob in zip(axes, KNOBS):
        order = knob_order(df, knob)
        data = [df.loc[df[knob] == v, component].to_numpy() for v in order]
        ax.boxplot(data, showfliers=False)
        ax.plot(range(1, len(order) + 1), [np.median(d) for d in data], "o-", color="crimson", label="median")
        ax.set_xticks(range(1, len(order) + 1), [str(v) for v in order])
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{component}")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_repeatability(df: pd.DataFrame, components: tuple[str, ...] = STAGE_COLUMNS) -> Figure:
    """Distribution of the run-to-run CV per latency component (groups with >= 2 runs)."""
    cv = run_to_run_cv(df, components)
    fig, ax = plt.subplots(figsize=(6, 4))
    data = [cv[c].dropna().to_numpy() for c in components]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(components) + 1), list(components), rotation=15)
    for i, d in enumerate(data, start=1):
        if len(d):
            ax.annotate(f"median {np.median(d):.3f}", (i, np.median(d)), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_ylabel("run-to-run CV (sample std / mean)")
    ax.set_title(f"repeatability over {len(cv)} (sample, config) groups")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def profile_figures(df: pd.DataFrame) -> dict[str, Figure]:
    """A profile run's figures by file stem: `pareto_<dataset>` for each data set with accuracy,
    `latency_by_knob` and `repeatability`."""
    figures = {f"pareto_{ds}": plot_accuracy_latency_pareto(part)
               for ds, part in df.groupby("dataset", sort=True) if part["accuracy"].notna().any()}
    figures["latency_by_knob"] = plot_latency_by_knob(df)
    figures["repeatability"] = plot_repeatability(df)
    return figures
