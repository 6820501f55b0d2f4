"""Where runs go: the tracking URI (embedded SQLite by default, a team server when set)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import mlflow

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# One MLflow experiment per study keeps `mlflow ui` readable; each entry point names its study.
FORECASTING_STUDY = "workload-forecasting"
ADAPTIVE_VLM_STUDY = "adaptive-vlm"
PROMOTION_STUDY = "model-promotion"
PIPELINE_STUDY = "pipeline"


class TrackingServerError(RuntimeError):
    """The configured tracking server cannot be reached."""


def configure_tracking() -> str:
    """Use $MLFLOW_TRACKING_URI if set, else the embedded SQLite store; fail fast if a server is down."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingServerError(
                f"MLFLOW_TRACKING_URI={uri} is unreachable ({getattr(exc, 'reason', exc)})"
            ) from None
    mlflow.set_tracking_uri(uri)
    return uri
