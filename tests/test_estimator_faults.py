"""train_estimator under faults (issue 17): a resume against another table, a bad device, a diverged
loss. Each ends in one line, leaves no run RUNNING, and keeps the checkpoints / registers nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import core.latency.estimator as estimator
from core.profiling.store import ProfileStore
from entry_points import train_estimator
from tests.helpers import synthetic_profile


def _error_lines(capsys) -> list[str]:
    # (MLflow's own INFO lines about creating a fresh store's tables aside)
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_resume_against_another_table_is_refused_and_keeps_the_checkpoints(tracking_store, synthetic_profile_dir, tmp_path, capsys):
    # It resumed on the other table, exited 0 with a held-out MAPE of 996% and overwrote the checkpoints.
    argv = ["--results_dir", str(synthetic_profile_dir), "--num_epochs", "2", "--output_dir", str(tmp_path / "out"),
            "--register", "false", "--heldout_config", "false"]
    assert train_estimator.main(argv) == 0
    (first,) = _runs()
    checkpoint = tmp_path / "out" / first.info.run_id
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    other = tmp_path / "other"
    ProfileStore(other).append(synthetic_profile(num_samples=5, num_runs=2, seed=7, dataset="synthetic_a"))
    capsys.readouterr()
    assert train_estimator.main([*argv, "--results_dir", str(other), "--resume_dir", str(checkpoint), "--num_epochs", "4"]) == 2
    (line,) = _error_lines(capsys)
    assert "trained on other data" in line and str(checkpoint / "last.pt") in line
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert len(_runs()) == 1  # refused before a run opened
    # The same table resumes.
    assert train_estimator.main([*argv, "--resume_dir", str(checkpoint), "--num_epochs", "4"]) == 0


@pytest.mark.parametrize("device, message", [("bogus", "device='bogus' is not a torch device"),
                                             ("cuda:7", "device='cuda:7' is not available")])
def test_device_is_checked_in_one_line(tracking_store, synthetic_profile_dir, capsys, device, message):
    # A 52-line traceback from inside the training loop.
    assert train_estimator.main(["--results_dir", str(synthetic_profile_dir), "--device", device]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"error: {message}")
    assert not _runs()


def test_infinite_lr_is_refused_before_the_run(tracking_store, synthetic_profile_dir, capsys):
    assert train_estimator.main(["--results_dir", str(synthetic_profile_dir), "--lr", "inf"]) == 2
    assert _error_lines(capsys) == ["error: parameter lr must be a finite number > 0, got inf"]
    assert not _runs()


def test_diverged_loss_stops_in_one_line_and_registers_nothing(tracking_store, synthetic_profile_dir, tmp_path, capsys,
                                                                monkeypatch):
    # lr=inf gave a NaN loss every epoch, exit 0, FINISHED, and the untrained model registered.
    finite_loss = estimator._loss
    monkeypatch.setattr(estimator, "_loss", lambda *args: finite_loss(*args) * float("nan"))
    argv = ["--results_dir", str(synthetic_profile_dir), "--num_epochs", "3", "--output_dir", str(tmp_path / "out")]
    assert train_estimator.main(argv) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("error: training diverged at epoch 1: train_loss=nan")
    (run,) = _runs()
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "TrainingDiverged"
    assert not MlflowClient().search_registered_models()
    assert not (tmp_path / "out" / run.info.run_id / "last.pt").exists()  # no NaN weights kept as a checkpoint


def test_promote_to_a_table_no_version_was_trained_on_says_so(tracking_store, synthetic_profile_dir, tmp_path, capsys):
    # It said "no version has a logged metric", as if the metric were missing.
    from entry_points import promote

    assert train_estimator.main(["--results_dir", str(synthetic_profile_dir), "--num_epochs", "1",
                                 "--heldout_config", "false", "--output_dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert promote.main(["--model_name", "latency-estimator", "--table", "0123456789abcdef"]) == 2
    (line,) = _error_lines(capsys)
    assert "no version of 'latency-estimator' was trained on table '0123456789abcdef'" in line
    assert "(versions with 'test_mape_mean' were trained on: " in line
