"""The profiling sweep: shards partition the work, a sweep killed midway resumes to the identical row
set without duplicates, and rows carry the schema's meaning."""

import math
from dataclasses import replace

import pandas as pd
import pytest

from core.profiling.plots import (
    knob_step_effects,
    plot_accuracy_latency_pareto,
    plot_latency_by_knob,
    plot_repeatability,
    run_to_run_cv,
)
from core.profiling.schema import row_keys
from core.profiling.store import ProfileStore
from core.knobs import KnobConfig
from core.profiling.profiler import ProfileSweepConfig, load_protocol, plan_work, run_sweep, shard_of
from tests.test_molmoe_arch import probe_samples, tiny_backend

# One shard of five keeps the test small (~15 configs) while still walking the real grid.
SWEEP = dict(
    backend="molmoe_arch", dataset_names=("probe_a", "probe_b"), num_samples=1, num_runs=2,
    shard=0, num_shards=5, seed=3, warmup=1, flush_every=7, force_output_tokens=3,
)


def samples_by_dataset() -> dict:
    a, b = probe_samples()[:2]
    return {
        "probe_a": [replace(a, sample_id="probe_a:test:0", dataset="probe_a")],
        "probe_b": [replace(b, sample_id="probe_b:test:0", dataset="probe_b")],
    }


def three_words(prediction: str, answers) -> float:
    return float(len(prediction.split()) == 3)


