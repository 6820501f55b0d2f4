"""One way to open a run for an entry point.

Experiment per study; tags: git commit, entry point, study (and the data digest once known);
params logged; an exception marks the run FAILED with the error in a tag and re-raises.
Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is reused.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import RunStatus

from tracking.store import configure_tracking

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_TAG_CHARS = 5000


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
    return {k: ("" if v is None else str(v)) for k, v in params.items()}


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

    On an exception the run is ended FAILED with `error` and `error_type` tags, and the exception
    propagates, so nothing is left RUNNING.
    """
    configure_tracking()
    resumed_run_id = os.environ.get("MLFLOW_RUN_ID") if not nested else None
    if not resumed_run_id and not nested:
        mlflow.set_experiment(study)
    run_tags = {
        "entry_point": entry_point,
        "study": study,
        "git_commit": git_commit(),
        **(tags or {}),
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
        yield run
    except BaseException as exc:
        mlflow.set_tags(
            {"error": f"{type(exc).__name__}: {exc}"[:MAX_TAG_CHARS], "error_type": type(exc).__name__}
        )
        mlflow.end_run(status=RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run()


def set_data_digest(digest: str) -> None:
    mlflow.set_tag("data_digest", digest)
