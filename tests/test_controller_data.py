"""Controller data (issue 14, item 1): the accuracy grid, the sample features, the resumable build with
the estimator's latency, its schema gate, and `build_controller_data` on a real SQLite store. Real parts
throughout: the committed base VLM (data/base_vlm), a latency estimator trained for two epochs on the
committed CPU profile of that model, two or three samples per data set."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from core.control.data import (GRID_COLUMNS, GRID_FILE, SAMPLES_FILE, ControllerDataConfig, accuracy_grid,
                               add_estimator_latency, build_controller_data, check_controller_data,
                               check_estimator_space, feature_columns, load_controller_data, part_paths,
                               read_manifest, manifest_space, sample_features)
from core.knobs import TIERS
from core.latency.data import load_profile_table
from core.latency.estimator import EstimatorConfig, LatencyEstimator, train_estimator
from core.vlm.base_vlm import BaseVLMBackend
from core.vqa.suite import DATASETS, make_sample
from tests.helpers import synthetic_profile

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_VLM = REPO_ROOT / "data" / "base_vlm"
CPU_PROFILE = REPO_ROOT / "data" / "profiles" / "cpu-base-vlm-drift"


@pytest.fixture(scope="module")
def backend() -> BaseVLMBackend:
    torch.set_num_threads(1)  # the test machine is shared
    return BaseVLMBackend.from_pretrained(BASE_VLM)


@pytest.fixture(scope="module")
def estimator_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real estimator checkpoint: two epochs on 8 samples of the committed CPU table of this base VLM."""
    table = load_profile_table(CPU_PROFILE, ["synth_attrvqa"])
    ids = sorted(table["sample_id"].unique())[:8]
    train, val = table[table["sample_id"].isin(ids[:6])], table[table["sample_id"].isin(ids[6:])]
    model, _ = train_estimator(train, val, EstimatorConfig(hidden_width=16, depth=1, num_epochs=2))
    return model.save(tmp_path_factory.mktemp("estimator") / "best.pt")


@pytest.fixture(scope="module")
def estimator(estimator_file: Path) -> LatencyEstimator:
    return LatencyEstimator.load(estimator_file)


def _samples(per_dataset: int = 1, split: str = "train") -> list:
    return [make_sample(d, split, i) for d in DATASETS for i in range(per_dataset)]


SMALL = ControllerDataConfig(dataset_names=("synth_attrvqa",), train_samples=2, val_samples=1, chunk_size=1)


@pytest.fixture(scope="module")
def built(backend, estimator, tmp_path_factory) -> Path:
    """A finished build of SMALL (3 chunks of one sample), read-only for the tests below."""
    out = tmp_path_factory.mktemp("controller") / "data"
    build_controller_data(backend, out, SMALL, estimator, progress=False)
    return out


# --- the grid and the features ---------------------------------------------------------------------

def test_the_grid_holds_every_config_of_every_sample_as_the_profiler_answers_it(backend):
    samples = _samples()
    grid = accuracy_grid(backend, samples, progress=False)
    space = backend.space
    assert list(grid.columns) == list(GRID_COLUMNS)
    assert len(space.grid()) == 75 and (grid.groupby("sample_id").size() == 75).all()
    assert grid["accuracy"].between(0, 1).all()
    # The batched, vision-reusing answers are the profiler's (`answer`: batch 1, knobs applied per request).
    for config in (space.full(), space.minimal()):
        for s in samples:
            row = grid[(grid["sample_id"] == s.sample_id) & (grid["tier"] == config.tier)
                       & (grid["top_k"] == config.top_k) & (grid["num_active_blocks"] == config.num_active_blocks)].iloc[0]
            answer = backend.answer(s, config)
            assert (row["prediction"], row["output_tokens"], row["text_tokens"], row["crops"], row["vision_tokens"]) == (
                answer.text, answer.output_tokens, answer.text_tokens, answer.crops, answer.vision_tokens), config.key


