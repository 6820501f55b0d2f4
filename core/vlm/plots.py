"""Figures of the base-VLM study (evaluation over the knob grid, block importance). Each function returns
a matplotlib Figure built without pyplot (no global state, no display backend needed)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from core.knobs import TIERS

# y-axis label of the importance plot per score kind (`core.vlm.importance.SCORES`)
IMPORTANCE_YLABELS = {"answer_log_likelihood": "drop in answer log-likelihood per token",
                      "vqa_score": "accuracy drop (VQA score)"}


def plot_grid_accuracy_latency(table: pd.DataFrame) -> Figure:
    """VQA score against median T_total for every config of `core.vlm.evaluation.grid_table`'s
    table, one marker per tier, coloured by the number of active blocks."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for tier, marker in zip(TIERS, "o^s"):
        part = table[table["tier"] == tier]
        points = ax.scatter(part["T_total_ms"], part["vqa_score"], c=part["num_active_blocks"], marker=marker,
                            cmap="viridis", label=f"tier {tier}", edgecolors="k", linewidths=0.3)
    fig.colorbar(points, ax=ax, label="active blocks")
    ax.set_xlabel("median T_total (ms, CPU, batch 1)")
    ax.set_ylabel("VQA score (grid subset)")
    ax.set_title("base VLM: accuracy vs latency over the knob grid")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_knob_curves(curves: pd.DataFrame) -> Figure:
    """Accuracy over the three knobs from `core.vlm.evaluation.knob_accuracy_curves`' table: the tier
    at the full top_k and blocks, then top_k and active blocks one at a time, one line per tier."""
    fig = Figure(figsize=(11, 3.6))
    ax_tier, ax_k, ax_b = fig.subplots(1, 3, sharey=True)
    full_k = curves.loc[curves["knob"] == "top_k", "top_k"].max()
    at_full = curves[(curves["knob"] == "top_k") & (curves["top_k"] == full_k)].set_index("tier").reindex(list(TIERS))
    ax_tier.plot(list(TIERS), at_full["vqa_score"], marker="o", color="k")
    ax_tier.set_xlabel("tier (full top_k and blocks)")
    ax_tier.set_ylabel("VQA score (test, mean over data sets)")
    for ax, knob, column, label in ((ax_k, "top_k", "top_k", "experts per token (top_k)"),
                                    (ax_b, "blocks", "num_active_blocks", "active decoder blocks")):
        for tier, marker in zip(TIERS, "o^s"):
            part = curves[(curves["knob"] == knob) & (curves["tier"] == tier)].sort_values(column)
            ax.plot(part[column], part["vqa_score"], marker=marker, label=f"tier {tier}")
        ax.set_xlabel(label)
        ax.set_xticks(sorted(curves.loc[curves["knob"] == knob, column].unique()))
    for ax in (ax_tier, ax_k, ax_b):
        ax.grid(alpha=0.3)
    ax_b.legend()
    fig.suptitle("base VLM: accuracy as each knob is turned down from the full config")
    fig.tight_layout()
    return fig


def plot_importance_by_block(
    train: Mapping[str, Mapping[int, float]], val: Mapping[str, Mapping[int, float]], score: str
) -> Figure:
    """Leave-one-block-out drop per removed block, train and val side by side, one panel per data set."""
    datasets = sorted(train)
    fig = Figure(figsize=(4.5 * len(datasets), 3.5))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets):
        blocks = sorted(train[ds])
        x = np.arange(len(blocks))
        ax.bar(x - 0.2, [train[ds][b] for b in blocks], 0.4, label="train")
        ax.bar(x + 0.2, [val[ds][b] for b in blocks], 0.4, label="val")
        ax.set_xticks(x, [str(b) for b in blocks])
        ax.set_xlabel("block removed")
        ax.set_title(ds)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(IMPORTANCE_YLABELS.get(score, score))
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_cross_dataset_spearman(matrix: pd.DataFrame) -> Figure:
    """Heat map of the data set x data set Spearman matrix of `core.vlm.importance.consistency_report`."""
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    image = ax.imshow(matrix.to_numpy(dtype=float), vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), matrix.index)
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            ax.text(j, i, f"{matrix.iloc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="Spearman rho")
    ax.set_title("cross-data-set importance correlation")
    fig.tight_layout()
    return fig
