"""Figures of an adaptive-inference run: per-request latency against the budget over time, and the
online calibration factors over time."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from core.adaptive.calibration import STAGES  # noqa: E402


def _shade_load(axes: plt.Axes, part: pd.DataFrame) -> None:
    during = part[part["phase"] == "during"]
    if len(during):
        axes.axvspan(during["order"].min(), during["order"].max(), color="red", alpha=0.08, label="background load")


def plot_latency_over_time(rows: pd.DataFrame) -> plt.Figure:
    """The adaptive method's T_total per request (in answer order) with its budget; one panel per
    calibration setting that ran (contention passes shaded where the load ran)."""
    adaptive = rows[rows["method"] == "adaptive"]
    settings = list(dict.fromkeys(adaptive["calibration"]))
    figure, axes_list = plt.subplots(len(settings), 1, figsize=(8, 3.2 * len(settings)), squeeze=False)
    for axes, setting in zip(axes_list[:, 0], settings):
        part = adaptive[adaptive["calibration"] == setting]
        axes.scatter(part["order"], part["T_total_ms"], s=8, c=["tab:red" if x > b else "tab:blue" for x, b in
                                                                zip(part["T_total_ms"], part["budget_ms"])],
                     label="request T_total (red: over budget)")
        axes.step(part["order"], part["budget_ms"], where="mid", color="black", linewidth=0.9, label="budget")
        _shade_load(axes, part)
        axes.set_title(f"calibration {setting}", fontsize=9)
        axes.set_xlabel("request (answer order)")
        axes.set_ylabel("ms")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def plot_calibration_over_time(rows: pd.DataFrame) -> plt.Figure:
    """Each stage's calibration factor after every adaptive request, per calibration setting."""
    adaptive = rows[rows["method"] == "adaptive"]
    figure, axes = plt.subplots(figsize=(8, 3.6))
    for setting, part in adaptive.groupby("calibration", sort=False):
        for stage in STAGES:
            axes.plot(part["order"], part[f"factor_{stage}"], linewidth=1, linestyle="-" if setting == "on" else "--",
                      label=f"{stage} (calibration {setting})")
    _shade_load(axes, adaptive)
    axes.set_xlabel("request (answer order)")
    axes.set_ylabel("factor on the estimator's P90")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure
