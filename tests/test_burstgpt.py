"""BurstGPT trace reading, synthetic generation and per-minute aggregation."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from core.forecasting.burstgpt import (
    BURSTGPT_COLUMNS,
    CHANNELS,
    TraceError,
    generate_synthetic_trace,
    load_trace,
    per_minute_series,
    read_burstgpt_csv,
)


def _write_trace(path, rows, columns=BURSTGPT_COLUMNS):
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


GOOD_ROWS = [
    [0, "ChatGPT", 10, 20, 30, "Conversation log"],
    [5, "GPT-4", 100, 0, 100, "API log"],
    [61, "ChatGPT", 7, 3, 10, "Conversation log"],
]


@pytest.fixture(scope="module")
def trace_14d() -> pd.DataFrame:
    return generate_synthetic_trace(num_days=14, seed=0)


# ------------------------------------------------------------------------------------------ reader
def test_reader_keeps_failures_and_ignores_extra_columns(tmp_path):
    rows = [r + ["s1", 1.5] for r in GOOD_ROWS]
    path = _write_trace(tmp_path / "t.csv", rows, BURSTGPT_COLUMNS + ["Session ID", "Elapsed time"])
    trace = read_burstgpt_csv(path)
    assert list(trace.columns) == BURSTGPT_COLUMNS + ["failed"]
    assert trace["failed"].tolist() == [False, True, False]
    assert trace["Request tokens"].tolist() == [10, 100, 7]


def test_reader_filters_and_fails_when_nothing_is_left(tmp_path):
    path = _write_trace(tmp_path / "t.csv", GOOD_ROWS)
    assert len(read_burstgpt_csv(path, models=["ChatGPT"])) == 2
    assert len(read_burstgpt_csv(path, log_types=["API log"])) == 1
    with pytest.raises(TraceError, match="no rows left after filtering"):
        read_burstgpt_csv(path, models=["Claude"])


def test_reader_missing_file_names_the_file(tmp_path):
    with pytest.raises(TraceError, match=r"nope\.csv: trace file not found"):
        read_burstgpt_csv(tmp_path / "nope.csv")


def test_reader_missing_column_names_it(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame(GOOD_ROWS, columns=BURSTGPT_COLUMNS).drop(columns=["Log Type"]).to_csv(path, index=False)
    with pytest.raises(TraceError, match=r"t\.csv: missing column\(s\) \['Log Type'\]"):
        read_burstgpt_csv(path)


def test_reader_sorts_unsorted_rows_with_a_one_line_warning(tmp_path, caplog):
    rows = [list(r) for r in GOOD_ROWS]
    rows[2][0] = 3  # 3 s after a row at 5 s
    path = _write_trace(tmp_path / "t.csv", rows)
    with caplog.at_level("WARNING"):
        trace = read_burstgpt_csv(path)
    assert trace["Timestamp"].tolist() == [0, 3, 5] and trace["Request tokens"].tolist() == [10, 7, 100]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning and "not sorted ascending" in warning and "row 2" in warning and "sorting" in warning


def test_unsorted_rows_keep_their_csv_row_in_later_messages(tmp_path):
    rows = [list(r) for r in GOOD_ROWS]
    rows[0][0], rows[0][2] = 70, "x"  # the bad row sorts last but is data row 0
    path = _write_trace(tmp_path / "t.csv", rows)
    with pytest.raises(TraceError, match=r"'Request tokens' .* row 0 \(CSV line 2\) has 'x'"):
        read_burstgpt_csv(path)


def test_nan_is_reported_as_nan_not_numpys_repr(tmp_path):
    rows = [list(r) for r in GOOD_ROWS]
    rows[1][0] = np.nan
    path = _write_trace(tmp_path / "t.csv", rows)
    with pytest.raises(TraceError) as info:
        read_burstgpt_csv(path)
    assert str(info.value).endswith("row 1 (CSV line 3): nan"), str(info.value)


def test_unix_epoch_timestamps_are_rebased_not_allocated(tmp_path, caplog):
    """Seconds since 1970 made the per-second grid ~1.7e9 long (GiBs per channel)."""
    rows = [list(r) for r in GOOD_ROWS]
    for row in rows:
        row[0] += 1_700_000_030  # not on a minute boundary: the rebase keeps the first minute's offset
    path = _write_trace(tmp_path / "t.csv", rows)
    with caplog.at_level("WARNING"):
        trace = read_burstgpt_csv(path)
    assert trace["Timestamp"].tolist() == [50, 55, 111]
    assert any("Unix-epoch" in r.getMessage() for r in caplog.records)
    assert len(per_minute_series(trace)) == 2


def test_reader_negative_timestamp_names_the_row(tmp_path):
    rows = [list(r) for r in GOOD_ROWS]
    rows[0][0] = -1
    path = _write_trace(tmp_path / "t.csv", rows)
    with pytest.raises(TraceError, match=r"'Timestamp' is negative at row 0"):
        read_burstgpt_csv(path)


@pytest.mark.parametrize("bad", [np.nan, "many"])
def test_reader_bad_token_count_names_column_and_row(tmp_path, bad):
    rows = [list(r) for r in GOOD_ROWS]
    rows[1][3] = bad
    path = _write_trace(tmp_path / "t.csv", rows)
    with pytest.raises(TraceError, match=r"t\.csv: column 'Response tokens' .* row 1"):
        read_burstgpt_csv(path)


def test_error_messages_are_one_line(tmp_path):
    rows = [list(r) for r in GOOD_ROWS]
    rows[2][2] = np.nan
    path = _write_trace(tmp_path / "t.csv", rows)
    with pytest.raises(TraceError) as info:
        read_burstgpt_csv(path)
    assert "\n" not in str(info.value) and "Request tokens" in str(info.value)


# --------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_by_seed():
    a = generate_synthetic_trace(num_days=2, seed=3)
    b = generate_synthetic_trace(num_days=2, seed=3)
    c = generate_synthetic_trace(num_days=2, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) != len(c) or not a["Timestamp"].equals(c["Timestamp"])


def test_generator_schema_rate_and_failures(trace_14d):
    trace = trace_14d
    assert list(trace.columns) == BURSTGPT_COLUMNS + ["failed"]
    assert trace["Timestamp"].is_monotonic_increasing and trace["Timestamp"].min() >= 0
    assert len(trace) / (14 * 1440) == pytest.approx(16.0, rel=0.05)
    assert 0.015 < trace["failed"].mean() < 0.025
    assert (trace.loc[trace["failed"], "Response tokens"] == 0).all()
    assert (trace["Total tokens"] == trace["Request tokens"] + trace["Response tokens"]).all()
    assert (trace["Model"] == "ChatGPT").mean() > 0.6  # ChatGPT is the majority model
    assert set(trace["Log Type"]) == {"Conversation log", "API log"}


def test_request_lengths_are_zipf_like_and_capped(trace_14d):
    request = trace_14d["Request tokens"].to_numpy()
    assert request.min() >= 1 and request.max() <= 4096
    counts = np.bincount(request, minlength=4097)
    # Zipf(a=1.1): P(1)/P(2) = 2**1.1 and P(10)/P(100) = 10**1.1.
    assert counts[1] / counts[2] == pytest.approx(2**1.1, rel=0.05)
    assert counts[10] / counts[100] == pytest.approx(10**1.1, rel=0.15)
    assert np.median(request) < 50 < request.mean()  # heavy tail
    assert (request == 4096).mean() < 0.001  # truncated, not piled up at the cap


def test_response_length_depends_on_request_length(trace_14d):
    ok = trace_14d[~trace_14d["failed"]]
    request, response = ok["Request tokens"], ok["Response tokens"]
    assert response[request < 5].mean() == pytest.approx(250, rel=0.1)
    assert response[(request >= 100) & (request <= 300)].mean() == pytest.approx(150, rel=0.1)
    assert response[(request >= 1800) & (request <= 2200)].mean() == pytest.approx(450, rel=0.15)


def test_conversation_traffic_is_diurnal_and_weekday_heavy(trace_14d):
    conversation = per_minute_series(trace_14d[trace_14d["Log Type"] == "Conversation log"])
    minute = conversation.index.to_numpy()
    hour = (minute % 1440) // 60
    day = minute // 1440
    requests = conversation["requests"].to_numpy()
    night = requests[(hour >= 2) & (hour < 7)].mean()
    day_peak = requests[(hour >= 10) & (hour < 16)].mean()
    assert night < 0.1 * day_peak
    assert requests[(hour == 12)].mean() < requests[(hour == 10)].mean()  # lunch dip
    assert requests[day % 7 >= 5].mean() < 0.7 * requests[day % 7 < 5].mean()


def test_api_traffic_is_bursty_without_daily_cycle(trace_14d):
    api = per_minute_series(trace_14d[trace_14d["Log Type"] == "API log"])["requests"]
    hour = (api.index.to_numpy() % 1440) // 60
    night, day = api[(hour >= 2) & (hour < 7)].mean(), api[(hour >= 10) & (hour < 16)].mean()
    assert 0.8 < night / day < 1.25
    assert api.var() > 2 * api.mean()  # overdispersed vs Poisson: bursts


def test_generator_is_fast_enough_for_61_days():
    started = time.perf_counter()
    trace = generate_synthetic_trace(num_days=61, seed=0)
    assert time.perf_counter() - started < 10
    assert 1.3e6 < len(trace) < 1.5e6


def test_load_trace_dispatches_and_filters(tmp_path):
    synthetic = load_trace("synthetic", seed=1, num_days=1, log_types=["API log"])
    assert set(synthetic["Log Type"]) == {"API log"}
    path = _write_trace(tmp_path / "t.csv", GOOD_ROWS)
    assert len(load_trace(str(path), models=["GPT-4"])) == 1


# -------------------------------------------------------------------------------------- per minute
def test_per_minute_series_sums_by_minute_with_zero_gaps():
    trace = pd.DataFrame({
        "Timestamp": [0.0, 59.9, 60.0, 61.5, 185.0],
        "Request tokens": [10, 20, 30, 40, 50],
        "Response tokens": [1, 0, 3, 4, 5],
    })
    series = per_minute_series(trace)
    assert list(series.columns) == list(CHANNELS)
    assert series.index.tolist() == [0, 1, 2, 3]
    assert series["requests"].tolist() == [2, 2, 0, 1]  # the failure (0 response tokens) counts
    assert series["input_tokens"].tolist() == [30, 70, 0, 50]
    assert series["output_tokens"].tolist() == [1, 7, 0, 5]
    assert (series.dtypes == np.float64).all()


def test_expected_load_is_the_generators_intensity():
    from core.forecasting.burstgpt import synthetic_expected_load

    expected = synthetic_expected_load(num_days=14, seed=0)
    actual = per_minute_series(generate_synthetic_trace(num_days=14, seed=0))
    assert list(expected.columns) == list(CHANNELS) and len(expected) == len(actual)
    # The means agree within sampling error, and the intensity tracks the day (correlation over hours).
    ratio = actual.mean() / expected.mean()
    assert ((ratio > 0.93) & (ratio < 1.07)).all(), ratio
    hourly = lambda f: f["requests"].groupby(f.index // 60).sum()  # noqa: E731
    assert np.corrcoef(hourly(expected), hourly(actual))[0, 1] > 0.9
