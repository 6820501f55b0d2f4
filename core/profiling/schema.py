"""The profiling record: one row per (sample, knob config, run), and its validation.

Column names and meanings are the platform's interface: the latency estimator reads them, the
importer maps the original study's files onto them, and the committed tables under data/profiles/
carry them. Two columns hold lists and are stored as JSON strings, not Parquet list columns:
  active_blocks  '[0, 1, 2, 15]'   block indices that ran, ascending
  answers        '["red", "Red"]'  reference answers
JSON strings round-trip through Parquet/pandas unchanged and compare with ==, which keeps
de-duplication and equality tests trivial (a list column comes back as numpy arrays, which do not).
Use `decode_list` to read them back.

`validate_profile` is the one gate every table passes on its way in or out of the store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from core.knobs import KNOBS, TIERS, KnobConfig, KnobOutOfSpaceError, get_space
from core.timing import STAGE_COLUMNS

PROFILE_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "dataset",
    "task",
    "question",
    "tier",
    "crops",
    "vision_tokens",
    "text_tokens",
    "top_k",
    "num_active_blocks",
    "active_blocks",
    "output_tokens",
    "T_vision_ms",
    "T_prefill_ms",
    "T_decode_ms",
    "T_decode_per_token_ms",
    "T_total_ms",
    "accuracy",
    "prediction",
    "answers",
    "run_index",
    "device",
    "backend",
)

STRING_COLUMNS: tuple[str, ...] = (
    "sample_id", "dataset", "task", "question", "tier", "active_blocks", "prediction", "answers", "device", "backend",
)
INT_COLUMNS: tuple[str, ...] = (
    "crops", "vision_tokens", "text_tokens", "top_k", "num_active_blocks", "output_tokens", "run_index",
)
# The stage times and their sum, plus decode time per decode forward (what the estimator predicts).
LATENCY_COLUMNS: tuple[str, ...] = STAGE_COLUMNS + ("T_decode_per_token_ms",)
FLOAT_COLUMNS: tuple[str, ...] = LATENCY_COLUMNS + ("accuracy",)

# pandas dtype per column ("str" is pandas' default string dtype).
PROFILE_DTYPES: dict[str, str] = {
    **{c: "str" for c in STRING_COLUMNS},
    **{c: "int64" for c in INT_COLUMNS},
    **{c: "float64" for c in FLOAT_COLUMNS},
}

# Backends that only measure latency (random weights): accuracy is NaN there and nowhere else.
LATENCY_ONLY_BACKENDS: frozenset[str] = frozenset({"molmoe_arch"})

ROW_KEY_COLUMNS: tuple[str, ...] = ("sample_id", "config_key", "run_index")
# The stored columns a row key is built from (config_key = KnobConfig.key of the knob columns).
ROW_KEY_FIELDS: tuple[str, ...] = ("sample_id", *KNOBS, "run_index")

# Tolerances for derived columns (imported tables carry rounded floats).
_REL_TOL = 1e-4
_ABS_TOL_MS = 1e-3


class ProfileSchemaError(ValueError):
    """A profiling table that breaks the schema; the message is one line naming source and field."""


@dataclass
class ProfileRow:
    """One profiling record, fields in PROFILE_COLUMNS order."""

    sample_id: str
    dataset: str
    task: str
    question: str
    tier: str
    crops: int
    vision_tokens: int
    text_tokens: int
    top_k: int
    num_active_blocks: int
    active_blocks: tuple[int, ...]
    output_tokens: int
    T_vision_ms: float
    T_prefill_ms: float
    T_decode_ms: float
    T_decode_per_token_ms: float
    T_total_ms: float
    accuracy: float
    prediction: str
    answers: tuple[str, ...]
    run_index: int
    device: str
    backend: str

    def to_record(self) -> dict[str, object]:
        """Plain dict with list fields encoded as JSON strings (the stored form)."""
        rec = asdict(self)
        rec["active_blocks"] = encode_list(self.active_blocks)
        rec["answers"] = encode_list(self.answers)
        return rec

    @property
    def config_key(self) -> str:
        return KnobConfig(self.tier, self.top_k, self.num_active_blocks).key


def encode_list(values: Iterable[object]) -> str:
    """JSON string for a list column (ints or strings)."""
    return json.dumps([v if isinstance(v, str) else int(v) for v in values])  # type: ignore[call-overload]


def decode_list(text: str) -> list:
    """Inverse of `encode_list`."""
    return list(json.loads(text))


def decode_per_token_ms(T_decode_ms: float, output_tokens: int) -> float:
    """Decode time per decode forward: the first output token comes from prefill, so divide by tokens - 1."""
    forwards = int(output_tokens) - 1
    return float(T_decode_ms) / forwards if forwards > 0 else 0.0


def rows_to_frame(rows: Sequence[ProfileRow]) -> pd.DataFrame:
    """DataFrame in the stored form (PROFILE_COLUMNS order, schema dtypes)."""
    if not rows:
        return empty_profile()
    df = pd.DataFrame([r.to_record() for r in rows], columns=list(PROFILE_COLUMNS))
    return df.astype(PROFILE_DTYPES)


def empty_profile() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=PROFILE_DTYPES[c]) for c in PROFILE_COLUMNS})


def config_keys(df: pd.DataFrame) -> pd.Series:
    """KnobConfig.key of every row, e.g. 'high-k8-b16'."""
    return df["tier"].astype(str) + "-k" + df["top_k"].astype("int64").astype(str) + "-b" + df[
        "num_active_blocks"
    ].astype("int64").astype(str)


def row_keys(df: pd.DataFrame) -> pd.DataFrame:
    """The row key columns (sample_id, config_key, run_index) of a profiling table."""
    return pd.DataFrame(
        {"sample_id": df["sample_id"].astype(str), "config_key": config_keys(df), "run_index": df["run_index"].astype("int64")}
    )


def _fail(source: str, message: str) -> ProfileSchemaError:
    return ProfileSchemaError(f"profile {source}: {message}")


def _first_id(df: pd.DataFrame, mask: pd.Series | np.ndarray) -> str:
    ids = df.loc[np.asarray(mask), "sample_id"] if "sample_id" in df else pd.Series([], dtype=str)
    return str(ids.iloc[0]) if len(ids) else "?"


def validate_profile(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check a profiling table and return it with schema dtypes and columns in PROFILE_COLUMNS order.

    `source` names where the table came from (a file path); every error is a one-line
    ProfileSchemaError naming it and the field: missing columns, nulls in required fields,
    NaN/negative latencies (with the first offending sample_id), knob values outside the backend's
    KnobSpace, T_decode_per_token_ms != T_decode_ms / (output_tokens - 1), T_total_ms != the sum of
    its components, and NaN accuracy outside latency-only backends. Extra columns are kept at the end.
    """
    missing = [c for c in PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise _fail(source, f"missing column(s) {', '.join(missing)}")
    out = df.copy()

    for col in STRING_COLUMNS:
        nulls = out[col].isna()
        if nulls.any():
            raise _fail(source, f"field {col} is empty for {int(nulls.sum())} row(s), first sample_id={_first_id(out, nulls)}")
        out[col] = out[col].astype("str")
    for col in INT_COLUMNS + FLOAT_COLUMNS:
        numeric = pd.to_numeric(out[col], errors="coerce")
        bad = numeric.isna() & out[col].notna()
        if bad.any():
            raise _fail(source, f"field {col} is not numeric (sample_id={_first_id(out, bad)})")
        out[col] = numeric
    for col in INT_COLUMNS:
        nulls = out[col].isna()
        if nulls.any():
            raise _fail(source, f"field {col} is NaN (sample_id={_first_id(out, nulls)})")
        if (out[col] != out[col].round()).any():
            raise _fail(source, f"field {col} holds non-integer values")
        if (out[col] < 0).any():
            raise _fail(source, f"field {col} is negative (sample_id={_first_id(out, out[col] < 0)})")
        out[col] = out[col].astype("int64")

    for col in LATENCY_COLUMNS:
        values = out[col].astype("float64")
        nan = values.isna() | ~np.isfinite(values.fillna(0.0))
        if nan.any():
            raise _fail(source, f"latency field {col} is NaN/inf for {int(nan.sum())} row(s), first sample_id={_first_id(out, nan)}")
        neg = values < 0
        if neg.any():
            raise _fail(
                source, f"latency field {col} is negative ({values[neg].iloc[0]:.3f} ms) for sample_id={_first_id(out, neg)}"
            )
        out[col] = values

    # Knob values must lie in the space of the backend that produced the row.
    for backend, part in out.groupby("backend", sort=True):
        try:
            space = get_space(str(backend))
        except KnobOutOfSpaceError as exc:
            raise _fail(source, f"field backend: {exc}") from None
        checks = (
            ("tier", part["tier"].isin(list(TIERS))),
            ("top_k", part["top_k"].isin(list(space.top_k_options))),
            ("num_active_blocks", part["num_active_blocks"].isin(list(space.block_options))),
        )
        for field_name, ok in checks:
            if not ok.all():
                bad_row = part.loc[~ok].iloc[0]
                value = bad_row[field_name]
                value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain repr
                raise _fail(
                    source,
                    f"field {field_name}={value!r} is outside knob space {space.name!r} "
                    f"(sample_id={bad_row['sample_id']})",
                )

    expected = np.where(
        out["output_tokens"] > 1, out["T_decode_ms"] / (out["output_tokens"] - 1).clip(lower=1), 0.0
    )
    off = ~np.isclose(out["T_decode_per_token_ms"], expected, rtol=_REL_TOL, atol=_ABS_TOL_MS)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise _fail(
            source,
            f"field T_decode_per_token_ms={out['T_decode_per_token_ms'].iloc[i]:.4f} != T_decode_ms / (output_tokens - 1) "
            f"= {expected[i]:.4f} (sample_id={out['sample_id'].iloc[i]})",
        )
    parts = out["T_vision_ms"] + out["T_prefill_ms"] + out["T_decode_ms"]
    off = ~np.isclose(out["T_total_ms"], parts, rtol=_REL_TOL, atol=_ABS_TOL_MS)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise _fail(
            source,
            f"field T_total_ms={out['T_total_ms'].iloc[i]:.3f} != T_vision_ms + T_prefill_ms + T_decode_ms "
            f"= {parts.iloc[i]:.3f} (sample_id={out['sample_id'].iloc[i]})",
        )

    acc_nan = out["accuracy"].isna() & ~out["backend"].isin(list(LATENCY_ONLY_BACKENDS))
    if acc_nan.any():
        raise _fail(
            source,
            f"field accuracy is NaN for backend {out.loc[acc_nan, 'backend'].iloc[0]!r} "
            f"(only latency-only backends {sorted(LATENCY_ONLY_BACKENDS)} may omit it; sample_id={_first_id(out, acc_nan)})",
        )
    out["accuracy"] = out["accuracy"].astype("float64")

    extras = [c for c in out.columns if c not in PROFILE_COLUMNS]
    return out[list(PROFILE_COLUMNS) + extras].reset_index(drop=True)
