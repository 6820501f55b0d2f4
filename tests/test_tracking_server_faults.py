"""A tracking server that dies mid-training (issue 17): the trainer exits non-zero within 2 min in one
line naming its checkpoint; with the server back, the rerun sweeps the orphaned run and resumes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    _kill(proc)
    raise RuntimeError("mlflow server did not start within 120 s")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn workers
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_dead_server_mid_training_exits_in_one_line_and_the_rerun_resumes(tmp_path, synthetic_profile_dir):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "PYTHONPATH": str(REPO_ROOT),
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    outputs = tmp_path / "outputs"
    argv = [sys.executable, "-m", "entry_points.train_estimator", "--results_dir", str(synthetic_profile_dir),
            "--num_epochs", "400", "--output_dir", str(outputs), "--heldout_config", "false", "--register", "false"]
    server = _start_server(tmp_path, port)
    try:
        trainer = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while not list(outputs.glob("*/epoch_010.pt")) and time.monotonic() < deadline and trainer.poll() is None:
            time.sleep(0.2)
        assert trainer.poll() is None, trainer.communicate()
        (checkpoint,) = [p.parent for p in outputs.glob("*/epoch_010.pt")]
        _kill(server)
        killed_at = time.monotonic()
        _, err = trainer.communicate(timeout=180)
        took = time.monotonic() - killed_at
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert trainer.returncode == 3 and took < 120, (trainer.returncode, took, err[-3000:])
        assert len(errors) == 1 and "stopped answering" in errors[0], err[-3000:]
        assert f"checkpoint in {checkpoint} (rerun with -P resume_dir={checkpoint} to resume)" in errors[0]
        assert "Traceback" not in err
        print(f"trainer exit {trainer.returncode} {took:.1f} s after the server was killed: {errors[0]}")
        epochs_done = len(__import__("torch").load(checkpoint / "last.pt", weights_only=True)["history"])

        server = _start_server(tmp_path, port)
        rerun = subprocess.run([*argv[:5], "--num_epochs", str(epochs_done + 5), *argv[7:], "--resume_dir", str(checkpoint)],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"1 run(s) left RUNNING by a process that is gone marked FAILED (error=orphaned): {checkpoint.name}" in rerun.stderr
        history = __import__("torch").load(checkpoint / "last.pt", weights_only=True)["history"]
        assert len(history) == epochs_done + 5  # continued from the checkpoint, not from epoch 1
        from mlflow.tracking import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
        assert client.get_run(checkpoint.name).data.tags["error"] == "orphaned"
    finally:
        _kill(server)