class InterruptedBackend:
    """The tiny backend, but the process 'dies' (KeyboardInterrupt) on answer call number `after`."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0
        self.name, self.space, self.device = inner.name, inner.space, inner.device

    def set_drop_order(self, order) -> None:
        self.inner.set_drop_order(order)

    def answer(self, sample, config, max_new_tokens=None, force_output_tokens=None):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner.answer(sample, config, max_new_tokens=max_new_tokens, force_output_tokens=force_output_tokens)


def raw_keys(store: ProfileStore) -> list[tuple]:
    """Every stored row key, read straight from the part files (no de-duplication)."""
    frames = [pd.read_parquet(p) for p in store.part_files()]
    keys = row_keys(pd.concat(frames, ignore_index=True))
    return [tuple(k) for k in keys.itertuples(index=False)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = ProfileStore(tmp_path_factory.mktemp("reference"))
    summary = run_sweep(tiny_backend(), samples_by_dataset(), ProfileSweepConfig(**SWEEP), store, three_words, progress=False)
    return store, summary


def test_shards_partition_the_work():
    backend, config = tiny_backend(), ProfileSweepConfig(**SWEEP)
    samples = [s for v in samples_by_dataset().values() for s in v]
    full = {i.key for i in plan_work(backend, samples, ProfileSweepConfig(**{**SWEEP, "num_shards": 1}))}
    shards = [{i.key for i in plan_work(backend, samples, ProfileSweepConfig(**{**SWEEP, "shard": k}))} for k in range(5)]
    assert len(full) == 2 * 75 * 2
    assert set().union(*shards) == full
    assert sum(len(s) for s in shards) == len(full)  # pairwise disjoint
    for shard in shards:  # all runs of a (sample, config) stay together
        assert all((sid, ck, 1 - r) in shard for sid, ck, r in shard)
    assert shard_of("x:test:0", "low-k4-b8", 5) == shard_of("x:test:0", "low-k4-b8", 5)
    assert config.shard == 0


def test_rows_follow_the_schema(reference):
    store, summary = reference
    df = store.load()
    assert summary.rows_written == summary.rows_planned == len(df) > 0
    assert set(df["dataset"]) == {"probe_a", "probe_b"}
    assert sorted(p.parent.name for p in store.part_files())[0] == "probe_a"
    assert (df["output_tokens"] == 3).all()
    assert (df["T_decode_per_token_ms"] - df["T_decode_ms"] / 2).abs().max() < 1e-9
    assert (df["T_total_ms"] - df[["T_vision_ms", "T_prefill_ms", "T_decode_ms"]].sum(axis=1)).abs().max() < 1e-9
    assert (df["accuracy"] == 1.0).all() and (df["device"] == "cpu").all() and (df["backend"] == "molmoe_arch").all()
    assert set(df["run_index"]) == {0, 1}


def test_killed_sweep_resumes_to_the_identical_row_set(reference, tmp_path):
    ref_store, ref_summary = reference
    store, config = ProfileStore(tmp_path), ProfileSweepConfig(**SWEEP)
    killed = InterruptedBackend(tiny_backend(), after=config.warmup + 17)  # dies on the 17th timed row
    with pytest.raises(KeyboardInterrupt):
        run_sweep(killed, samples_by_dataset(), config, store, three_words, progress=False)
    partial = raw_keys(store)
    assert len(partial) == 16  # complete rows are flushed on the way out (a SIGKILL loses <= flush_every)

    summary = run_sweep(tiny_backend(), samples_by_dataset(), config, store, three_words, progress=False)
    assert summary.rows_skipped == 16 and summary.rows_written == ref_summary.rows_planned - 16
    keys = raw_keys(store)
    assert len(keys) == len(set(keys))  # no duplicates even before load's de-duplication
    assert set(keys) == set(raw_keys(ref_store))
    stable = ["sample_id", "tier", "top_k", "num_active_blocks", "run_index", "crops", "active_blocks", "output_tokens", "prediction"]
    got = store.load()[stable].sort_values(stable).reset_index(drop=True)
    want = ref_store.load()[stable].sort_values(stable).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)

    again = run_sweep(tiny_backend(), samples_by_dataset(), config, store, three_words, progress=False)
    assert again.rows_written == 0 and again.rows_skipped == ref_summary.rows_planned


def test_accuracy_is_nan_without_a_score_function(tmp_path):
    store = ProfileStore(tmp_path)
    config = ProfileSweepConfig(**{**SWEEP, "num_shards": 75, "num_runs": 1, "dataset_names": ("probe_a",)})
    run_sweep(tiny_backend(), samples_by_dataset(), config, store, None, progress=False)
    df = store.load()
    assert len(df) >= 1 and df["accuracy"].map(math.isnan).all()


def test_bad_sweep_configs_fail_early():
    with pytest.raises(ValueError, match="shard=5"):
        ProfileSweepConfig(**{**SWEEP, "shard": 5})
    with pytest.raises(ValueError, match="base_vlm"):
        run_sweep(tiny_backend(), samples_by_dataset(), ProfileSweepConfig(**{**SWEEP, "backend": "base_vlm"}), ProfileStore("/nonexistent"), None)
    with pytest.raises(KeyError, match="probe_c"):
        run_sweep(tiny_backend(), samples_by_dataset(), ProfileSweepConfig(**{**SWEEP, "dataset_names": ("probe_c",)}), ProfileStore("/nonexistent"), None)


def test_profile_plots_and_their_tables(reference):
    store, _ = reference
    df = store.load()
    steps = knob_step_effects(df, "T_total_ms")
    assert list(steps["knob"].unique()) == ["tier", "top_k", "num_active_blocks"]
    assert (steps["pairs"] >= 0).all()
    cv = run_to_run_cv(df)
    assert len(cv) == len(df) // 2 and (cv["T_total_ms"] >= 0).all()  # two runs per (sample, config)
    for fig in (plot_accuracy_latency_pareto(df), plot_latency_by_knob(df), plot_repeatability(df)):
        assert fig.axes


class DriftingSpeedBackend:
    """The tiny backend with its timings replaced by cost(config) x a machine speed. The speed moves
    to the next value of `speeds` whenever the reference request (sample probe_a:test:0 at the full
    config) is answered, so a drift-reference answer and the row answer after it share one speed."""

    def __init__(self, inner, speeds=(1.0, 2.0, 3.0)) -> None:
        self.inner, self.speeds, self.moves = inner, speeds, 0
        self.name, self.space, self.device = inner.name, inner.space, inner.device

    def set_drop_order(self, order) -> None:
        self.inner.set_drop_order(order)

    @staticmethod
    def cost(config) -> float:
        return 1.0 + ("low", "medium", "high").index(config.tier) + config.top_k / 4 + config.num_active_blocks / 8

    def answer(self, sample, config, max_new_tokens=None, force_output_tokens=None):
        if sample.sample_id == "probe_a:test:0" and config == self.space.full():
            self.moves += 1
        speed = self.speeds[self.moves % len(self.speeds)]
        r = self.inner.answer(sample, config, max_new_tokens=max_new_tokens, force_output_tokens=force_output_tokens)
        base = self.cost(config) * speed
        return replace(r, T_vision_ms=base, T_prefill_ms=2 * base, T_decode_ms=3 * base)


DRIFT_SWEEP = {**SWEEP, "num_shards": 25, "num_runs": 1, "calibration_answers": 3}


def test_drift_reference_removes_a_drifting_machine_speed(tmp_path):
    store, backend = ProfileStore(tmp_path / "drift"), DriftingSpeedBackend(tiny_backend())
    config = ProfileSweepConfig(**DRIFT_SWEEP, timing_repeats=2, drift_reference=True)
    run_sweep(backend, samples_by_dataset(), config, store, None, progress=False)
    protocol = load_protocol(store)
    assert (protocol.timing_repeats, protocol.drift_reference, protocol.calibration_answers) == (2, True, 3)
    assert (protocol.reference_sample_id, protocol.reference_config) == ("probe_a:test:0", "high-k8-b16")
    full_cost = DriftingSpeedBackend.cost(tiny_backend().space.full())
    # Calibration saw speeds 1, 2, 3 (in some order): its median speed, 2, is the table's scale.
    assert protocol.reference_T_total_ms == pytest.approx(6 * 2 * full_cost)
    df = store.load()
    # The reference's own row moves the speed between its pair of answers; every other row is exact.
    df = df[~((df["sample_id"] == "probe_a:test:0") & (df["tier"] == "high") & (df["top_k"] == 8) & (df["num_active_blocks"] == 16))]
    cost = pd.Series([DriftingSpeedBackend.cost(KnobConfig(t, k, b))
                      for t, k, b in df[["tier", "top_k", "num_active_blocks"]].itertuples(index=False)]).to_numpy()
    assert len(df) > 5 and backend.moves >= 3 + 2 * len(df)  # the speed really moved between rows
    assert df["T_prefill_ms"].to_numpy() == pytest.approx(2 * 2 * cost)
    assert df["T_total_ms"].to_numpy() == pytest.approx(6 * 2 * cost)
    assert df["T_decode_per_token_ms"].to_numpy() == pytest.approx(3 * 2 * cost / 2)  # 3 output tokens


def test_a_table_never_mixes_timing_protocols(tmp_path):
    backend = DriftingSpeedBackend(tiny_backend())
    drift = ProfileStore(tmp_path / "drift")
    run_sweep(backend, samples_by_dataset(), ProfileSweepConfig(**DRIFT_SWEEP, timing_repeats=2, drift_reference=True),
              drift, None, progress=False)
    more_runs = {**DRIFT_SWEEP, "num_runs": 2}
    with pytest.raises(ValueError, match=r"timed with timing_repeats=2, drift_reference=True \(timing_protocol.json\): "
                                         "resume with the same settings"):
        run_sweep(backend, samples_by_dataset(), ProfileSweepConfig(**more_runs, timing_repeats=3, drift_reference=True),
                  drift, None, progress=False)
    before = len(drift.load())
    summary = run_sweep(backend, samples_by_dataset(), ProfileSweepConfig(**more_runs, timing_repeats=2, drift_reference=True),
                        drift, None, progress=False)  # the same protocol resumes, with the stored calibration
    assert summary.rows_skipped == before and len(drift.load()) == 2 * before

    plain = ProfileStore(tmp_path / "plain")
    run_sweep(backend, samples_by_dataset(), ProfileSweepConfig(**DRIFT_SWEEP), plain, None, progress=False)
    with pytest.raises(ValueError, match="holds rows timed with one answer per row"):
        run_sweep(backend, samples_by_dataset(), ProfileSweepConfig(**more_runs, timing_repeats=2), plain, None, progress=False)
    with pytest.raises(ValueError, match="timing_repeats \\(0\\)"):
        ProfileSweepConfig(**DRIFT_SWEEP, timing_repeats=0)
