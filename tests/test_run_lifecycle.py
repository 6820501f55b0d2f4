"""Run lifecycle faults (issue 17): SIGTERM, kill -9, input errors under `mlflow run`, secrets in
params, a fresh SQLite store opened by several processes at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tracking.entry_point import EntryPoint
from tracking.run_context import entry_point_run, sweep_orphaned_runs
from tracking.store import redact

REPO_ROOT = Path(__file__).resolve().parents[1]

# An entry point that works for `seconds` (printing "working" once its run is open).
SLEEPER = """
import sys, time
from dataclasses import dataclass
from tracking.entry_point import EntryPoint

@dataclass
class Params:
    seconds: float = 60.0

def execute(params, prepared, epoch_hook=None):
    print("working", flush=True)
    time.sleep(params.seconds)
    return {}

sys.exit(EntryPoint("sleeper", Params, study="lifecycle", execute=execute, summary=lambda p, o: "slept").main())
"""


def _start_sleeper(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "working"
    return proc


def _runs(status: str | None = None) -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    return [r for r in runs if status is None or r.info.status == status]


def test_sigterm_ends_the_run_failed_with_an_error_tag(tracking_store, subprocess_env, tmp_path):
    proc = _start_sleeper(tmp_path, subprocess_env)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    # (MLflow's own INFO lines about creating the fresh store's tables aside)
    assert [line for line in err.splitlines() if " INFO " not in line] == ["error: stopped by SIGTERM; the run was ended FAILED"]
    (run,) = _runs()
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "RunTerminated"


def test_a_killed_process_run_is_swept_as_orphaned_at_the_next_start(tracking_store, subprocess_env, tmp_path, capsys):
    proc = _start_sleeper(tmp_path, subprocess_env)
    proc.kill()
    proc.wait(timeout=30)
    (stuck,) = _runs("RUNNING")

    @dataclass
    class Params:
        pass

    entry = EntryPoint("noop", Params, study="lifecycle", execute=lambda p, prepared: {}, summary=lambda p, o: "done")
    assert entry.main([]) == 0
    err = capsys.readouterr().err
    assert f"1 run(s) left RUNNING by a process that is gone marked FAILED (error=orphaned): {stuck.info.run_id}" in err
    assert not _runs("RUNNING")
    swept = MlflowClient().get_run(stuck.info.run_id)
    assert swept.info.status == "FAILED" and swept.data.tags["error"] == "orphaned"


def test_a_live_run_is_not_swept(tracking_store):
    with entry_point_run("noop", {}, study="lifecycle") as run:
        assert sweep_orphaned_runs() == []
        assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"


def test_passwords_in_params_are_redacted(tracking_store):
    url = "postgresql://optuna:s3cret@db.example:5432/optuna"
    assert redact(f"storage={url} failed") == "storage=postgresql://optuna:***@db.example:5432/optuna failed"
    with entry_point_run("tune", {"storage": url}, study="lifecycle", tags={"note": url}) as run:
        pass
    stored = MlflowClient().get_run(run.info.run_id).data
    assert stored.params["storage"] == "postgresql://optuna:***@db.example:5432/optuna"
    assert "s3cret" not in stored.tags["note"]


def test_tune_with_a_wrong_storage_password_is_one_line(tracking_store, capsys):
    from entry_points import tune

    storage = "postgresql+psycopg2://optuna:wrong-password@127.0.0.1:1/optuna"  # nothing listens on port 1
    assert tune.main(["--target", "train_estimator", "--storage", storage, "--n_trials", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]
    assert len(err) == 1 and err[0].startswith("error: storage=postgresql+psycopg2://optuna:***@127.0.0.1:1/optuna: cannot open")
    assert "wrong-password" not in err[0]


@pytest.mark.slow
def test_input_error_under_mlflow_run_tags_the_failed_run(tracking_store, subprocess_env):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "train_estimator", "--env-manager", "local",
         "--experiment-name", "lifecycle", "-P", "device=bogus"],
        cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "error: device='bogus'" in result.stderr
    (run,) = _runs()
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("EstimatorError: device='bogus' is not a torch device")


@pytest.mark.slow
def test_first_runs_on_a_fresh_sqlite_store_do_not_race_in_the_migration(tmp_path, subprocess_env):
    code = ("from tracking.store import configure_tracking\nimport mlflow\nconfigure_tracking()\n"
            "with mlflow.start_run(): pass\n")
    env = {**subprocess_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert len(MlflowClient().search_runs(["0"])) == 3


@pytest.mark.parametrize("argv, message", [
    (["--predictor_epochs", "0"], "pipeline step train_predictor (train_predictor): "),
    (["--estimator_epochs", "0"], "pipeline step train_estimator (train_estimator): "),
])
def test_pipeline_checks_every_step_before_the_first_runs(tracking_store, capsys, argv, message):
    # predictor_epochs=0 ran four steps (and registered a version) before failing with a traceback.
    from mlflow_projects import pipeline

    assert pipeline.main([*argv, "--base_checkpoint", "no-such-checkpoint"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}") and "num_epochs" in errors[0]
    assert not _runs()
