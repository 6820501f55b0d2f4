"""Where runs go: the tracking URI (embedded SQLite by default, a team server when set).

Also the two store-level protections every entry point gets from `configure_tracking`:
- MLflow's HTTP client retries a dead server for ~4 min by default (7 retries, 120 s timeout); our
  entry points bound that (`HTTP_LIMITS`, unless the environment sets them), so a server that dies
  mid-run costs seconds, not minutes. `mlflow run` itself reads the same variables: export them
  before calling it (the Makefile does).
- MLflow migrates a fresh SQLite store's schema on first use, and two processes doing that at once
  fail in alembic. The first use of a SQLite store holds an advisory lock on the database file, so a
  second process waits for the migration instead of racing it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# One MLflow experiment per study keeps `mlflow ui` readable; each entry point names its study.
FORECASTING_STUDY = "workload-forecasting"
ADAPTIVE_VLM_STUDY = "adaptive-vlm"
PROMOTION_STUDY = "model-promotion"
PIPELINE_STUDY = "pipeline"

# Worst case per MLflow request to a dead server: 3 tries x 10 s timeout + 1 + 2 s of backoff.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]*)@")
_migrated: set[str] = set()


class TrackingServerError(RuntimeError):
    """The configured tracking server cannot be reached."""


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by *** (postgresql://u:secret@h -> postgresql://u:***@h)."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def server_reachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when the server at `uri` answers /health within `timeout_s`, else why not."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def configure_tracking() -> str:
    """Use $MLFLOW_TRACKING_URI if set, else the embedded SQLite store; fail fast if a server is down."""
    uri = tracking_uri()
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    if uri.startswith(("http://", "https://")):
        if (reason := server_reachable(uri)) is not None:
            raise TrackingServerError(f"MLFLOW_TRACKING_URI={redact(uri)} is unreachable ({reason})")
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _migrated:
        _create_sqlite_schema(uri)
        _migrated.add(uri)
    return uri


def _create_sqlite_schema(uri: str) -> None:
    """Open the tracking and registry stores once under an exclusive flock on the database file (SQLite
    itself uses fcntl record locks, which flock does not touch): whoever comes first creates or migrates
    the schema, the others wait and find it done."""
    database = Path(uri[len("sqlite:///"):])
    if str(database) in ("", ":memory:"):
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    # MLflow and alembic narrate the schema creation at INFO: noise before an entry point's one-line answer.
    chatty = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in chatty]
    with open(database, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for logger in chatty:
                logger.setLevel(logging.WARNING)
            client = MlflowClient(uri, uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        finally:
            for logger, level in zip(chatty, levels):
                logger.setLevel(level)
            fcntl.flock(handle, fcntl.LOCK_UN)
