"""Resolve what `evaluate_estimator` and `visualize_estimator` are pointed at: a latency estimator
(registry URI, `train_estimator` run id, runs:/ URI or checkpoint file) and, when it came from a
`train_estimator` run, the split that run recorded, its held-out-config model and its history.

Artifacts of a `train_estimator` run that this module reads (written by that entry point):
  checkpoints/best.pt                    the selected weights (also inside the registered model)
  heldout_config/checkpoints/best.pt     the model trained without the held-out knob value
  split/split.json                       sample ids per split and the held-out knob value
  training/history.json                  one record per epoch
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from core.latency.estimator import EstimatorError, LatencyEstimator

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CHECKPOINT = "checkpoints/best.pt"
HELDOUT_CHECKPOINT = "heldout_config/checkpoints/best.pt"
SPLIT_RECORD = "split/split.json"
HISTORY = "training/history.json"
SPLIT_MODES = ("recorded", "all")


class EstimatorReferenceError(ValueError):
    """A model reference that does not lead to a latency estimator (one line naming it)."""


@dataclass
class ResolvedEstimator:
    reference: str
    estimator: LatencyEstimator
    run_id: str | None = None  # the train_estimator run, when there is one
    split: dict[str, Any] | None = None
    heldout_estimator: LatencyEstimator | None = None
    history: list[dict] = field(default_factory=list)


def _run_id_of(ref: str) -> str | None:
    """The source run of `ref`, or None for a file; EstimatorReferenceError when it resolves to nothing."""
    if RUN_ID.match(ref):
        return ref
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].split("/", 1)[0]
        if not RUN_ID.match(run_id):
            raise EstimatorReferenceError(f"model={ref!r}: {run_id!r} is not a run id")
        return run_id
    if ref.startswith("models:/"):
        client = MlflowClient()
        name_version = ref[len("models:/"):].strip("/")
        try:
            if "@" in name_version:
                name, alias = name_version.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = name_version.rsplit("/", 1)
                version = client.get_model_version(name, number)
        except (MlflowException, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise EstimatorReferenceError(f"model={ref!r} cannot be resolved in {mlflow.get_tracking_uri()}: {first}") from None
        if not version.run_id:
            raise EstimatorReferenceError(f"model={ref!r} has no source run")
        return version.run_id
    if Path(ref).is_file():
        return None
    raise EstimatorReferenceError(
        f"model={ref!r} is neither a checkpoint file, a run id, a runs:/ URI nor a models:/ URI"
    )


def _download(run_id: str, artifact_path: str, into: Path) -> Path | None:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(into)))
    except (MlflowException, OSError):
        return None


def resolve_estimator(ref: str) -> ResolvedEstimator:
    """Load the estimator `ref` points to, with its training run's split, held-out model and history."""
    if not ref:
        raise EstimatorReferenceError("model is empty: pass a models:/ URI, a train_estimator run id or a checkpoint file")
    run_id = _run_id_of(ref)
    if run_id is None:
        return ResolvedEstimator(ref, LatencyEstimator.load(ref))
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise EstimatorReferenceError(f"model={ref!r}: run {run_id} does not exist in {mlflow.get_tracking_uri()}") from None
    entry_point = run.data.tags.get("entry_point")
    if entry_point != "train_estimator":
        raise EstimatorReferenceError(f"model={ref!r}: run {run_id} is a {entry_point or 'untagged'} run, not train_estimator")
    # Downloads stay for the life of the process: the estimators are loaded from them lazily enough.
    into = Path(tempfile.mkdtemp(prefix="estimator-ref-"))
    checkpoint = _download(run_id, CHECKPOINT, into)
    if checkpoint is None:
        raise EstimatorReferenceError(f"model={ref!r}: run {run_id} has no {CHECKPOINT} artifact (did it finish?)")
    resolved = ResolvedEstimator(ref, LatencyEstimator.load(checkpoint), run_id)
    if (split := _download(run_id, SPLIT_RECORD, into)) is not None:
        resolved.split = json.loads(split.read_text())
    if (heldout := _download(run_id, HELDOUT_CHECKPOINT, into / "heldout")) is not None:
        resolved.heldout_estimator = LatencyEstimator.load(heldout)
    if (history := _download(run_id, HISTORY, into)) is not None:
        resolved.history = json.loads(history.read_text())
    return resolved


def evaluation_sets(resolved: ResolvedEstimator, table: pd.DataFrame, split: str) -> dict[str, tuple[LatencyEstimator, pd.DataFrame]]:
    """{metric prefix: (estimator, rows it never trained on)}.

    split="all": every row of `table` is test data ('test_'). split="recorded": the test samples
    the training run recorded ('test_') and, with the held-out-config model, the rows of the
    held-out knob value ('heldout_config_').
    """
    if split not in SPLIT_MODES:
        raise EstimatorReferenceError(f"split must be one of {list(SPLIT_MODES)}, got {split!r}")
    if split == "all":
        return {"test_": (resolved.estimator, table)}
    if resolved.split is None:
        raise EstimatorReferenceError(
            f"model={resolved.reference!r} has no recorded split (not from a train_estimator run): pass split=all"
        )
    test_ids = set(resolved.split["by_sample"]["test"])
    test = table[table["sample_id"].astype(str).isin(test_ids)].reset_index(drop=True)
    if test.empty:
        raise EstimatorError(
            f"results_dir holds none of the {len(test_ids)} test samples recorded by run {resolved.run_id}: "
            "pass split=all to score every row of a table the model never saw"
        )
    out = {"test_": (resolved.estimator, test)}
    heldout = resolved.split.get("heldout_config")
    if heldout and resolved.heldout_estimator is not None:
        rows = table[table[heldout["knob"]] == heldout["value"]].reset_index(drop=True)
        if not rows.empty:
            out["heldout_config_"] = (resolved.heldout_estimator, rows)
    return out
