"""The measured profiling table controllers are evaluated on: its input gate and its split.

A measured table has one row per (sample_id, config, run_index) with the per-run `T_total_ms` (the
truth for adherence) and the VQA `accuracy` of that answer. Every method may learn from the
calibration part; every figure is computed on the held-out part, so no sample is in both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.knobs import KNOBS

MEASURED_FIELDS: tuple[str, ...] = ("sample_id", "dataset", *KNOBS, "run_index", "T_total_ms", "accuracy")


def check_measured_table(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Return `df` unchanged, or raise ValueError (one line naming `source` and the field) for an empty
    table, the first missing field of MEASURED_FIELDS, a NaN or negative T_total_ms, or an accuracy
    that is NaN or outside [0, 1]."""
    if df is None or len(df) == 0:
        raise ValueError(f"{source}: the measured table is empty")
    missing = [name for name in MEASURED_FIELDS if name not in df.columns]
    if missing:
        raise ValueError(f"{source}: field {missing[0]} missing from the measured table")
    latency = pd.to_numeric(df["T_total_ms"], errors="coerce")
    bad = latency.isna() | (latency < 0)
    if bad.any():
        raise ValueError(f"{source}: field T_total_ms is NaN or negative ({df['T_total_ms'][bad].iloc[0]!r} "
                         f"at sample {df['sample_id'][bad].iloc[0]})")
    accuracy = pd.to_numeric(df["accuracy"], errors="coerce")
    bad = ~accuracy.between(0, 1)  # NaN is not between
    if bad.any():
        raise ValueError(f"{source}: field accuracy must lie in [0, 1] ({df['accuracy'][bad].iloc[0]!r} "
                         f"at sample {df['sample_id'][bad].iloc[0]})")
    return df


def samples_of(table: pd.DataFrame) -> pd.DataFrame:
    """One row per sample of a measured table: sample_id (as text), dataset; sorted by sample_id."""
    return (table[["sample_id", "dataset"]].astype({"sample_id": str}).drop_duplicates("sample_id")
            .sort_values("sample_id").reset_index(drop=True))


@dataclass(frozen=True)
class CalibrationSplit:
    """The calibration and held-out rows of a measured table, and what made them."""

    calibration: pd.DataFrame
    heldout: pd.DataFrame
    seed: int
    fraction: float  # share of each data set's samples in the calibration part

    def as_params(self) -> dict[str, object]:
        """Flat dict to log: split seed and fraction, sample counts, and a digest of the held-out
        sample ids (two runs scored the same samples iff their digests match)."""
        heldout_ids = sorted(self.heldout["sample_id"].astype(str).unique())
        return {
            "calibration_split_seed": self.seed,
            "calibration_fraction": self.fraction,
            "calibration_samples": int(self.calibration["sample_id"].nunique()),
            "heldout_samples": len(heldout_ids),
            "heldout_sample_ids_sha256": hashlib.sha256("\n".join(heldout_ids).encode()).hexdigest(),
        }


def split_calibration(df: pd.DataFrame, calibration_fraction: float = 0.7, seed: int = 0) -> CalibrationSplit:
    """Split a measured table by sample_id into calibration and held-out parts.

    Within each data set the sorted sample ids are shuffled with `seed` and round(fraction x n) go to
    calibration (at least one sample on each side, so a data set needs >= 2 samples): every data set
    is in both parts in the same proportion, and all rows of a sample (configs, runs) stay together.
    The same table and seed always give the same split.
    """
    check_measured_table(df, "measured table")
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"parameter calibration_fraction must lie in (0, 1), got {calibration_fraction}")
    rng = np.random.default_rng(seed)
    calibration_ids: list[str] = []
    for dataset, part in samples_of(df).groupby("dataset", sort=True):
        ids = part["sample_id"].to_numpy()
        if len(ids) < 2:
            raise ValueError(f"field sample_id: data set {dataset} has {len(ids)} sample; a split needs >= 2")
        n_calibration = min(max(1, round(calibration_fraction * len(ids))), len(ids) - 1)
        calibration_ids += ids[rng.permutation(len(ids))][:n_calibration].tolist()
    in_calibration = df["sample_id"].astype(str).isin(calibration_ids)
    return CalibrationSplit(df[in_calibration].reset_index(drop=True), df[~in_calibration].reset_index(drop=True),
                            seed=seed, fraction=calibration_fraction)
