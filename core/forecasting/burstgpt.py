"""BurstGPT-format LLM serving traces: the published CSV reader, a calibrated synthetic generator,
and the per-minute load series (requests, input tokens, output tokens) that the forecaster learns.

A trace is one row per request with the published columns (`BURSTGPT_COLUMNS`) plus a boolean
`failed` (Response tokens == 0). Failed requests are kept: they are arrivals the server had to take.

The generator follows the published statistics of BurstGPT file 1 (the BurstGPT trace release):
~16 requests/min over 61 days; conversation-log traffic is diurnal (near zero 02:00-07:00, peaks 10-11h and 15-16h,
a lunch dip) and higher on weekdays; API-log traffic is a bursty gamma renewal process (shape well
below 1) without a daily cycle; Zipf-like request lengths (a ~ 1.1, capped); response lengths that
depend on the request length; ~2 % failures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.signal import lfilter

CHANNELS: tuple[str, ...] = ("requests", "input_tokens", "output_tokens")
BURSTGPT_COLUMNS: list[str] = [
    "Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type",
]
TOKEN_COLUMNS: tuple[str, ...] = ("Request tokens", "Response tokens", "Total tokens")
MODELS: tuple[str, ...] = ("ChatGPT", "GPT-4")
LOG_TYPES: tuple[str, ...] = ("Conversation log", "API log")

SECONDS_PER_MINUTE = 60
MINUTES_PER_DAY = 1440
# A first timestamp this late (one year) is a clock time, not an offset from the trace start.
ABSOLUTE_TIME_S = 365 * MINUTES_PER_DAY * SECONDS_PER_MINUTE
_log = logging.getLogger(__name__)

# Conversation-log activity by hour of day (relative, anchored at the middle of each hour): quiet
# night 02:00-07:00, morning peak 10-11h, lunch dip 12-13h, afternoon peak 15-16h, evening tail.
_CONVERSATION_HOURLY_PROFILE = np.array([
    0.30, 0.15, 0.05, 0.03, 0.03, 0.03, 0.04, 0.15,   # 00-08
    0.55, 0.95, 1.25, 1.10, 0.70, 0.90, 1.10, 1.25,   # 08-16
    1.05, 0.85, 0.70, 0.65, 0.65, 0.60, 0.55, 0.45,   # 16-24
])
_WEEKEND_FACTOR = 0.45
# Mean response tokens as a function of request tokens (log-spaced anchors, linear in log10).
_RESPONSE_MEAN_ANCHORS = (
    np.array([1, 10, 30, 100, 300, 1000, 2000, 4096], dtype=float),
    np.array([250, 230, 190, 150, 150, 280, 450, 520], dtype=float),
)


class TraceError(ValueError):
    """A trace that cannot be used; the one-line message names the file and the column at fault."""


# ----------------------------------------------------------------------------------------- reader
def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _shown(value: object) -> str:
    """A cell as a message shows it: text quoted, numbers plain (`nan`, not numpy's `np.float64(nan)`)."""
    if isinstance(value, str):
        return repr(value)
    return str(value.item() if isinstance(value, np.generic) else value)


def _row_label(row: int) -> str:
    # Data rows are 0-based; the CSV line adds the header line and 1-based numbering.
    return f"row {row} (CSV line {row + 2})"


def _apply_filters(
    trace: pd.DataFrame, source: str, models: Sequence[str] | None, log_types: Sequence[str] | None,
) -> pd.DataFrame:
    if models is not None:
        trace = trace[trace["Model"].isin(list(models))]
    if log_types is not None:
        trace = trace[trace["Log Type"].isin(list(log_types))]
    if len(trace) == 0:
        raise TraceError(
            f"{source}: no rows left after filtering Model in {models} and Log Type in {log_types}"
        )
    return trace.reset_index(drop=True)


def read_burstgpt_csv(
    path: str | Path,
    models: Sequence[str] | None = None,
    log_types: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a published BurstGPT CSV and validate it.

    In: the CSV path; optional filters on `Model` and `Log Type` (None keeps all).
    Rows out of Timestamp order are sorted (one-line warning); Unix-epoch seconds are rebased to the
    first minute (one-line warning).
    Out: a DataFrame with `BURSTGPT_COLUMNS` (Timestamp float64 seconds from the trace start,
    token counts int64, Model / Log Type categorical) plus `failed` (bool, Response tokens == 0).
    Extra columns (Session ID, Elapsed time) are dropped. Raises TraceError naming the file and
    the column (and row) at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    try:
        raw = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise TraceError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from err
    missing = [c for c in BURSTGPT_COLUMNS if c not in raw.columns]
    if missing:
        raise TraceError(f"{path}: missing column(s) {missing}; found {list(raw.columns)}")
    if len(raw) == 0:
        raise TraceError(f"{path}: no data rows")

    timestamp = pd.to_numeric(raw["Timestamp"], errors="coerce").to_numpy(dtype=float)
    if np.isnan(timestamp).any():
        row = _first_bad_row(np.isnan(timestamp))
        raise TraceError(
            f"{path}: column 'Timestamp' is missing or non-numeric at {_row_label(row)}: "
            f"{_shown(raw['Timestamp'].iloc[row])}"
        )
    if (timestamp < 0).any():
        row = _first_bad_row(timestamp < 0)
        raise TraceError(
            f"{path}: column 'Timestamp' is negative at {_row_label(row)}: {timestamp[row]}"
        )
    csv_row = np.arange(len(raw))  # data row of each row, for messages after sorting
    decreasing = np.diff(timestamp) < 0
    if decreasing.any():
        # The aggregation per minute does not need order, and a merged log is often unsorted.
        row = _first_bad_row(decreasing) + 1
        _log.warning(f"{path}: column 'Timestamp' is not sorted ascending (first at {_row_label(row)}); "
                     "sorting the rows by it")
        order = np.argsort(timestamp, kind="stable")
        raw, timestamp, csv_row = raw.iloc[order].reset_index(drop=True), timestamp[order], csv_row[order]
    if timestamp[0] >= ABSOLUTE_TIME_S:
        # Seconds since 1970, not since the trace start: a per-second grid from 0 would take GiBs.
        start = np.floor(timestamp[0] / SECONDS_PER_MINUTE) * SECONDS_PER_MINUTE
        _log.warning(f"{path}: column 'Timestamp' holds Unix-epoch seconds (first {timestamp[0]:.0f}); "
                     f"rebasing to the first minute ({start:.0f} s) so minute 0 is the trace start")
        timestamp = timestamp - start
    out = pd.DataFrame(index=raw.index)
    out["Timestamp"] = timestamp
    out["Model"] = raw["Model"].astype("category")
    for column in TOKEN_COLUMNS:
        values = pd.to_numeric(raw[column], errors="coerce").to_numpy(dtype=float)
        bad = np.isnan(values) | (values < 0) | (values != np.floor(values))
        if bad.any():
            row = _first_bad_row(bad)
            raise TraceError(
                f"{path}: column {column!r} must hold non-negative integer token counts; "
                f"{_row_label(int(csv_row[row]))} has {_shown(raw[column].iloc[row])}"
            )
        out[column] = values.astype(np.int64)
    out["Log Type"] = raw["Log Type"].astype("category")
    out["failed"] = out["Response tokens"].to_numpy() == 0
    return _apply_filters(out, str(path), models, log_types)


# -------------------------------------------------------------------------------------- generator
def _truncated_zipf(rng: np.random.Generator, a: float, max_value: int, size: int) -> np.ndarray:
    """Zipf(a) restricted to 1..max_value (truncated, not clipped: clipping a ~ 1.1 would pile
    ~40 % of the mass on the cap)."""
    support = np.arange(1, max_value + 1, dtype=float)
    cdf = np.cumsum(support ** -a)
    cdf /= cdf[-1]
    return np.searchsorted(cdf, rng.random(size), side="right").astype(np.int64) + 1


def _conversation_rate_per_minute(
    rng: np.random.Generator, num_days: int, mean_rate_per_minute: float
) -> np.ndarray:
    """Expected conversation arrivals for every minute of the trace (day 0 is a Monday)."""
    num_minutes = num_days * MINUTES_PER_DAY
    minute = np.arange(num_minutes)
    hour = (minute % MINUTES_PER_DAY) / SECONDS_PER_MINUTE
    # Periodic linear interpolation between hour centres, so the profile has no steps.
    centres = np.arange(24) + 0.5
    profile = np.interp(
        hour,
        np.concatenate([centres - 24, centres, centres + 24]),
        np.tile(_CONVERSATION_HOURLY_PROFILE, 3),
    )
    day = minute // MINUTES_PER_DAY
    weekday_factor = np.where(day % 7 >= 5, _WEEKEND_FACTOR, 1.0)
    # Day-to-day popularity swings and slow within-day drifts (1 h correlation time) make the
    # arrival process a Cox process, as real user populations are, not a clean periodic Poisson.
    day_level = np.exp(rng.normal(0.0, 0.15, size=num_days))[day]
    phi = np.exp(-1.0 / 60.0)
    drift = lfilter([1.0], [1.0, -phi], rng.normal(0.0, 0.2 * np.sqrt(1 - phi**2), num_minutes))
    rate = profile * weekday_factor * day_level * np.exp(drift)
    return rate * (mean_rate_per_minute / rate.mean())


def _gamma_renewal_times_s(
    rng: np.random.Generator, duration_s: float, mean_rate_per_minute: float, shape: float
) -> np.ndarray:
    """Arrival times of a gamma renewal process (shape < 1 -> bursts and long gaps)."""
    mean_gap_s = SECONDS_PER_MINUTE / mean_rate_per_minute
    times = rng.uniform(0, mean_gap_s) + np.cumsum(
        rng.gamma(shape, mean_gap_s / shape, size=int(duration_s / mean_gap_s * 1.1) + 1000)
    )
    while times[-1] < duration_s:  # rare: the first draw fell short of the trace end
        more = np.cumsum(rng.gamma(shape, mean_gap_s / shape, size=len(times) // 10 + 1000))
        times = np.concatenate([times, times[-1] + more])
    return times[times < duration_s]


def response_token_means(request_tokens: np.ndarray) -> np.ndarray:
    """The generator's mean response tokens for each request length (before rounding, clipping, failures)."""
    anchors_x, anchors_y = _RESPONSE_MEAN_ANCHORS
    return np.interp(np.log10(request_tokens), np.log10(anchors_x), anchors_y)


def _response_tokens(rng: np.random.Generator, request_tokens: np.ndarray) -> np.ndarray:
    mean = response_token_means(request_tokens)
    shape = 1.5  # response lengths are broad (coefficient of variation ~ 0.8)
    response = np.rint(rng.gamma(shape, mean / shape))
    return np.clip(response, 1, 4096).astype(np.int64)


CONVERSATION_SHARE = 0.7  # of the arrivals; the rest is the API log
API_GAP_SHAPE = 0.3  # gamma shape of the API log's gaps (< 1: bursts and long gaps)
FAILURE_RATE = 0.02  # share of requests that fail (Response tokens = 0)
MAX_REQUEST_TOKENS = 4096
REQUEST_ZIPF_A = 1.1


def synthetic_expected_load(num_days: int = 61, seed: int = 0, mean_requests_per_minute: float = 16.0) -> pd.DataFrame:
    """The generator's true intensity: the expected requests, input and output tokens of every minute
    of `generate_synthetic_trace(num_days, seed, mean_requests_per_minute)` (same rate draws), which
    no forecaster can know. Columns `CHANNELS`, index `minute` as `per_minute_series`.

    Expected tokens = expected requests x the mean tokens of one request (lengths do not depend on
    the arrival time); the response mean ignores the rounding and the clip to 1..4096 (< 0.1 %).
    """
    rate = _conversation_rate_per_minute(np.random.default_rng(seed), num_days, CONVERSATION_SHARE * mean_requests_per_minute)
    requests = rate + (1 - CONVERSATION_SHARE) * mean_requests_per_minute  # the API log's renewal rate is flat
    support = np.arange(1, MAX_REQUEST_TOKENS + 1, dtype=float)
    weights = support ** -REQUEST_ZIPF_A / np.sum(support ** -REQUEST_ZIPF_A)
    response_mean = response_token_means(support)
    per_request = {"requests": 1.0, "input_tokens": float(weights @ support),
                   "output_tokens": float(weights @ response_mean) * (1 - FAILURE_RATE)}
    return pd.DataFrame({ch: requests * per_request[ch] for ch in CHANNELS},
                        index=pd.RangeIndex(len(requests), name="minute"))


def generate_synthetic_trace(
    num_days: int = 61, seed: int = 0, mean_requests_per_minute: float = 16.0
) -> pd.DataFrame:
    """Generate a BurstGPT-like trace calibrated to the published file-1 statistics.

    In: trace length in days (day 0 is a Monday), a seed (same seed -> identical trace), the mean
    arrival rate over the whole trace. Out: the same columns as `read_burstgpt_csv`, sorted by
    Timestamp (seconds from the trace start, ms resolution). 61 days ~ 1.4M rows.
    """
    if num_days <= 0:
        raise TraceError(f"synthetic: num_days must be > 0, got {num_days}")
    if mean_requests_per_minute <= 0:
        raise TraceError(
            f"synthetic: mean_requests_per_minute must be > 0, got {mean_requests_per_minute}"
        )
    rng = np.random.default_rng(seed)
    duration_s = num_days * MINUTES_PER_DAY * SECONDS_PER_MINUTE

    # Conversation log: inhomogeneous Poisson counts per minute, uniform within the minute.
    rate = _conversation_rate_per_minute(rng, num_days, CONVERSATION_SHARE * mean_requests_per_minute)
    counts = rng.poisson(rate)
    conv_times = (np.repeat(np.arange(len(counts)), counts) + rng.random(counts.sum())) * 60.0
    # API log: one bursty renewal stream, flat over the day.
    api_times = _gamma_renewal_times_s(
        rng, duration_s, (1 - CONVERSATION_SHARE) * mean_requests_per_minute, shape=API_GAP_SHAPE
    )

    times = np.concatenate([conv_times, api_times])
    log_code = np.concatenate([np.zeros(len(conv_times), np.int8), np.ones(len(api_times), np.int8)])
    order = np.argsort(times, kind="stable")
    times, log_code = np.round(times[order], 3), log_code[order]
    n = len(times)

    # GPT-4 is the minority model, a little more common among chat users than API clients.
    gpt4_prob = np.where(log_code == 0, 0.2, 0.1)
    model_code = (rng.random(n) < gpt4_prob).astype(np.int8)
    request = _truncated_zipf(rng, a=REQUEST_ZIPF_A, max_value=MAX_REQUEST_TOKENS, size=n)
    response = _response_tokens(rng, request)
    failed = rng.random(n) < FAILURE_RATE
    response[failed] = 0

    return pd.DataFrame({
        "Timestamp": times,
        "Model": pd.Categorical.from_codes(model_code, categories=list(MODELS)),
        "Request tokens": request,
        "Response tokens": response,
        "Total tokens": request + response,
        "Log Type": pd.Categorical.from_codes(log_code, categories=list(LOG_TYPES)),
        "failed": failed,
    })


def load_trace(
    trace: str,
    seed: int = 0,
    num_days: int = 61,
    models: Sequence[str] | None = None,
    log_types: Sequence[str] | None = None,
) -> pd.DataFrame:
    """`trace == "synthetic"` -> the generator (seed, num_days); anything else is a CSV path.
    Filters on Model / Log Type apply to both."""
    if trace == "synthetic":
        return _apply_filters(generate_synthetic_trace(num_days, seed), "synthetic", models, log_types)
    return read_burstgpt_csv(trace, models=models, log_types=log_types)


def trace_source(trace: str, seed: int = 0, num_days: int = 61) -> str | dict[str, str]:
    """Where a trace comes from, for the record: the CSV's absolute path, or the generator and its arguments."""
    if trace == "synthetic":
        return {"generator": f"{__name__}.generate_synthetic_trace", "seed": str(seed), "num_days": str(num_days)}
    return str(Path(trace).resolve())


# ------------------------------------------------------------------------------- per-minute series
def per_minute_series(trace: pd.DataFrame) -> pd.DataFrame:
    """Aggregate a trace into load per minute.

    In: a trace with Timestamp (s from the trace start), Request tokens, Response tokens.
    Out: float64 DataFrame, columns `CHANNELS`, index `minute` = 0..last minute (contiguous, minutes
    without arrivals are 0). Minute m covers [60 m, 60 m + 60) s, so minute numbers keep their
    time-of-day meaning even when the trace was filtered. requests counts failures too.
    """
    if len(trace) == 0:
        raise TraceError("trace: no rows to aggregate")
    seconds = np.floor(trace["Timestamp"].to_numpy(dtype=float)).astype(np.int64)
    if seconds.min() < 0:
        raise TraceError("trace: column 'Timestamp' has negative values")
    num_minutes = int(seconds.max()) // SECONDS_PER_MINUTE + 1
    num_seconds = num_minutes * SECONDS_PER_MINUTE
    weights = {
        "requests": None,
        "input_tokens": trace["Request tokens"].to_numpy(dtype=float),
        "output_tokens": trace["Response tokens"].to_numpy(dtype=float),
    }
    columns = {}
    for channel, weight in weights.items():
        per_second = np.bincount(seconds, weights=weight, minlength=num_seconds).astype(float)
        columns[channel] = per_second.reshape(num_minutes, SECONDS_PER_MINUTE).sum(axis=1)
    return pd.DataFrame(columns, index=pd.RangeIndex(num_minutes, name="minute"))[list(CHANNELS)]
