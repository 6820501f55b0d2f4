"""Resumable profiling sweep: every knob config x sample x run, one schema row each.

Work is split into shards by a stable hash of (sample_id, config key), so `num_shards` workers with
shard = 0..num_shards-1 cover the grid exactly once between them, and all runs of one
(sample, config) land on the same worker. On start the sweep skips row keys already in the store,
and it flushes every `flush_every` rows (and on any exception), so a killed worker loses at most the
rows since its last flush and a rerun completes the same row set without duplicates.

Timing protocol (`timing_repeats`, `drift_reference`): a row may hold the per-component medians of
several answers of its (sample, config). On a shared CPU the speed drifts over seconds (the same
request differs by 6-10% between two passes a minute apart while back-to-back repeats agree within
3-4%: `scripts/cpu_timing_noise.py`), so repeats alone do not help; with `drift_reference` each
repeat is preceded by one answer of a fixed reference request, and the repeat's times are divided
by (reference T_total now / reference T_total at calibration). That halves the disagreement between
two measurements of a row (6.3% -> 3.2% prefill, 8.2% -> 3.4% decode per request on the 2-core VM,
3 repeats). The calibration is stored with the table (`timing_protocol.json`) so resumed and
sharded workers share one scale, and a table never mixes protocols.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from core.knobs import KnobConfig
from core.profiling.schema import ProfileRow, decode_per_token_ms
from core.profiling.store import ProfileStore, atomic_write_text
from core.vlm.backend import GenerationResult, VLMBackend
from core.vqa.sample import VQASample
from core.vqa.suite import DATASETS

ScoreFn = Callable[[str, Sequence[str]], float]


@dataclass(frozen=True)
class ProfileSweepConfig:
    """What one sweep worker profiles (the defaults: the base VLM over the whole VQA suite).

    `num_samples` per dataset (a seeded choice when a dataset has more); `num_runs` repeats of each
    (sample, config); `warmup` untimed answers before the first timed one; `force_output_tokens`
    fixes the answer length (latency-only backends), None lets each sample's max_new_tokens and EOS decide.
    `timing_repeats` answers per row (the row holds their per-component medians); `drift_reference`
    rescales each repeat by a reference request timed just before it (module docstring).
    """

    backend: str = "base_vlm"
    dataset_names: tuple[str, ...] = DATASETS
    num_samples: int = 100
    num_runs: int = 3
    shard: int = 0
    num_shards: int = 1
    seed: int = 0
    warmup: int = 2
    flush_every: int = 50
    force_output_tokens: int | None = None
    timing_repeats: int = 1
    drift_reference: bool = False
    calibration_answers: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_names", tuple(self.dataset_names))
        if not self.dataset_names:
            raise ValueError("dataset_names is empty")
        if self.num_samples < 1 or self.num_runs < 1:
            raise ValueError(f"num_samples ({self.num_samples}) and num_runs ({self.num_runs}) must be >= 1")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard={self.shard} must lie in [0, num_shards={self.num_shards})")
        if self.warmup < 0 or self.flush_every < 1:
            raise ValueError(f"warmup ({self.warmup}) must be >= 0 and flush_every ({self.flush_every}) >= 1")
        if self.force_output_tokens is not None and self.force_output_tokens < 1:
            raise ValueError(f"force_output_tokens={self.force_output_tokens} must be >= 1")
        if self.timing_repeats < 1 or self.calibration_answers < 1:
            raise ValueError(f"timing_repeats ({self.timing_repeats}) and calibration_answers "
                             f"({self.calibration_answers}) must be >= 1")

    @property
    def default_protocol(self) -> bool:
        return self.timing_repeats == 1 and not self.drift_reference


@dataclass
class SweepSummary:
    """What one sweep worker did."""

    rows_written: int
    rows_skipped: int  # already in the store when the sweep started
    rows_planned: int  # this shard's share of the grid
    wall_time_s: float
    parts_written: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WorkItem:
    sample: VQASample
    config: KnobConfig
    run_index: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.sample.sample_id, self.config.key, self.run_index)


def shard_of(sample_id: str, config_key: str, num_shards: int) -> int:
    """Stable shard of a (sample, config) pair (sha1, not Python's salted hash)."""
    digest = hashlib.sha1(f"{sample_id}|{config_key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def select_samples(
    samples_by_dataset: dict[str, list[VQASample]], dataset_names: Sequence[str], num_samples: int, seed: int
) -> list[VQASample]:
    """The first `num_samples` of each dataset after a seeded shuffle (all if fewer)."""
    chosen: list[VQASample] = []
    for name in dataset_names:
        if name not in samples_by_dataset:
            raise KeyError(f"dataset {name!r} not among the samples given (have {sorted(samples_by_dataset)})")
        pool = sorted(samples_by_dataset[name], key=lambda s: s.sample_id)
        if not pool:
            raise ValueError(f"dataset {name!r} has no samples")
        ids = [s.sample_id for s in pool]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {name!r} has duplicate sample ids")
        if len(pool) > num_samples:
            pool = random.Random(f"{seed}:{name}").sample(pool, num_samples)
        chosen.extend(pool)
    return chosen


def plan_work(backend: VLMBackend, samples: Sequence[VQASample], config: ProfileSweepConfig) -> list[WorkItem]:
    """This shard's items: grid x samples x runs, in a seeded random order.

    The shuffle keeps slow drift (clocks, thermals) from lining up with one knob.
    """
    items = [
        WorkItem(s, c, r)
        for s in samples
        for c in backend.space.grid()
        if shard_of(s.sample_id, c.key, config.num_shards) == config.shard
        for r in range(config.num_runs)
    ]
    random.Random(config.seed).shuffle(items)
    return items


PROTOCOL_FILE = "timing_protocol.json"


@dataclass(frozen=True)
class TimingProtocol:
    """How a table's rows were timed; stored as `timing_protocol.json` beside the data sets."""

    timing_repeats: int
    drift_reference: bool
    reference_sample_id: str = ""
    reference_config: str = ""
    reference_T_total_ms: float = math.nan  # median over the calibration answers
    calibration_answers: int = 0
    device: str = ""
    backend: str = ""

    @property
    def calibrated(self) -> bool:
        """Written to the table (by the sweep that started it)."""
        return bool(self.device)


def _protocol_path(store: ProfileStore) -> Path:
    return Path(store.results_dir) / PROTOCOL_FILE


def load_protocol(store: ProfileStore) -> TimingProtocol | None:
    """The table's stored protocol; None for a table timed one answer per row (the default)."""
    path = _protocol_path(store)
    if not path.is_file():
        return None
    try:
        return TimingProtocol(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: not a timing protocol ({exc})") from exc


def _agree_on_protocol(
    store: ProfileStore, config: ProfileSweepConfig, reference: tuple[VQASample, KnobConfig], device: str
) -> TimingProtocol | None:
    """The stored protocol if it matches this sweep; a new one (calibrated later) if the table is empty.

    Raises ValueError when the sweep would add rows timed another way than the rows already there."""
    stored, has_rows = load_protocol(store), bool(store.part_files())
    wanted = (config.timing_repeats, config.drift_reference)
    if stored is None:
        if has_rows and not config.default_protocol:
            raise ValueError(f"results_dir {store.results_dir} holds rows timed with one answer per row: profile "
                             f"timing_repeats={config.timing_repeats}, drift_reference={config.drift_reference} into a new results_dir")
        return None if config.default_protocol else TimingProtocol(*wanted)
    if (stored.timing_repeats, stored.drift_reference) != wanted:
        raise ValueError(f"results_dir {store.results_dir} was timed with timing_repeats={stored.timing_repeats}, "
                         f"drift_reference={stored.drift_reference} ({PROTOCOL_FILE}): resume with the same settings")
    if stored.drift_reference and (stored.reference_sample_id, stored.reference_config, stored.device) != (
        reference[0].sample_id, reference[1].key, device
    ):
        raise ValueError(f"{_protocol_path(store)} calibrated reference {stored.reference_sample_id} / "
                         f"{stored.reference_config} on {stored.device!r}; this sweep's is {reference[0].sample_id} / "
                         f"{reference[1].key} on {device!r}: same data sets, seed and device needed")
    return stored


def _calibrate(
    backend: VLMBackend, protocol: TimingProtocol, reference: tuple[VQASample, KnobConfig], config: ProfileSweepConfig,
    answer_kwargs: dict, device: str, store: ProfileStore,
) -> TimingProtocol:
    """With a drift reference, time the reference request `calibration_answers` times; store and
    return the protocol (a repeats-only protocol is stored as it is, so resumes can check it)."""
    protocol = replace(protocol, device=device, backend=backend.name)
    if protocol.drift_reference:
        sample, knobs = reference
        totals = [backend.answer(sample, knobs, max_new_tokens=sample.max_new_tokens, **answer_kwargs).T_total_ms
                  for _ in range(config.calibration_answers)]
        protocol = replace(protocol, reference_sample_id=sample.sample_id, reference_config=knobs.key,
                           reference_T_total_ms=statistics.median(totals), calibration_answers=len(totals))
    Path(store.results_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(asdict(protocol), indent=1), _protocol_path(store))  # concurrent sweeps read it
    return protocol


def timed_answer(
    backend: VLMBackend,
    item: WorkItem,
    protocol: TimingProtocol | None,
    reference: tuple[VQASample, KnobConfig],
    answer_kwargs: dict,
) -> GenerationResult:
    """One row's answer under `protocol`: per-component medians over its repeats, each repeat divided
    by the reference's slowdown when the protocol has a drift reference."""
    repeats = protocol.timing_repeats if protocol is not None else 1
    results, slowdowns = [], []
    for _ in range(repeats):
        if protocol is not None and protocol.drift_reference:
            ref = backend.answer(reference[0], reference[1], max_new_tokens=reference[0].max_new_tokens, **answer_kwargs)
            slowdowns.append(ref.T_total_ms / protocol.reference_T_total_ms)
        else:
            slowdowns.append(1.0)
        results.append(backend.answer(item.sample, item.config, max_new_tokens=item.sample.max_new_tokens, **answer_kwargs))
    if repeats == 1 and slowdowns[0] == 1.0:
        return results[0]

    def median(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) / f for r, f in zip(results, slowdowns)))

    # Greedy answers are deterministic: every repeat gives the same text and token counts.
    return replace(results[-1], T_vision_ms=median("T_vision_ms"), T_prefill_ms=median("T_prefill_ms"),
                   T_decode_ms=median("T_decode_ms"), decode_step_ms=[])


