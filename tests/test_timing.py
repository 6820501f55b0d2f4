"""Stage timing: a known sleep/spin comes out at about its length (tolerant bounds), and decode
time per token divides by decode forwards (output_tokens - 1)."""

import time

import pytest
import torch

from core.profiling.schema import decode_per_token_ms
from core.timing import StageClock, summarize_ms, time_callable_ms
from core.vlm.backend import GenerationResult


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_stage_clock_measures_a_20ms_sleep_on_cpu():
    clock = StageClock(torch.device("cpu"))
    assert not clock.uses_cuda_events
    with clock.stage("sleep"):
        time.sleep(0.020)
    ms = clock.durations_ms()["sleep"]
    assert len(ms) == 1
    # A sleep never returns early; the upper bound only has to survive a loaded machine.
    assert 19.0 <= ms[0] < 250.0


def test_stage_clock_keeps_repeated_stage_names_in_order():
    clock = StageClock(torch.device("cpu"))
    for seconds in (0.002, 0.012):
        with clock.stage("decode"):
            _spin(seconds)
    steps = clock.durations_ms()["decode"]
    assert len(steps) == 2
    assert steps[0] >= 1.9 and steps[1] >= 11.9
    assert clock.total_ms("decode") == pytest.approx(sum(steps))


def test_time_callable_reports_median_of_repeats():
    timing = time_callable_ms(lambda: _spin(0.005), device="cpu", repeats=3, warmup=1)
    assert len(timing.samples_ms) == 3
    assert 4.9 <= timing.median_ms < 100.0


def test_summarize_ms_known_values():
    summary = summarize_ms([10.0, 20.0, 30.0])
    assert summary.median_ms == 20.0
    assert summary.cv == pytest.approx(10.0 / 20.0)  # sample std (ddof 1) of 10, 20, 30 is 10


def test_decode_per_token_divides_by_decode_forwards():
    # 4 output tokens: the first comes out of prefill, so 3 decode forwards.
    assert decode_per_token_ms(90.0, 4) == pytest.approx(30.0)
    assert decode_per_token_ms(0.0, 1) == 0.0
    result = GenerationResult(
        text="a b c d", output_tokens=4, crops=1, vision_tokens=288, text_tokens=5, active_blocks=(0, 15),
        T_vision_ms=10.0, T_prefill_ms=20.0, T_decode_ms=90.0,
    )
    assert result.T_decode_per_token_ms == pytest.approx(decode_per_token_ms(90.0, 4))
