"""The profiling sweep: shards partition the work, a sweep killed midway resumes to the identical row
set without duplicates, and rows carry the schema's meaning."""

import math
from dataclasses import replace

import pandas as pd
import pytest

from core.knobs import MOLMOE_SPACE, KnobConfig
from core.profiling.planning import (
    check_block_order,
    latency_probe_samples,
    parse_prompt_lengths,
    sweep_datasets,
)
from core.profiling.plots import profile_figures
from core.profiling.profiler import ProfileSweepConfig, load_protocol, plan_work, run_sweep, shard_of
from core.profiling.schema import row_keys, rows_to_frame
from core.profiling.store import ProfileStore
from core.profiling.summaries import knob_step_effects, median_run_to_run_cv, run_to_run_cv
from core.timing import coefficient_of_variation
from tests.helpers import make_row, probe_samples, tiny_backend

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
    backend = tiny_backend()
    samples = [s for v in samples_by_dataset().values() for s in v]
    full = {i.key for i in plan_work(backend, samples, ProfileSweepConfig(**{**SWEEP, "num_shards": 1}))}
    shards = [{i.key for i in plan_work(backend, samples, ProfileSweepConfig(**{**SWEEP, "shard": k}))} for k in range(5)]
    assert len(full) == 2 * 75 * 2
    assert set().union(*shards) == full
    assert sum(len(s) for s in shards) == len(full)  # pairwise disjoint
    for shard in shards:  # all runs of a (sample, config) stay together
        assert all((sid, ck, 1 - r) in shard for sid, ck, r in shard)
    # sha1, not Python's salted hash: the same pair lands on the same shard in every process.
    assert (shard_of("x:test:0", "low-k4-b8", 5), shard_of("probe_a:test:0", "high-k8-b16", 5)) == (1, 3)


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


def test_profile_figures_of_a_sweep(reference):
    store, _ = reference
    figures = profile_figures(store.load())
    # three_words scored every row: both data sets get a Pareto panel.
    assert list(figures) == ["pareto_probe_a", "pareto_probe_b", "latency_by_knob", "repeatability"]
    assert all(fig.axes for fig in figures.values())


def known_cost_table() -> pd.DataFrame:
    """Two samples x the whole molmoe_arch grid x two runs; T_total = cost(config) x (1.0 in run 0, 1.2 in run 1)."""
    rows = []
    for sample in ("probe:test:0", "probe:test:1"):
        for config in MOLMOE_SPACE.grid():
            cost = DriftingSpeedBackend.cost(config)
            for run, speed in ((0, 1.0), (1, 1.2)):
                t = cost * speed
                rows.append(make_row(sample, tier=config.tier, top_k=config.top_k, num_active_blocks=config.num_active_blocks,
                                     active_blocks=(), run_index=run, T_vision_ms=t / 4, T_prefill_ms=t / 4,
                                     T_decode_ms=t / 2, T_decode_per_token_ms=t / 8, T_total_ms=t))
    return rows_to_frame(rows)


def test_knob_step_effects_are_paired_medians():
    steps = knob_step_effects(known_cost_table(), "T_total_ms").set_index("step")
    assert list(steps.index[:2]) == ["low->medium", "medium->high"]
    # Each tier step adds 1 to the cost: the paired median is that over speeds 1.0 and 1.2.
    assert steps.loc["low->medium", "delta_ms"] == pytest.approx(1.1)
    assert steps.loc["4->6", "delta_ms"] == pytest.approx(0.5 * 1.1)  # top_k / 4
    assert steps.loc["14->16", "delta_ms"] == pytest.approx(0.25 * 1.1)  # num_active_blocks / 8
    # Pairs: 2 samples x 2 runs x the other two knobs' options (5 x 5 for a tier step, 3 x 5 for the others).
    assert steps.loc["low->medium", "pairs"] == 2 * 2 * 25 and steps.loc["4->6", "pairs"] == 2 * 2 * 15


