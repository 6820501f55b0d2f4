"""The MAE floor of the synthetic trace: the median of the generator's own predictive distribution.

MAE is minimised by the conditional median, not the mean, so the generator's expected counts per
minute (`synthetic_expected_load`) are no floor: a forecaster that sees the last minutes can beat
them, because the API log is a gamma renewal process with shape 0.3 (an arrival makes more arrivals
soon likely: bursts are visible in the recent past) and the per-minute counts are skewed.

The oracle here knows everything a forecaster cannot: the conversation log's true rate of every
target minute (day level and drift included) and the exact time since the API log's last arrival
before the forecast starts. Given those, the counts of the next `horizon` minutes are sampled from
the generator's own laws (Poisson conversations, the renewal's residual gap and fresh gaps, token
lengths per request), and the per-minute, per-channel median of the samples is the forecast. Any
forecaster knows less, so (up to the Monte-Carlo error of the median, which only adds MAE) no
forecaster's expected MAE is below the oracle's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from core.forecasting.burstgpt import (API_GAP_SHAPE, CHANNELS, CONVERSATION_SHARE, FAILURE_RATE, MAX_REQUEST_TOKENS,
                                       REQUEST_ZIPF_A, SECONDS_PER_MINUTE, response_token_means, synthetic_expected_load)

_GAPS_PER_SAMPLE = 64  # API gaps drawn per sample: their sum falls short of 3 minutes with probability < 1e-9


def _api_age_s(trace: pd.DataFrame, t0: np.ndarray) -> np.ndarray:
    """Seconds from the API log's last arrival before minute t0 starts to that start (inf: none yet)."""
    api = np.sort(trace.loc[trace["Log Type"] == "API log", "Timestamp"].to_numpy(dtype=float))
    start_s = t0.astype(float) * SECONDS_PER_MINUTE
    last = np.searchsorted(api, start_s, side="left") - 1
    return np.where(last >= 0, start_s - api[np.maximum(last, 0)], np.inf)


def _token_sums(rng: np.random.Generator, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input and output token sums of `counts` (any shape) requests each, drawn as the generator draws them."""
    support = np.arange(1, MAX_REQUEST_TOKENS + 1, dtype=float)
    cdf = np.cumsum(support ** -REQUEST_ZIPF_A)
    cdf /= cdf[-1]
    flat = counts.ravel()
    owner = np.repeat(np.arange(flat.size), flat)
    request = np.searchsorted(cdf, rng.random(owner.size), side="right") + 1.0
    mean = response_token_means(request)
    response = np.clip(np.rint(rng.gamma(1.5, mean / 1.5)), 1, 4096) * (rng.random(owner.size) >= FAILURE_RATE)
    sums = [np.bincount(owner, weights=w, minlength=flat.size).reshape(counts.shape) for w in (request, response)]
    return sums[0], sums[1]


def synthetic_oracle_median(
    trace: pd.DataFrame, t0: np.ndarray, horizon: int, num_days: int = 61, seed: int = 0,
    mean_requests_per_minute: float = 16.0, num_samples: int = 400, chunk: int = 256, sample_seed: int = 0,
) -> np.ndarray:
    """The oracle's median forecast (N, horizon, len(CHANNELS)) of minutes t0 .. t0 + horizon - 1.

    In: the trace `generate_synthetic_trace(num_days, seed, mean_requests_per_minute)` returned (its API-log
    rows give the renewal's state), the first target minute of every window, the horizon; Monte-Carlo
    samples per window and the windows drawn at once (memory ~ chunk x num_samples x 64 floats).
    Out: per-minute medians in original units (requests, input tokens, output tokens).
    """
    t0 = np.asarray(t0, dtype=np.int64)
    rng = np.random.default_rng(sample_seed)
    api_rate = (1 - CONVERSATION_SHARE) * mean_requests_per_minute
    conversation_rate = (synthetic_expected_load(num_days, seed, mean_requests_per_minute)["requests"].to_numpy()
                         - api_rate)
    mean_gap_s = SECONDS_PER_MINUTE / api_rate
    gaps = stats.gamma(API_GAP_SHAPE, scale=mean_gap_s / API_GAP_SHAPE)
    age_s = _api_age_s(trace, t0)
    edges_s = SECONDS_PER_MINUTE * np.arange(horizon + 1, dtype=float)
    out = np.empty((len(t0), horizon, len(CHANNELS)))
    for start in range(0, len(t0), chunk):
        rows = slice(start, min(start + chunk, len(t0)))
        n = rows.stop - rows.start
        # The gap running at the forecast start is longer than its age: draw it from the tail beyond the age.
        tail = gaps.sf(age_s[rows])[:, None] * (1 - rng.random((n, num_samples)))
        residual = gaps.isf(np.maximum(tail, 1e-300)) - age_s[rows, None]
        arrivals = residual[..., None] + np.concatenate(
            [np.zeros((n, num_samples, 1)), np.cumsum(gaps.rvs((n, num_samples, _GAPS_PER_SAMPLE - 1), random_state=rng), -1)],
            axis=-1)
        api = np.stack([((arrivals >= lo) & (arrivals < hi)).sum(-1) for lo, hi in zip(edges_s[:-1], edges_s[1:])], -1)
        rate = conversation_rate[t0[rows, None] + np.arange(horizon)]  # (n, horizon)
        requests = api + rng.poisson(np.broadcast_to(rate[:, None, :], api.shape))
        input_tokens, output_tokens = _token_sums(rng, requests)
        samples = np.stack([requests, input_tokens, output_tokens], -1)  # (n, S, horizon, C)
        out[rows] = np.median(samples, axis=1)
    return out
