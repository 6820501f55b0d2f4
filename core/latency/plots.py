"""Figures of a latency estimator. Each function returns a matplotlib Figure built without pyplot
(no global state; savefig renders with Agg) and writes it only when given a path.

  plot_pred_vs_true       predicted vs true, one panel per component, log axes, the y = x line
  plot_error_distribution histogram of the signed relative error (%) per component
  plot_errors_by_knob     |relative error| (%) per option of tier / top_k / blocks, per component (box plots)
  plot_training_curves    loss, MAE and relative error per epoch (train and val), best epoch marked

`df_true` / `df_pred` are row-aligned frames as from core.latency.evaluation.predict_groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core.knobs import KNOBS, TIERS  # noqa: E402
from core.latency.metrics import COMPONENTS  # noqa: E402

_UNITS = {"vision": "ms", "prefill": "ms", "decode": "ms / token", "total": "ms"}


def _maybe_save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _present(df_true: pd.DataFrame, df_pred: pd.DataFrame) -> list[str]:
    if len(df_true) != len(df_pred):
        raise ValueError(f"df_true has {len(df_true)} rows but df_pred has {len(df_pred)}; rows must correspond")
    return [s for s, c in COMPONENTS.items() if c in df_true and c in df_pred]


def _defined(df_true: pd.DataFrame, short: str) -> np.ndarray:
    """Rows where the component is defined (decode needs a decode forward)."""
    truth = df_true[COMPONENTS[short]].to_numpy(dtype=float)
    if short == "decode" and "output_tokens" in df_true:
        return (df_true["output_tokens"].to_numpy() > 1) & (truth > 0)
    return truth > 0


def _relative_error_pct(df_true: pd.DataFrame, df_pred: pd.DataFrame, short: str) -> tuple[np.ndarray, np.ndarray]:
    """(signed relative error in %, row mask) of one component."""
    rows = _defined(df_true, short)
    truth = df_true[COMPONENTS[short]].to_numpy(dtype=float)[rows]
    pred = df_pred[COMPONENTS[short]].to_numpy(dtype=float)[rows]
    return 100 * (pred - truth) / truth, rows


def plot_pred_vs_true(df_true: pd.DataFrame, df_pred: pd.DataFrame, title: str = "", path: str | Path | None = None) -> Figure:
    """Scatter of predicted vs true per component (log-log), coloured by tier, with y = x and ±10% lines."""
    shorts = _present(df_true, df_pred)
    fig = Figure(figsize=(4.2 * len(shorts), 4))
    axes = fig.subplots(1, len(shorts), squeeze=False)[0]
    tier_codes = pd.Categorical(df_true["tier"], categories=list(TIERS)).codes if "tier" in df_true else np.zeros(len(df_true))
    for ax, short in zip(axes, shorts):
        rows = _defined(df_true, short)
        truth = df_true[COMPONENTS[short]].to_numpy(dtype=float)[rows]
        pred = df_pred[COMPONENTS[short]].to_numpy(dtype=float)[rows]
        ax.scatter(truth, pred, s=6, alpha=0.5, c=np.asarray(tier_codes)[rows], cmap="viridis", vmin=0, vmax=len(TIERS) - 1)
        if len(truth):
            lo, hi = float(min(truth.min(), pred.min())), float(max(truth.max(), pred.max()))
            line = np.array([lo, hi])
            ax.plot(line, line, color="crimson", lw=1, label="y = x")
            ax.plot(line, 1.1 * line, color="grey", lw=0.8, ls="--", label="±10%")
            ax.plot(line, 0.9 * line, color="grey", lw=0.8, ls="--")
            if lo > 0:
                ax.set_xscale("log")
                ax.set_yscale("log")
        ax.set_xlabel(f"true {short} ({_UNITS[short]})")
        ax.set_ylabel(f"predicted {short} ({_UNITS[short]})")
        ax.set_title(short)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _maybe_save(fig, path)


def plot_error_distribution(df_true: pd.DataFrame, df_pred: pd.DataFrame, title: str = "", path: str | Path | None = None) -> Figure:
    """Histogram of the signed relative error (%) per component, ±10% marked, MAPE in the title."""
    shorts = _present(df_true, df_pred)
    fig = Figure(figsize=(4.2 * len(shorts), 3.6))
    axes = fig.subplots(1, len(shorts), squeeze=False)[0]
    for ax, short in zip(axes, shorts):
        rel, _ = _relative_error_pct(df_true, df_pred, short)
        ax.hist(rel, bins=40, color="steelblue", alpha=0.8)
        for x in (-10, 10):
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.axvline(0, color="crimson", lw=1)
        mape = float(np.mean(np.abs(rel))) if len(rel) else float("nan")
        ax.set_title(f"{short}: MAPE {mape:.2f}%")
        ax.set_xlabel("(pred - true) / true (%)")
        ax.set_ylabel("count")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _maybe_save(fig, path)


def plot_errors_by_knob(df_true: pd.DataFrame, df_pred: pd.DataFrame, knobs: Sequence[str] = KNOBS,
                        title: str = "", path: str | Path | None = None) -> Figure:
    """Grid (knob x component) of box plots of |relative error| (%) per knob option."""
    shorts = _present(df_true, df_pred)
    knobs = [k for k in knobs if k in df_true]
    fig = Figure(figsize=(3.6 * len(shorts), 2.8 * len(knobs)))
    axes = fig.subplots(len(knobs), len(shorts), squeeze=False)
    for i, knob in enumerate(knobs):
        values = df_true[knob].to_numpy()
        present = set(values.tolist())
        options = [t for t in TIERS if t in present] if knob == "tier" else sorted(present)
        for j, short in enumerate(shorts):
            rel, rows = _relative_error_pct(df_true, df_pred, short)
            groups = [np.abs(rel[values[rows] == option]) for option in options]
            ax = axes[i, j]
            ax.boxplot(groups, showfliers=False)
            ax.set_xticks(range(1, len(options) + 1), [str(o) for o in options])
            ax.axhline(10, color="grey", ls="--", lw=0.8)
            ax.set_xlabel(knob)
            ax.set_ylabel(f"|rel. error| {short} (%)")
            ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _maybe_save(fig, path)


def plot_training_curves(history: Sequence[dict], path: str | Path | None = None) -> Figure:
    """Three panels from train_estimator's history: loss, MAE (ms) and relative error (%) for
    prefill and decode, train dashed and val solid; the best epoch marked."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [r["epoch"] for r in history]
    best = [r["epoch"] for r in history if r.get("is_best")]
    fig = Figure(figsize=(14, 3.8))
    ax_loss, ax_mae, ax_rel = fig.subplots(1, 3)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], ls="--", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (point + pinball)")
    for ax, key, scale, label in ((ax_mae, "mae", 1.0, "MAE (ms)"), (ax_rel, "rel_error", 100.0, "relative error (%)")):
        for short, colour in (("prefill", "tab:blue"), ("decode", "tab:orange")):
            ax.plot(epochs, [scale * r[f"train_{key}_{short}"] for r in history], ls="--", color=colour, label=f"train {short}")
            ax.plot(epochs, [scale * r[f"val_{key}_{short}"] for r in history], color=colour, label=f"val {short}")
        ax.set_yscale("log")
        ax.set_ylabel(label)
    for ax in (ax_loss, ax_mae, ax_rel):
        if best:
            ax.axvline(best[-1], color="grey", ls=":", label=f"best epoch {best[-1]}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("latency estimator training")
    fig.tight_layout()
    return _maybe_save(fig, path)


__all__ = ["plot_error_distribution", "plot_errors_by_knob", "plot_pred_vs_true", "plot_training_curves"]
