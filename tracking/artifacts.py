"""Artifacts, plots and dataset inputs of a run."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.data.code_dataset_source import CodeDatasetSource  # noqa: E402

from core.data_digest import frame_digest  # noqa: E402  (re-exported: entry points import it from here)

DATASET_CONTEXTS = ("training", "validation", "test", "profile")


def _log_file(write, artifact_file: str) -> None:
    path_in_run = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / path_in_run.name
        write(path)
        parent = str(path_in_run.parent) if str(path_in_run.parent) != "." else None
        mlflow.log_artifact(str(path), artifact_path=parent)


def log_csv(frame: pd.DataFrame, artifact_file: str) -> None:
    _log_file(lambda p: frame.to_csv(p, index=False), artifact_file)


def log_json(obj: Any, artifact_file: str) -> None:
    _log_file(lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)), artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    _log_file(lambda p: p.write_text(text), artifact_file)


def log_figure(figure: "plt.Figure", artifact_file: str) -> None:
    """Log a matplotlib figure as PNG and close it."""
    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_figures(figures: dict[str, "plt.Figure"], folder: str = "plots") -> None:
    """Each figure as `<folder>/<stem>.png`."""
    for stem, figure in figures.items():
        log_figure(figure, f"{folder}/{stem}.png")


def log_dataset_input(
    frame: pd.DataFrame, name: str, context: str, source: str | dict[str, str], targets: str | None = None
) -> str:
    """Record a data split as an MLflow dataset input; returns its digest.

    `source` is a file path/URI, or a dict describing generated data (generator and its seed).
    """
    if context not in DATASET_CONTEXTS:
        raise ValueError(f"dataset context must be one of {DATASET_CONTEXTS}, got {context!r}")
    resolved = CodeDatasetSource({k: str(v) for k, v in source.items()}) if isinstance(source, dict) else source
    dataset = mlflow.data.from_pandas(frame, source=resolved, name=name, targets=targets, digest=frame_digest(frame))
    mlflow.log_input(dataset, context=context)
    return dataset.digest


def log_split_inputs(
    frame: pd.DataFrame, parts: dict[str, slice], name_prefix: str, source: str | dict[str, str], kind: str
) -> None:
    """The split a run was trained and scored on: the digest of `frame` and of the part boundaries as the
    run's `data_digest` tag (held-out figures compare only on the same rows and the same test part: promote
    compares versions by it), each part (context -> row slice of `frame`) as a dataset input
    `<name_prefix>-<context>` with its row count as a `split_<context>_rows` param, and `kind` (how it was
    split) as the `split_kind` param."""
    bounds = {context: range(len(frame))[rows] for context, rows in parts.items()}
    layout = ";".join(f"{c}={r.start}:{r.stop}" for c, r in sorted(bounds.items()))
    mlflow.set_tag("data_digest", hashlib.sha256(f"{frame_digest(frame)}|{layout}".encode()).hexdigest()[:16])
    mlflow.log_param("split_kind", kind)
    for context, rows in parts.items():
        log_dataset_input(frame.iloc[rows], name=f"{name_prefix}-{context}", context=context, source=source)
    mlflow.log_params({f"split_{context}_rows": len(frame.iloc[rows]) for context, rows in parts.items()})