def test_sample_features_have_a_fixed_width_and_the_profilers_token_counts(backend):
    samples = _samples(per_dataset=2)
    features = sample_features(backend, samples)
    d = backend.model.config.d_model
    assert feature_columns(features, "q_emb_") == [f"q_emb_{j}" for j in range(d)]
    assert feature_columns(features, "gv_") == [f"gv_{j}" for j in range(d)]
    assert len(features) == len(samples) and list(features["sample_id"]) == [s.sample_id for s in samples]
    assert np.isfinite(features.filter(regex="^(q_emb|gv)_").to_numpy()).all()
    full = backend.space.full()
    for s, (_, row) in zip(samples, features.iterrows()):
        assert row["text_tokens"] == backend.answer(s, full).text_tokens
        for tier in TIERS:
            answer = backend.answer(s, replace(full, tier=tier))
            assert (row[f"crops_{tier}"], row[f"vision_tokens_{tier}"]) == (answer.crops, answer.vision_tokens)
    # Different questions (and images) give different features: they carry the request.
    assert features.filter(like="q_emb_").drop_duplicates().shape[0] > 1
    assert features.filter(like="gv_").drop_duplicates().shape[0] == len(samples)


# --- the build -------------------------------------------------------------------------------------

def test_a_build_writes_the_layout_and_loads_back_with_the_estimators_latency(built, backend, estimator):
    samples, grid = load_controller_data(built)
    assert len(samples) == 3 and len(grid) == 3 * 75
    assert set(grid["split"]) == {"train", "val"}
    assert (grid["T_total_p90_ms"] >= grid["T_total_pred_ms"]).all() and (grid["T_total_pred_ms"] > 0).all()
    # The latency is the estimator's for the row's own config, sizes and answer length.
    row = grid.iloc[7]
    expected = estimator.predict_one(row["tier"], row["top_k"], row["num_active_blocks"], row["vision_tokens"],
                                     row["text_tokens"], row["crops"], output_tokens=row["output_tokens"])
    assert row["T_total_pred_ms"] == pytest.approx(expected["T_total_ms"], rel=1e-6)
    assert row["T_total_p90_ms"] == pytest.approx(expected["T_total_ms_p90"], rel=1e-6)
    assert manifest_space(read_manifest(built)) == backend.space


def test_a_rerun_skips_finished_chunks_and_redoes_only_the_missing_one(built, backend, estimator, tmp_path):
    out = tmp_path / "data"
    first = build_controller_data(backend, out, SMALL, estimator, progress=False)
    assert (first.chunks_written, first.chunks_skipped) == (3, 0)
    parts = {p: p.stat().st_mtime_ns for p in (out / "parts").rglob("*.parquet")}
    again = build_controller_data(backend, out, SMALL, estimator, progress=False)
    assert (again.chunks_written, again.chunks_skipped, again.parts_written) == (0, 3, [])
    assert {p: p.stat().st_mtime_ns for p in (out / "parts").rglob("*.parquet")} == parts
    # A build killed after one part of a chunk: that chunk alone is answered again.
    features, grid_part = part_paths(out, "synth_attrvqa", "train", 1, 2)
    grid_part.unlink()
    resumed = build_controller_data(backend, out, SMALL, estimator, progress=False)
    assert (resumed.chunks_written, resumed.chunks_skipped) == (1, 2)
    pd.testing.assert_frame_equal(pd.read_parquet(out / GRID_FILE), pd.read_parquet(built / GRID_FILE))


def test_a_build_with_other_parameters_into_the_same_directory_is_refused_in_one_line(built, backend, estimator):
    with pytest.raises(ValueError, match=r"built with train_samples=2, this build has train_samples=3") as info:
        build_controller_data(backend, built, replace(SMALL, train_samples=3), estimator, progress=False)
    assert "\n" not in str(info.value)


def test_samples_from_a_changed_suite_are_not_mixed_into_an_old_build(built, backend, estimator, monkeypatch):
    import core.control.data as data

    original = data.make_sample
    monkeypatch.setattr(data, "make_sample", lambda *a, **k: replace(original(*a, **k), question="what shape is it ?"))
    with pytest.raises(ValueError, match=r"built with samples_digest='[0-9a-f]{16}', this build has samples_digest="):
        build_controller_data(backend, built, SMALL, estimator, progress=False)


def test_an_estimator_of_another_knob_space_is_refused(backend):
    molmoe = LatencyEstimator(EstimatorConfig(hidden_width=8, depth=1)).fit_scalers(synthetic_profile(2, 1))
    with pytest.raises(ValueError, match=r"estimator was trained on top_k values \[4, 6, 8, 10, 12\]"):
        check_estimator_space(molmoe, backend.space)


# --- the schema gate -------------------------------------------------------------------------------

