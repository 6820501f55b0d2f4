"""Stage timing: CUDA events on a GPU, `time.perf_counter_ns` on a CPU.

A host clock around asynchronous GPU work measures launch time, not execution (a pitfall of the
original study), so on CUDA every stage is bracketed by events and read after one synchronise.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch


@dataclass
class _Interval:
    name: str
    start: object
    end: object = None


@dataclass
class StageClock:
    """Collects named intervals on one device; `durations_ms()` reads them all at the end.

    Usage:
        clock = StageClock(device)
        with clock.stage("vision"): ...
        with clock.stage("decode"): ...   # the same name may repeat (one per decode step)
        clock.durations_ms()  -> {"vision": [..], "decode": [.., ..]}
    """

    device: torch.device
    _intervals: list[_Interval] = field(default_factory=list)

    @property
    def uses_cuda_events(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def _mark(self) -> object:
        if self.uses_cuda_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        interval = _Interval(name, self._mark())
        try:
            yield
        finally:
            interval.end = self._mark()
            self._intervals.append(interval)

    def durations_ms(self) -> dict[str, list[float]]:
        """Milliseconds per stage name, in recording order."""
        if self.uses_cuda_events:
            torch.cuda.synchronize(self.device)
        out: dict[str, list[float]] = {}
        for iv in self._intervals:
            if self.uses_cuda_events:
                ms = iv.start.elapsed_time(iv.end)  # type: ignore[union-attr]
            else:
                ms = (iv.end - iv.start) / 1e6  # type: ignore[operator]
            out.setdefault(iv.name, []).append(float(ms))
        return out

    def total_ms(self, name: str) -> float:
        return float(sum(self.durations_ms().get(name, [])))


# Latency components of one answer (ms), as the profile schema names them: stages and their sum.
STAGE_COLUMNS: tuple[str, ...] = ("T_vision_ms", "T_prefill_ms", "T_decode_ms", "T_total_ms")
# What the latency estimator predicts, by short name: decode is per decode forward (output_tokens - 1).
PREDICTED_COMPONENTS: dict[str, str] = {
    "vision": "T_vision_ms",
    "prefill": "T_prefill_ms",
    "decode": "T_decode_per_token_ms",
}


def coefficient_of_variation(values: Sequence[float]) -> float:
    """The project's one CV: sample standard deviation (ddof 1: repeats are few) over the mean;
    0.0 for fewer than two values or a non-positive mean. Pandas' `.std()` uses the same ddof."""
    xs = [float(x) for x in values]
    if len(xs) < 2:
        return 0.0
    mean = statistics.fmean(xs)
    return statistics.stdev(xs) / mean if mean > 0 else 0.0


@dataclass(frozen=True)
class RepeatedTiming:
    """Median and spread of repeated measurements, in ms."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float  # coefficient_of_variation of the samples
    samples_ms: tuple[float, ...]


def summarize_ms(samples_ms: Sequence[float]) -> RepeatedTiming:
    if not samples_ms:
        raise ValueError("no timing samples")
    xs = sorted(float(x) for x in samples_ms)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return RepeatedTiming(statistics.median(xs), q(0.1), q(0.9), coefficient_of_variation(xs), tuple(xs))


def time_callable_ms(
    fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 5, warmup: int = 2
) -> RepeatedTiming:
    """Time `fn()` end to end after `warmup` calls; CUDA events on a GPU, perf_counter_ns on a CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        clock = StageClock(device)
        with clock.stage("call"):
            fn()
        samples.append(clock.total_ms("call"))
    return summarize_ms(samples)
