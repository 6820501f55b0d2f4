"""Schema validation: good tables pass with schema dtypes; every kind of bad record fails with one
line naming the source and the field."""

import numpy as np
import pandas as pd
import pytest

from core.profiling.schema import (
    PROFILE_COLUMNS,
    ProfileRow,
    ProfileSchemaError,
    decode_list,
    rows_to_frame,
    validate_profile,
)
from tests.helpers import make_row


def frame(*rows: ProfileRow) -> pd.DataFrame:
    return rows_to_frame(list(rows) or [make_row()])


def test_columns_are_exactly_the_design_names():
    assert PROFILE_COLUMNS == tuple(
        "sample_id dataset task question tier crops vision_tokens text_tokens top_k num_active_blocks active_blocks "
        "output_tokens T_vision_ms T_prefill_ms T_decode_ms T_decode_per_token_ms T_total_ms accuracy prediction "
        "answers run_index device backend".split()
    )


def test_valid_table_passes_with_schema_dtypes_and_json_lists():
    df = validate_profile(frame(make_row(), make_row("probe:test:1")), "mem")
    assert list(df.columns) == list(PROFILE_COLUMNS)
    assert df["top_k"].dtype == np.int64 and df["T_total_ms"].dtype == np.float64
    assert decode_list(df.loc[0, "active_blocks"]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15]
    assert decode_list(df.loc[0, "answers"]) == ["red", "dark red"]


def test_missing_field_is_named_with_the_source():
    df = frame().drop(columns=["T_prefill_ms", "device"])
    with pytest.raises(ProfileSchemaError) as err:
        validate_profile(df, "results/x/part-0-0.parquet")
    msg = str(err.value)
    assert "results/x/part-0-0.parquet" in msg and "T_prefill_ms" in msg and "device" in msg
    assert "\n" not in msg


def test_nan_latency_names_field_and_sample():
    df = frame(make_row(), make_row("probe:test:7"))
    df.loc[1, "T_vision_ms"] = np.nan
    with pytest.raises(ProfileSchemaError, match=r"src\.parquet.*T_vision_ms.*probe:test:7"):
        validate_profile(df, "src.parquet")


def test_negative_latency_names_field_and_sample():
    bad = make_row("probe:test:3", T_decode_ms=-5.0, T_decode_per_token_ms=-1.25, T_total_ms=145.0)
    with pytest.raises(ProfileSchemaError, match=r"T_decode_ms.*negative.*probe:test:3"):
        validate_profile(frame(make_row(), bad), "src.parquet")


def test_knob_outside_the_backends_space_is_rejected():
    with pytest.raises(ProfileSchemaError, match=r"top_k=5.*molmoe_arch.*probe:test:0"):
        validate_profile(frame(make_row(top_k=5)), "src.parquet")
    with pytest.raises(ProfileSchemaError, match=r"num_active_blocks=9"):
        validate_profile(frame(make_row(num_active_blocks=9)), "src.parquet")
    with pytest.raises(ProfileSchemaError, match=r"field backend"):
        validate_profile(frame(make_row(backend="no_such_backend")), "src.parquet")


def test_decode_per_token_over_output_tokens_is_rejected():
    # 80 ms over 5 output tokens = 16: the original study's divisor, not decode forwards (4).
    with pytest.raises(ProfileSchemaError, match=r"T_decode_per_token_ms.*output_tokens - 1"):
        validate_profile(frame(make_row(T_decode_per_token_ms=16.0)), "src.parquet")


def test_total_must_be_the_sum_of_components():
    with pytest.raises(ProfileSchemaError, match=r"T_total_ms"):
        validate_profile(frame(make_row(T_total_ms=120.0)), "src.parquet")


def test_nan_accuracy_only_for_latency_only_backends():
    validate_profile(frame(make_row(backend="molmoe_arch")), "ok")
    bad = make_row(backend="base_vlm", top_k=4, num_active_blocks=8, active_blocks=tuple(range(8)))
    with pytest.raises(ProfileSchemaError, match=r"accuracy.*base_vlm"):
        validate_profile(frame(bad), "src.parquet")
