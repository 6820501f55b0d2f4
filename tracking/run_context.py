"""One way to open a run for an entry point, and how runs end when things go wrong.

Experiment per study; tags: git commit, entry point, study, the process that owns the run (host, pid,
start time) and the data digest once known; params logged with passwords in URLs redacted. Under
`mlflow run` the run already exists (MLFLOW_RUN_ID) and is reused.

Nothing is left RUNNING:
- an exception (an input error found late, a diverged loss, Ctrl-C) ends the run FAILED with `error`
  and `error_type` tags, and re-raises;
- SIGTERM is turned into `RunTerminated` while the run is open, so it ends the same way;
- `kill -9` (or a dead machine) cannot be handled by the process itself: `sweep_orphaned_runs`, called
  at the start of every entry point, marks RUNNING runs whose owning process is gone FAILED with
  `error=orphaned`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import psutil
from mlflow.entities import RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tracking.store import configure_tracking, redact, server_reachable, tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_TAG_CHARS = 5000
ORPHANED = "orphaned"  # the `error` tag of a run whose process ended without closing it
# Tags naming the process that owns a run (what the orphan sweep checks).
HOST_TAG, PID_TAG, STARTED_TAG = "process_host", "process_id", "process_started"

_checkpoint_notes: list[str] = []  # where the current run's trainer keeps its checkpoint (see note_checkpoint)


class RunTerminated(BaseException):
    """SIGTERM arrived while a run was open (a BaseException, like KeyboardInterrupt: nothing catches it by accident)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise RunTerminated(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: f"{psutil.Process().create_time():.2f}"}


def _process_alive(pid: int, started: float) -> bool:
    """Whether process `pid` still runs and is the one that started at `started` (not a reused pid)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def sweep_orphaned_runs() -> list[str]:
    """Mark FAILED (tag error=orphaned) the RUNNING runs of this host whose owning process is gone
    (killed with -9, or the machine restarted); their ids."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000)]
    if not experiments:
        return []
    host = socket.gethostname().replace("'", "")
    running = client.search_runs(experiments, filter_string=f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'",
                                 max_results=1000)
    orphaned = []
    for run in running:
        tags = run.data.tags
        try:
            alive = _process_alive(int(tags[PID_TAG]), float(tags[STARTED_TAG]))
        except (KeyError, ValueError):
            continue  # not opened by entry_point_run: nothing says which process owns it
        if not alive:
            client.set_tag(run.info.run_id, "error", ORPHANED)
            client.set_tag(run.info.run_id, "error_type", ORPHANED)
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            orphaned.append(run.info.run_id)
    return orphaned


def error_tags(exc: BaseException) -> dict[str, str]:
    return {"error": redact(f"{type(exc).__name__}: {exc}")[:MAX_TAG_CHARS], "error_type": type(exc).__name__}


def fail_run(run_id: str, exc: BaseException) -> None:
    """End run `run_id` FAILED with the error tags of `exc` (a run opened by `mlflow run` whose inputs were refused)."""
    client = MlflowClient()
    for key, value in error_tags(exc).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def note_checkpoint(where: str | os.PathLike[str], how_to_resume: str) -> None:
    """Record where this run's trainer keeps its checkpoint, and how to resume from it: said in the one
    line printed when the tracking server goes away mid-run."""
    _checkpoint_notes[:] = [f"checkpoint in {where} ({how_to_resume})"]


def checkpoint_note() -> str:
    return _checkpoint_notes[0] if _checkpoint_notes else "no checkpoint was written"


def tracking_server_lost() -> str | None:
    """Why the tracking server no longer answers (None when it does, or the store is not a server)."""
    uri = tracking_uri()
    return server_reachable(uri, timeout_s=3.0) if uri.startswith(("http://", "https://")) else None


def git_commit(repo: Path = REPO_ROOT) -> str:
    """HEAD's commit, with '-dirty' when the tree has uncommitted changes to tracked files."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flatten(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: ("" if v is None else redact(str(v))) for k, v in params.items()}


@contextmanager
def entry_point_run(
    entry_point: str,
    params: Mapping[str, Any],
    *,
    study: str,
    run_name: str | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    log_system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or resume, under `mlflow run`) the run of one entry point in experiment `study` and log its params.

    On an exception (SIGTERM included) the run is ended FAILED with `error` and `error_type` tags, and
    the exception propagates, so nothing is left RUNNING.
    """
    configure_tracking()
    if not nested:
        _checkpoint_notes.clear()
    resumed_run_id = os.environ.get("MLFLOW_RUN_ID") if not nested else None
    if not resumed_run_id and not nested:
        if mlflow.get_experiment_by_name(study) is None:  # made here: set_experiment would narrate it at INFO
            try:
                mlflow.create_experiment(study)
            except mlflow.exceptions.MlflowException:  # another process made it first
                pass
        mlflow.set_experiment(study)
    run_tags = {
        "entry_point": entry_point,
        "study": study,
        "git_commit": git_commit(),
        **_process_tags(),
        **{k: redact(v) for k, v in (tags or {}).items()},
    }
    run = mlflow.start_run(
        run_id=resumed_run_id,
        run_name=None if resumed_run_id else (run_name or entry_point),
        nested=nested,
        tags=run_tags if not resumed_run_id else None,
        log_system_metrics=log_system_metrics,
    )
    if resumed_run_id:
        # Consumed: a nested run started later (e.g. an Optuna trial) must not resume this one.
        os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        if resumed_run_id:
            mlflow.set_tags(run_tags)
        # `mlflow run` already logged the -P params it was given; log the full resolved set
        # (defaults included) without clashing on values that are the same.
        existing = mlflow.get_run(run.info.run_id).data.params
        missing = {k: v for k, v in _flatten(params).items() if k not in existing}
        if missing:
            mlflow.log_params(missing)
        with _sigterm_raises():
            yield run
    except BaseException as exc:
        server_lost = tracking_server_lost() is not None
        if not server_lost:
            mlflow.set_tags(error_tags(exc))
        try:
            mlflow.end_run(status=RunStatus.to_string(RunStatus.FAILED))  # leaves the active-run stack first
        except MlflowException:
            if not server_lost:
                raise  # with the server gone, the next start's orphan sweep ends this run
        raise
    else:
        mlflow.end_run()


def set_data_digest(digest: str) -> None:
    mlflow.set_tag("data_digest", digest)