def device_label(device: torch.device | str) -> str:
    """'cpu', or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def make_row(
    item: WorkItem, result: GenerationResult, accuracy: float, backend_name: str, device: str
) -> ProfileRow:
    """A schema row from one timed answer."""
    s, c = item.sample, item.config
    T_decode_ms = float(result.T_decode_ms)
    return ProfileRow(
        sample_id=s.sample_id, dataset=s.dataset, task=s.task, question=s.question,
        tier=c.tier, crops=int(result.crops), vision_tokens=int(result.vision_tokens), text_tokens=int(result.text_tokens),
        top_k=c.top_k, num_active_blocks=c.num_active_blocks, active_blocks=tuple(int(b) for b in result.active_blocks),
        output_tokens=int(result.output_tokens),
        T_vision_ms=float(result.T_vision_ms), T_prefill_ms=float(result.T_prefill_ms), T_decode_ms=T_decode_ms,
        T_decode_per_token_ms=decode_per_token_ms(T_decode_ms, result.output_tokens),
        T_total_ms=float(result.T_total_ms),
        accuracy=float(accuracy), prediction=result.text, answers=tuple(s.answers),
        run_index=item.run_index, device=device, backend=backend_name,
    )


def run_sweep(
    backend: VLMBackend,
    samples_by_dataset: dict[str, list[VQASample]],
    config: ProfileSweepConfig,
    store: ProfileStore,
    score_fn: ScoreFn | None,
    progress: bool = True,
) -> SweepSummary:
    """Profile this shard's part of grid x samples x runs into `store`, skipping rows already there.

    accuracy = score_fn(prediction, answers), NaN without a score_fn (latency-only backends).
    """
    if backend.name != config.backend:
        raise ValueError(f"sweep config names backend {config.backend!r} but got backend {backend.name!r}")
    start = time.perf_counter()
    samples = select_samples(samples_by_dataset, config.dataset_names, config.num_samples, config.seed)
    plan = plan_work(backend, samples, config)
    done = store.existing_keys()
    todo = [item for item in plan if item.key not in done]
    summary = SweepSummary(rows_written=0, rows_skipped=len(plan) - len(todo), rows_planned=len(plan), wall_time_s=0.0)
    if not todo:
        summary.wall_time_s = time.perf_counter() - start
        return summary

    device = device_label(backend.device)
    answer_kwargs = {"force_output_tokens": config.force_output_tokens}
    # The reference request: the first selected sample at the full config (stable across shards and resumes).
    reference = (samples[0], backend.space.full())
    protocol = _agree_on_protocol(store, config, reference, device)
    # Warm-up: the costliest and cheapest configs, so kernels/allocations of both extremes are ready.
    warm_configs = [backend.space.full(), backend.space.minimal()]
    for i in range(config.warmup):
        s = todo[0].sample
        backend.answer(s, warm_configs[i % 2], max_new_tokens=s.max_new_tokens, **answer_kwargs)
    if protocol is not None and not protocol.calibrated:
        protocol = _calibrate(backend, protocol, reference, config, answer_kwargs, device, store)

    buffer: list[ProfileRow] = []

    def flush() -> None:
        if buffer:
            summary.parts_written += [str(p) for p in store.append(buffer, shard=config.shard)]
            summary.rows_written += len(buffer)
            buffer.clear()

    try:
        for item in tqdm(todo, desc=f"profile {config.backend} shard {config.shard}/{config.num_shards}", disable=not progress):
            result = timed_answer(backend, item, protocol, reference, answer_kwargs)
            accuracy = score_fn(result.text, item.sample.answers) if score_fn is not None else math.nan
            buffer.append(make_row(item, result, accuracy, backend.name, device))
            if len(buffer) >= config.flush_every:
                flush()
    finally:
        flush()  # complete rows are never thrown away, also when the loop is interrupted
        summary.wall_time_s = time.perf_counter() - start
    return summary
