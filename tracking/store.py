"""Where runs go: the tracking URI (embedded SQLite by default, a team server when set) and studies.

An experiment per study keeps `mlflow ui` readable: every entry point belongs to one study.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import mlflow

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# entry point -> study (MLflow experiment name)
STUDY_OF_ENTRY_POINT: dict[str, str] = {
    "train_predictor": "workload-forecasting",
    "train_base_model": "adaptive-vlm",
    "evaluate_base_model": "adaptive-vlm",
    "importance": "adaptive-vlm",
    "profile": "adaptive-vlm",
    "train_estimator": "adaptive-vlm",
    "evaluate_estimator": "adaptive-vlm",
    "visualize_estimator": "adaptive-vlm",
    "promote": "model-promotion",
    "pipeline": "pipeline",
}


class TrackingServerError(RuntimeError):
    """The configured tracking server cannot be reached."""


def study_for(entry_point: str) -> str:
    return STUDY_OF_ENTRY_POINT.get(entry_point, entry_point)


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
