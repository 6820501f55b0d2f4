"""Latency budgets, one definition for every controller and yardstick: B = f x L_full.

`L_full` is the median measured `T_total_ms` of the full config on the table in use (never a number
in ms written into code), `f` a budget fraction. Training draws f from `TRAIN_FRACTION_RANGE`;
evaluation reports `EVAL_FRACTIONS`, each metric named by its percent of L_full (`..._at_70`).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from core.knobs import KNOBS, KnobConfig

EVAL_FRACTIONS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TRAIN_FRACTION_RANGE: tuple[float, float] = (0.4, 1.1)


def full_latency_ms(table: pd.DataFrame, full: KnobConfig) -> float:
    """L_full: the median measured T_total_ms over every row (all samples, all runs) of the full config."""
    is_full = np.logical_and.reduce([(table[knob] == getattr(full, knob)).to_numpy() for knob in KNOBS])
    if not is_full.any():
        raise ValueError(f"the table has no rows of the full config {full.key}")
    return float(table.loc[is_full, "T_total_ms"].median())


def budget_percent(fraction: float) -> str:
    """The percent of L_full that names a budget in metric names: 0.7 -> "70", 1.25 -> "125", 0.725 -> "72.5".

    Rounded to 6 decimals first, so 0.7 * 100 = 70.00000000000001 still reads "70".
    """
    return np.format_float_positional(round(float(fraction) * 100, 6), trim="-")


def check_fractions(fractions: Iterable[object], parameter: str = "budget_fractions") -> tuple[float, ...]:
    """The fractions as floats; ValueError (one line naming `parameter` and the value) for a fraction that
    is not a number, <= 0 or not finite, for none at all, and for two that share a metric name."""
    out: list[float] = []
    for value in fractions:
        try:
            fraction = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"parameter {parameter}: {value!r} is not a number") from None
        if not math.isfinite(fraction) or fraction <= 0:
            raise ValueError(f"parameter {parameter}: budget fraction {value!r} must be a finite number > 0")
        if any(budget_percent(fraction) == budget_percent(seen) for seen in out):
            raise ValueError(f"parameter {parameter}: budget fraction {value!r} is given twice")
        out.append(fraction)
    if not out:
        raise ValueError(f"parameter {parameter}: no budget fraction given")
    return tuple(out)