def test_run_to_run_cv_is_the_sample_cv():
    table = known_cost_table()
    cv = run_to_run_cv(table)
    assert len(cv) == 2 * 75
    # Every group holds x and 1.2 x: the ddof-1 CV of core.timing, not the population one (0.0909).
    expected = coefficient_of_variation([1.0, 1.2])
    assert expected == pytest.approx(0.1286, abs=1e-4)
    assert cv["T_total_ms"].to_numpy() == pytest.approx(expected)
    assert median_run_to_run_cv(table)["T_prefill_ms"] == pytest.approx(expected)
    assert median_run_to_run_cv(table[table["run_index"] == 0]).isna().all()  # one run: no spread to measure


def test_a_sweep_planned_for_a_latency_only_backend():
    assert sweep_datasets("molmoe_arch", ["synth_textvqa"], None) == (("latency_probe_out8",), 8)
    assert sweep_datasets("molmoe_arch", [], 3) == (("latency_probe_out3",), 3)
    assert sweep_datasets("base_vlm", ["synth_textvqa"], None) == (("synth_textvqa",), None)
    samples = latency_probe_samples([4, 9], 3, num_samples=4, seed=0)["latency_probe_out3"]
    assert [len(s.question.split()) for s in samples] == [4, 9, 4, 9]
    assert {s.max_new_tokens for s in samples} == {3}
    assert parse_prompt_lengths(["16", " 64"]) == (16, 64)
    for bad in ([], ["0"], ["sixteen"]):
        with pytest.raises(ValueError, match="prompt_lengths"):
            parse_prompt_lengths(bad)


def test_resuming_under_another_drop_order_is_refused(reference):
    store, _ = reference
    backend = tiny_backend()
    check_block_order(store, ["probe_a"], backend.space.num_blocks, backend.drop_order)  # the order it ran with
    reversed_order = list(reversed(backend.drop_order))
    with pytest.raises(ValueError, match="profile into a new results_dir"):
        check_block_order(store, ["probe_a"], backend.space.num_blocks, reversed_order)


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


def test_static_lookup_picks_the_most_accurate_config_whose_quantile_fits():
    from core.profiling.summaries import static_lookup_choices

    # full config 10 ms; a cheap accurate config for "a" (6 ms, 0.9), a cheaper worse one (4 ms, 0.5);
    # data set "b" pays more at the cheap config (8 ms) and so cannot take it at f = 0.7.
    configs = {("high", 6, 8): (10.0, 1.0), ("high", 2, 8): (6.0, 0.9), ("low", 1, 4): (4.0, 0.5)}
    rows = []
    for dataset, slow in (("a", 0.0), ("b", 2.0)):
        for (tier, k, b), (ms, acc) in configs.items():
            for run in range(20):
                extra = slow if (tier, k) == ("high", 2) else 0.0
                rows.append({"dataset": dataset, "tier": tier, "top_k": k, "num_active_blocks": b,
                             "T_total_ms": ms + extra + 0.01 * run, "accuracy": acc})
    choices = static_lookup_choices(pd.DataFrame(rows), ("high", 6, 8), fractions=(0.3, 0.7, 1.1)).set_index(["dataset", "fraction"])
    assert choices.loc[("a", 0.7), "top_k"] == 2 and choices.loc[("a", 0.7), "accuracy"] == 0.9
    assert choices.loc[("b", 0.7), "top_k"] == 1  # its 8.2 ms P95 does not fit 7.07 ms
    assert choices.loc[("a", 1.1), "top_k"] == 6
    assert choices.loc[("a", 0.3), "top_k"] == 1 and not choices.loc[("a", 0.3), "fits"]  # nothing fits 3 ms: the fastest
    assert choices.loc[("a", 0.7), "fits"]
    with pytest.raises(ValueError, match="full config"):
        static_lookup_choices(pd.DataFrame(rows), ("medium", 6, 8))