def _set(column, value):
    def mutate(df):
        df = df.copy()
        df.loc[df.index[0], column] = value
        return df
    return mutate


GRID_FAULTS = {
    "no accuracy": (lambda df: df.drop(columns="accuracy"), "field accuracy missing"),
    "accuracy above 1": (_set("accuracy", 1.5), "field accuracy must lie in [0, 1]"),
    "NaN latency": (_set("T_total_pred_ms", math.nan), "field T_total_pred_ms is NaN or negative"),
    "negative P90": (_set("T_total_p90_ms", -1.0), "field T_total_p90_ms is NaN or negative"),
    "top_k outside the space": (_set("top_k", 5), "top_k=5 is outside knob space"),
    "a config missing": (lambda df: df.iloc[1:], "has 74 configs"),
    "no output tokens": (_set("output_tokens", 0), "field output_tokens must be >= 1"),
}


@pytest.mark.parametrize("fault", GRID_FAULTS)
def test_a_bad_grid_is_one_line_naming_the_file_and_the_field(built, backend, fault):
    mutate, expected = GRID_FAULTS[fault]
    grid = pd.read_parquet(built / GRID_FILE)
    with pytest.raises(ValueError) as info:
        check_controller_data(mutate(grid), "grid.parquet", space=backend.space)
    message = str(info.value)
    assert message.startswith("grid.parquet: ") and expected in message and "\n" not in message


def test_bad_samples_and_a_bad_file_on_disk_are_one_line(built, tmp_path):
    samples = pd.read_parquet(built / SAMPLES_FILE)
    with pytest.raises(ValueError, match=r"^samples.parquet: fields gv_0..gv_\{d-1\} missing or not numbered from 0$"):
        check_controller_data(samples.drop(columns="gv_3"), "samples.parquet", kind="samples")
    # On disk: load_controller_data names the file.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", SAMPLES_FILE):
        (broken / name).write_bytes((built / name).read_bytes())
    grid = pd.read_parquet(built / GRID_FILE)
    grid.drop(columns="accuracy").to_parquet(broken / GRID_FILE)
    with pytest.raises(ValueError, match=rf"^{broken / GRID_FILE}: field accuracy missing from the grid table$"):
        load_controller_data(broken)
    with pytest.raises(ValueError, match="has no manifest.json"):
        load_controller_data(tmp_path)


# --- the entry point -------------------------------------------------------------------------------

def _runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_build_controller_data_end_to_end_then_resumed(tracking_store, estimator_file, tmp_path, capsys):
    from entry_points import build_controller_data as entry

    argv = ["--dataset_names", "synth_countvqa,synth_attrvqa", "--train_samples", "1", "--val_samples", "1",
            "--estimator", str(estimator_file), "--output_dir", str(tmp_path / "cd"), "--base_model", str(BASE_VLM)]
    assert entry.main(argv) == 0
    (run,) = _runs()
    metrics, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and params["estimator"] == str(estimator_file) and params["num_threads"] == "1"
    assert (metrics["samples_rows"], metrics["grid_rows"], metrics["chunks_written"]) == (4, 4 * 75, 4)
    assert metrics["build_seconds"] > 0 and 0 <= metrics["train_accuracy_full"] <= 1 and 0 <= metrics["val_accuracy_full"] <= 1
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "controller_data")}
    assert artifacts == {"controller_data/grid.parquet", "controller_data/samples.parquet", "controller_data/manifest.json"}
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"controller-data-grid", "controller-data-samples"}
    assert entry.main(argv) == 0  # the same parameters: every chunk is there already
    latest = max(_runs(), key=lambda r: r.info.start_time)
    assert (latest.data.metrics["chunks_written"], latest.data.metrics["chunks_skipped"]) == (0, 4)
    assert "0 chunks built, 4 already there" in capsys.readouterr().out


def test_an_estimator_alias_that_does_not_exist_is_one_line_and_leaves_no_run(tracking_store, tmp_path, capsys):
    from entry_points import build_controller_data as entry

    code = entry.main(["--train_samples", "1", "--val_samples", "1", "--output_dir", str(tmp_path / "cd"),
                       "--base_model", str(BASE_VLM)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: estimator: model='models:/latency-estimator@champion' cannot be resolved")
    assert not [r for r in _runs() if r.info.status == "RUNNING"]
    assert not (tmp_path / "cd").exists()
