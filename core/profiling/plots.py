"""Figures (and the small tables behind them) of a profiling table.

  plot_accuracy_latency_pareto  per data set: every config at (median T_total_ms, mean accuracy), Pareto front
  plot_latency_by_knob          a latency component by tier / top_k / active blocks (box plots + medians)
  plot_repeatability            run-to-run coefficient of variation per latency component
All return matplotlib Figures (Agg backend; the caller saves or logs them).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core.knobs import TIERS  # noqa: E402

KNOBS: tuple[str, ...] = ("tier", "top_k", "num_active_blocks")
COMPONENTS: tuple[str, ...] = ("T_vision_ms", "T_prefill_ms", "T_decode_ms", "T_total_ms")


def _knob_order(df: pd.DataFrame, knob: str) -> list:
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
    """Boolean mask of configs no other config beats on both latency (lower) and accuracy (higher)."""
    order = summary.sort_values(["T_total_ms", "accuracy"], ascending=[True, False]).index
    best, mask = -np.inf, pd.Series(False, index=summary.index)
    for i in order:
        acc = summary.at[i, "accuracy"]
        if acc > best:
            mask.at[i], best = True, acc
    return mask


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


def knob_step_effects(df: pd.DataFrame, component: str = "T_total_ms") -> pd.DataFrame:
    """Median change of `component` per step of each knob, the other knobs and the sample held fixed.

    Rows: knob, step ('low->medium', '4->6', ...), delta_ms (median of paired differences), pairs.
    """
    out = []
    for knob in KNOBS:
        others = [k for k in KNOBS if k != knob]
        wide = df.pivot_table(index=["sample_id", "run_index", *others], columns=knob, values=component, aggfunc="median")
        order = _knob_order(df, knob)
        for a, b in zip(order, order[1:]):
            diff = (wide[b] - wide[a]).dropna()
            out.append({"knob": knob, "step": f"{a}->{b}", "delta_ms": float(diff.median()) if len(diff) else np.nan, "pairs": len(diff)})
    return pd.DataFrame(out)


def plot_latency_by_knob(df: pd.DataFrame, component: str = "T_total_ms") -> Figure:
    """Box plots of `component` per option of each knob, medians joined by a line."""
    fig, axes = plt.subplots(1, len(KNOBS), figsize=(5 * len(KNOBS), 4), sharey=True)
    for ax, knob in zip(axes, KNOBS):
        order = _knob_order(df, knob)
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


def run_to_run_cv(df: pd.DataFrame, components: tuple[str, ...] = COMPONENTS) -> pd.DataFrame:
    """Coefficient of variation (std/mean over run_index) of each component per (sample, config)."""
    groups = df.groupby(["sample_id", *KNOBS], sort=True)[list(components)]
    mean, std, n = groups.mean(), groups.std(ddof=0), groups.size()
    cv = (std / mean.where(mean > 0)).loc[n >= 2]
    return cv.reset_index()


def plot_repeatability(df: pd.DataFrame, components: tuple[str, ...] = COMPONENTS) -> Figure:
    """Distribution of the run-to-run CV per latency component (groups with >= 2 runs)."""
    cv = run_to_run_cv(df, components)
    fig, ax = plt.subplots(figsize=(6, 4))
    data = [cv[c].dropna().to_numpy() for c in components]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(components) + 1), list(components), rotation=15)
    for i, d in enumerate(data, start=1):
        if len(d):
            ax.annotate(f"median {np.median(d):.3f}", (i, np.median(d)), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_ylabel("run-to-run CV (std / mean)")
    ax.set_title(f"repeatability over {len(cv)} (sample, config) groups")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
