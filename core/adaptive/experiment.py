"""An adaptive-inference run: L_full measured on this machine, then the same requests answered
adaptively and by the yardsticks, and optionally under contention with calibration on and off.

Requests: the held-out samples of a measured table (`heldout_requests`: those `evaluate_controller`
replays, so the run reports the replay of the same controller on the same samples beside its live
figures, `replay_decisions`), or the first samples of each data set's suite split (`request_stream`).

Order, all batch 1, one request at a time:
  1. warm-up: `warmup` requests at the full config, then every request once at the full config (none
     scored); the median of the latter's wall times is L_full, the full config's measured latency here
     and now on these requests, and budgets are fractions of it (or a fixed `budget_ms`);
  2. comparison pass, per budget and request: the adaptive answer, then the static full config's, then
     the lookup table's (a static config per budget, from a measured table's calibration part), back to
     back, so drift of the machine touches the three alike;
  3. contention (optional), at one budget: each request answered twice back to back, with online
     calibration and with it frozen at the controller's static factor (the ablation; which goes first
     alternates), the first third on a quiet machine, the middle third under `CPULoad`, the rest after
     it. Two passes one after the other met different loads (p50 under load 16.7-21.5 ms in one run).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from core.adaptive.calibration import OnlineCalibration
from core.adaptive.contention import CPULoad
from core.adaptive.guardrail import Guardrail
from core.adaptive.inference import AdaptiveInference, answer_static, freeze_heap
from core.adaptive.report import replay_comparison
from core.control.budgets import budget_percent, check_fractions, full_latency_ms
from core.control.decision import LearnedController
from core.control.evaluation import MeasuredSetup, controller_decisions, measured_setup, table_features
from core.control.measured import check_measured_table, samples_of, split_calibration
from core.control.scoring import score_decisions
from core.control.yardsticks import lookup_table, oracle
from core.knobs import KnobConfig, KnobSpace
from core.latency.estimator import LatencyEstimator
from core.vlm.backend import StagedVLM
from core.vqa.sample import VQASample
from core.vqa import sources
from core.vqa.suite import SPLIT_SIZES


@dataclass(frozen=True)
class CalibrationSettings:
    window: int = 50
    quantile: float = 0.99
    method: str = "quantile"
    min_count: int = 5

    def __post_init__(self) -> None:
        OnlineCalibration(1.0, self.window, self.quantile, self.method, min_count=self.min_count)  # its checks


@dataclass(frozen=True)
class ExperimentSettings:
    fractions: tuple[float, ...] = (0.6, 0.8, 1.0)
    budget_ms: float = 0.0  # > 0: one fixed budget instead of fractions
    warmup: int = 5
    guardrail: bool = True
    calibration: CalibrationSettings = CalibrationSettings()
    compare: bool = True  # also the static full config and the lookup table on the same requests
    contention: bool = False
    contention_fraction: float = 0.8
    contention_workers: int = 2
    contention_duty: float = 0.85  # share of each 20 ms a worker spins (core.adaptive.contention)

    def __post_init__(self) -> None:
        """ValueError naming the parameter (the entry point's name) of the first unusable setting."""
        check_fractions(self.fractions, "budget_fraction")
        check_fractions([self.contention_fraction], "contention_fraction")
        if not (self.budget_ms >= 0 and math.isfinite(self.budget_ms)):
            raise ValueError(f"parameter latency_budget must be a number > 0 (or 0: use budget_fraction), got {self.budget_ms}")
        for name in ("warmup", "contention_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.contention_duty <= 1:
            raise ValueError(f"parameter contention_duty must lie in (0, 1], got {self.contention_duty}")


def request_stream(datasets: Sequence[str], split: str, num_samples: int, warmup: int,
                   seed: int, data_root: str = "") -> tuple[list[VQASample], list[VQASample]]:
    """(requests, warm-up requests): the first `num_samples` of each data set's split (the suite's, or the
    real files' under `data_root`), interleaved in a `seed`-shuffled order (the same in every pass), and
    `warmup` further samples for measuring L_full."""
    if num_samples < 1:
        raise ValueError(f"parameter num_samples must be >= 1, got {num_samples}")
    if not data_root and num_samples + warmup > SPLIT_SIZES[split]:
        raise ValueError(f"parameter num_samples: {num_samples} + warmup {warmup} exceed the {split} split's "
                         f"{SPLIT_SIZES[split]} samples")
    drawn = {d: sources.load_samples(d, split, num_samples + warmup, 0, data_root) for d in datasets}
    requests = [s for d in datasets for s in drawn[d][:num_samples]]
    random.Random(seed).shuffle(requests)
    return requests, [s for d in datasets for s in drawn[d][num_samples:]][:warmup]


REQUEST_SOURCES: tuple[str, ...] = ("heldout", "split")


@dataclass
class HeldoutRequests:
    """The held-out samples of a measured table as live requests (the ones `evaluate_controller` replays),
    warm-up samples from its calibration part, and the table made ready for the replay."""

    requests: list[VQASample]
    warmup: list[VQASample]
    setup: MeasuredSetup
    source: str
    data_root: str = ""  # where the samples' files are ('' = the synthetic suite)


def heldout_requests(table: pd.DataFrame, source: str, space: KnobSpace, calibration_seed: int,
                     datasets: Sequence[str], num_samples: int, warmup: int, seed: int,
                     fractions: Sequence[float], data_root: str = "") -> HeldoutRequests:
    """The first `num_samples` held-out samples of each data set (all of them if fewer), split by
    `calibration_seed` as `evaluate_controller` splits the table, in a `seed`-shuffled order; `warmup`
    calibration samples, data sets in turn. ValueError (one line) for a data set the table lacks."""
    if num_samples < 1:
        raise ValueError(f"parameter num_samples must be >= 1, got {num_samples}")
    setup = measured_setup(table, source, space, calibration_seed, fractions)
    heldout, calibration = samples_of(setup.split.heldout), samples_of(setup.split.calibration)
    present = sorted(heldout["dataset"].unique())
    chosen = list(datasets) or present
    absent = [d for d in chosen if d not in present]
    if absent:
        raise ValueError(f"parameter dataset: {absent[0]} is not in the measured table {source} (has {present})")
    ids = [i for d in chosen for i in heldout.loc[heldout["dataset"] == d, "sample_id"].head(num_samples)]
    by_dataset = [calibration.loc[calibration["dataset"] == d, "sample_id"].tolist() for d in chosen]
    warm_ids = [i for group in itertools.zip_longest(*by_dataset) for i in group if i is not None][:warmup]
    loaded = sources.samples_from_ids([*ids, *warm_ids], data_root)  # one read of each real file
    requests = loaded[:len(ids)]
    random.Random(seed).shuffle(requests)
    return HeldoutRequests(requests, loaded[len(ids):], setup, source, data_root)


def replay_decisions(controller: LearnedController, backend: StagedVLM, heldout: HeldoutRequests,
                     fractions: Sequence[float]) -> tuple[dict[str, float], pd.DataFrame]:
    """What `evaluate_controller` reports for this controller on the same requests: its decisions replayed
    on their measured runs at B = f x the table's L_full. (replay_accuracy_at_<p> / replay_adherence_at_<p>,
    the decisions)."""
    ids = {s.sample_id for s in heldout.requests}
    table = heldout.setup.split.heldout
    runs = table[table["sample_id"].astype(str).isin(ids)].reset_index(drop=True)
    features = table_features(backend, runs, heldout.source, heldout.data_root)
    decisions = controller_decisions(controller, features, runs, heldout.setup.l_full, fractions)
    scored = score_decisions(decisions, runs, heldout.setup.l_full, oracle(runs, heldout.setup.l_full, fractions))
    metrics = {f"replay_{m}_at_{budget_percent(f)}": scored[f"test_{m}_at_{budget_percent(f)}"]
               for f in check_fractions(fractions) for m in ("accuracy", "adherence")}
    return metrics, decisions


@dataclass
class RequestPlan:
    """What a run answers: the requests, the warm-up requests, the held-out split (request source
    "heldout") and the lookup yardstick's table (when compared on fraction budgets)."""

    requests: list[VQASample]
    warmup: list[VQASample]
    heldout: HeldoutRequests | None
    lookup: pd.DataFrame | None


def plan_requests(request_source: str, table: pd.DataFrame | None, table_source: str, space: KnobSpace,
                  calibration_seed: int, datasets: Sequence[str], all_datasets: Sequence[str], split: str,
                  num_samples: int, warmup: int, seed: int, settings: ExperimentSettings,
                  data_root: str = "") -> RequestPlan:
    """The requests of `request_source` (REQUEST_SOURCES): the measured table's held-out samples or the
    suite split's first samples. ValueError (one line naming the parameter) otherwise."""
    if request_source not in REQUEST_SOURCES:
        raise ValueError(f"parameter request_source must be one of {list(REQUEST_SOURCES)}, got {request_source!r}")
    heldout = None
    if request_source == "heldout":
        if split != "test":
            raise ValueError(f"parameter split={split!r}: request_source=heldout answers the measured table's held-out "
                             "samples, which are test samples (use request_source=split)")
        heldout = heldout_requests(table, table_source, space, calibration_seed, datasets, num_samples, warmup, seed,
                                   settings.fractions, data_root)
        requests, warm = heldout.requests, heldout.warmup
    else:
        requests, warm = request_stream(list(datasets) or list(all_datasets), split, num_samples, warmup, seed, data_root)
    lookup = (lookup_configs(table, table_source, space, settings.fractions)
              if settings.compare and settings.budget_ms == 0 else None)
    return RequestPlan(requests, warm, heldout, lookup)


def replay_report(controller: LearnedController, backend: StagedVLM, heldout: HeldoutRequests, rows: pd.DataFrame,
                  fractions: Sequence[float]) -> tuple[dict[str, float], pd.DataFrame]:
    """The replay `evaluate_controller` gives for this controller on the run's own requests and budget
    fractions, and how the live answers compare with it (`core.adaptive.report.replay_comparison`)."""
    replay, decisions = replay_decisions(controller, backend, heldout, fractions)
    return {**replay, **replay_comparison(rows, replay, decisions), "l_full_ms_table": heldout.setup.l_full}, decisions


def lookup_configs(table: pd.DataFrame, source: str, space: KnobSpace, fractions: Sequence[float],
                   calibration_fraction: float = 0.7) -> pd.DataFrame:
    """The lookup yardstick's table (one static config per budget fraction, over all data sets) from the
    calibration part of a measured table, as `evaluate_controller` builds it."""
    table = check_measured_table(table, source)
    calibration = split_calibration(table, calibration_fraction, 0).calibration
    return lookup_table(calibration, full_latency_ms(table, space.full()), fractions)


def lookup_config(lookup: pd.DataFrame, fraction: float) -> KnobConfig:
    """The lookup table's config at the fraction nearest `fraction`."""
    row = lookup.loc[(lookup["fraction"] - fraction).abs().idxmin()]
    return KnobConfig(str(row["tier"]), int(row["top_k"]), int(row["num_active_blocks"]))


def measure_l_full(backend: StagedVLM, warmup: Sequence[VQASample], requests: Sequence[VQASample]) -> float:
    """Median wall time (ms) of the full config over the run's own `requests`, each answered once (unscored)
    after the `warmup` samples' answers: the requests' own mix of answer lengths and image sizes, as a
    measured table's L_full is the median over its samples (a few warm-up samples alone gave 35-47 ms
    on the same machine)."""
    full = backend.space.full()
    for sample in warmup:
        backend.answer(sample, full)
    return statistics.median(answer_static(backend, s, full, 0.0)["T_total_ms"] for s in requests)


def _adaptive(backend: StagedVLM, controller: LearnedController, estimator: LatencyEstimator,
              settings: ExperimentSettings, calibrate: bool, l_full: float) -> AdaptiveInference:
    c = settings.calibration
    calibration = OnlineCalibration(controller.latency_factor, c.window, c.quantile, c.method, min_count=c.min_count,
                                    enabled=calibrate)
    guardrail = Guardrail(estimator, controller.options, controller.prior_accuracy, enabled=settings.guardrail)
    return AdaptiveInference(backend, controller, guardrail, calibration, l_full)


def run_experiment(backend: StagedVLM, controller: LearnedController, estimator: LatencyEstimator,
                   requests: Sequence[VQASample], warmup: Sequence[VQASample], settings: ExperimentSettings,
                   lookup: pd.DataFrame | None = None,
                   on_load: Callable[[str, list[int]], None] | None = None,
                   progress: bool = True) -> tuple[pd.DataFrame, float]:
    """(one row per answered request, L_full ms). `lookup` is the lookup yardstick's table (`lookup_configs`);
    `on_load("start"|"stop", pids)` hears about the background load."""
    freeze_heap()  # the models and libraries stay out of every garbage collection a request meets
    l_full = measure_l_full(backend, warmup, requests)
    budgets = [(0.0, settings.budget_ms)] if settings.budget_ms > 0 else [(f, f * l_full) for f in settings.fractions]
    rows: list[dict] = []
    order = 0
    session = _adaptive(backend, controller, estimator, settings, True, l_full)
    full = backend.space.full()
    with tqdm(total=len(budgets) * len(requests), desc="adaptive inference", disable=not progress) as bar:
        for fraction, budget in budgets:
            for sample in requests:
                common = {"fraction": fraction, "phase": "all", "calibration": "on"}
                rows.append({"method": "adaptive", "order": order, **common, **session.answer(sample, budget).as_dict()})
                if settings.compare:
                    rows.append({"method": "static_full", "order": order, **common, **answer_static(backend, sample, full, budget)})
                    if lookup is not None:
                        rows.append({"method": "lookup", "order": order, **common,
                                     **answer_static(backend, sample, lookup_config(lookup, fraction), budget)})
                order += 1
                bar.update()
    if settings.contention:
        budget = settings.contention_fraction * l_full
        third = max(1, len(requests) // 3)
        sessions = {calibrate: _adaptive(backend, controller, estimator, settings, calibrate, l_full)
                    for calibrate in (True, False)}
        with CPULoad(settings.contention_workers, settings.contention_duty) as load:
            for i, sample in enumerate(tqdm(requests, desc="contention, calibration on and off", disable=not progress)):
                if i == third:
                    load.start()
                    if on_load:
                        on_load("start", load.pids)
                if i == 2 * third and load.running:
                    pids = load.pids
                    load.stop()
                    if on_load:
                        on_load("stop", pids)
                phase = "before" if i < third else "during" if i < 2 * third else "after"
                # Both sessions answer each request back to back, first one then the other in turn, so the
                # load (whose effect drifts over seconds) touches calibration on and off alike.
                for calibrate in ((True, False) if i % 2 == 0 else (False, True)):
                    rows.append({"method": "adaptive", "order": order, "fraction": settings.contention_fraction,
                                 "phase": phase, "calibration": "on" if calibrate else "off",
                                 **sessions[calibrate].answer(sample, budget).as_dict()})
                    order += 1
    frame = pd.DataFrame(rows)
    frame["budget_percent"] = [budget_percent(f) if f > 0 else "fixed" for f in frame["fraction"]]
    return frame, l_full
