"""Shared fixtures: a real SQLite-backed MLflow store in a temporary directory per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty embedded MLflow store (SQLite + local artifacts) under tmp_path; cwd moves there."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    # An experiment made active by an earlier test belongs to another store.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    while mlflow.active_run():
        mlflow.end_run()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def subprocess_env(tracking_store: str) -> dict[str, str]:
    """Environment for `mlflow run` / entry-point subprocesses: this venv first on PATH, the test store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_store
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.fixture(scope="session")
def synthetic_profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ProfileStore results directory (read-only for tests): two data sets of 5 samples x 75
    MolmoE configs x 2 runs each, latencies from tests.helpers.moe_law with 1% noise."""
    from core.profiling.store import ProfileStore
    from tests.helpers import synthetic_profile

    results_dir = tmp_path_factory.mktemp("profiles") / "synthetic"
    store = ProfileStore(results_dir)
    for seed, dataset in enumerate(("synthetic_a", "synthetic_b")):
        store.append(synthetic_profile(num_samples=5, num_runs=2, seed=seed, dataset=dataset))
    return results_dir


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MolmoE release in the published layout (config.json, safetensors shards, tokenizer.json),
    written by the project's own writer: what `-P backend=molmoe_arch -P model_path=DIR` reads."""
    from core.vlm.molmoe_arch import MolmoeArchBackend
    from core.vlm.molmoe_checkpoint import write_release_checkpoint, write_word_level_tokenizer
    from tests.test_molmoe_checkpoint import WORDS

    source = MolmoeArchBackend(size="tiny", device="cpu", seed=5)
    directory = write_release_checkpoint(source, tmp_path_factory.mktemp("release") / "MolmoE-tiny")
    write_word_level_tokenizer(directory / "tokenizer.json", source.dims.text_vocab, WORDS)
    return directory
