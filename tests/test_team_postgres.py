"""The team set-up for real: `scripts/mlflow_server.sh` (what `make server` runs) starts a throwaway
PostgreSQL cluster on loopback and `mlflow server` on it; `train_estimator` logs to that server through
MLFLOW_TRACKING_URI, and two concurrent `tune` workers share one PostgreSQL Optuna study.

Needs PostgreSQL's server binaries (initdb, pg_ctl); `.ci/run` installs Debian's `postgresql` and sets
REQUIRE_POSTGRES=1, which turns a missing initdb into a failure instead of a skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
# A throwaway cluster and server cost ~25 s to start and each test ~30 s: slow as well.
pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _postgres_binary(name: str) -> str | None:
    found = shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [None])[-1]
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TeamServer:
    tracking_uri: str
    mlflow_db: str  # SQLAlchemy URL of the backend store
    optuna_storage: str
    log: Path
    pgpass: Path  # the generated libpq password file of role mlflow
    admin_password: Path


@pytest.fixture(scope="module")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> TeamServer:
    if _postgres_binary("initdb") is None:
        reason = "PostgreSQL's initdb is not installed (Debian: apt-get install postgresql; .ci/run does it)"
        if os.environ.get("REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("mlflow-server")
    # Outside pytest's private (0700) tmp root: run as root, the cluster belongs to user postgres,
    # which must reach its data directory (the script hands it over).
    pgdata = Path(tempfile.mkdtemp(prefix="pytest-pgdata-"))
    pg_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "MLFLOW_SERVER_DIR": str(state), "PGDATA": str(pgdata), "PG_PORT": str(pg_port),
           "MLFLOW_PORT": str(mlflow_port), "MLFLOW_WORKERS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = state / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "mlflow_server.sh")], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{mlflow_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow_server.sh did not come up (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    db = f"postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}"
    yield TeamServer(uri, f"{db}/mlflow", f"{db}/optuna", log, state / "pgpass", state / "postgres-admin.password")
    proc.send_signal(signal.SIGTERM)  # the script stops the server, then PostgreSQL
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["bash", str(REPO_ROOT / "scripts" / "mlflow_server.sh"), "stop"], env=env, timeout=60)
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture
def server_env(team_server: TeamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Subprocess environment pointing at the team server; this process's client too."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.tracking_uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(team_server.pgpass))  # the role's password, never in a URL
    mlflow.set_tracking_uri(team_server.tracking_uri)
    env = dict(os.environ)
    env.update({"MLFLOW_TRACKING_URI": team_server.tracking_uri, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    return env


def test_train_estimator_logs_to_the_postgres_backed_server(team_server, server_env, synthetic_profile_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "entry_points.train_estimator", "--results_dir", str(synthetic_profile_dir),
         "--num_epochs", "3", "--output_dir", str(tmp_path / "outputs")],
        cwd=tmp_path, env=server_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(team_server.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("adaptive-vlm").experiment_id],
                                filter_string="tags.entry_point = 'train_estimator'")
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 3
    assert run.data.metrics["test_mape_prefill"] < run.data.metrics["baseline_linear_test_mape_prefill"] + 100
    # Artifacts went through the server (proxied), not to a path this process shares with it.
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    # The run is a row of the PostgreSQL backend store.
    with sqlalchemy.create_engine(team_server.mlflow_db).connect() as db:
        rows = db.execute(sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run.info.run_id}).all()
    assert rows == [("FINISHED",)]
    model = mlflow.pyfunc.load_model("models:/latency-estimator/1")
    configs = pd.DataFrame({"tier": ["low", "high"], "top_k": [4, 12], "num_active_blocks": [8, 16],
                            "vision_tokens": [576, 1872], "text_tokens": [32, 32], "crops": [3, 12]})
    predicted = model.predict(configs, params={"output_tokens": 8})
    assert (predicted["T_total_ms"] > 0).all() and (predicted["T_total_ms_p90"] >= predicted["T_total_ms"]).all()


def test_two_tune_workers_share_one_postgres_study(team_server, server_env, synthetic_profile_dir, tmp_path):
    study_name, trials_per_worker = "team-estimator", 3
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "entry_points.tune", "--target", "train_estimator", "--n_trials", str(trials_per_worker),
             "--num_epochs", "2", "--storage", team_server.optuna_storage, "--study_name", study_name,
             "--sampler", "random", "--pruner", "none", "--seed", str(worker),
             "--target_params", f"results_dir={synthetic_profile_dir};output_dir={tmp_path / f'outputs{worker}'}"],
            cwd=tmp_path, env=server_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for worker in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name=study_name, storage=team_server.optuna_storage)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(2 * trials_per_worker))  # none lost, none numbered twice
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    client = MlflowClient(team_server.tracking_uri)
    experiment = client.get_experiment_by_name("adaptive-vlm")
    trial_runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.optuna_study = '{study_name}'",
                                    max_results=1000)
    parents = [r for r in trial_runs if r.data.tags.get("entry_point") == "tune"]
    trials = [r for r in trial_runs if "optuna_trial" in r.data.tags]
    assert len(parents) == 2
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trials) == numbers  # each trial one MLflow run
    assert {r.data.tags["parent_tune_run"] for r in trials} == {p.info.run_id for p in parents}


def test_the_cluster_wants_passwords_and_mlflow_is_no_superuser(team_server, monkeypatch):
    # The cluster trusted every local user, and its `mlflow` role was a superuser.
    for secret in (team_server.pgpass, team_server.admin_password):
        assert secret.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password"):
        sqlalchemy.create_engine(team_server.mlflow_db).connect().close()
    monkeypatch.setenv("PGPASSFILE", str(team_server.pgpass))
    with sqlalchemy.create_engine(team_server.mlflow_db).connect() as db:
        role = db.execute(sqlalchemy.text("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = 'mlflow'")).one()
    assert tuple(role) == (False, False, False)
