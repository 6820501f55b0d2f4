"""Resolve what `evaluate_estimator` and `visualize_estimator` are pointed at: a latency estimator
(registry URI, `train_estimator` run id, runs:/ URI or checkpoint file) and, when it came from a
`train_estimator` run, the split that run recorded, its held-out-config model and its history.
Both entry points take the same `EstimatorEvaluationParams` and check them with `prepare_evaluation`.

The artifacts of a `train_estimator` run, written by `log_training_data` and `log_fit` here (the
model by `tracking.pyfunc_models.log_latency_estimator`); `resolve_estimator` reads the first four:
  checkpoints/best.pt                    the selected weights (also inside the registered model)
  split/split.json                       sample ids per split and the held-out knob value
  heldout_config/checkpoints/best.pt     the model trained without the held-out knob value
  training/history.json                  one record per epoch
  heldout_config/history.json            the same for the held-out-config model
  evaluation/per_config_<set>.csv        errors per knob config (`per_config_artifact`; evaluate_estimator too)
  model                                  the LatencyEstimatorPyfunc model, registered as MODEL_NAME
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

from core.latency.data import EstimatorError, TrainingData, load_profile_table, split_record
from core.latency.estimator import LatencyEstimator, model_checkpoints
from core.latency.study import FittedSplit
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_json
from tracking.cli import comma_list
from tracking.run_context import set_data_digest

MODEL_NAME = "latency-estimator"  # the registered model train_estimator writes
DEFAULT_RESULTS_DIR = "data/profiles/h200-molmoe-arch-graph"  # the committed table the estimator trains on
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CHECKPOINT = "checkpoints/best.pt"
HELDOUT_CHECKPOINT = "heldout_config/checkpoints/best.pt"
SPLIT_RECORD = "split/split.json"
HISTORY = "training/history.json"
HELDOUT_HISTORY = "heldout_config/history.json"
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


def log_training_data(data: TrainingData, results_dir: str, dataset_names: list[str] | None) -> None:
    """The table's digest (the data_digest tag promote compares versions by), split sizes as params,
    each split as an MLflow dataset input, the sample ids as SPLIT_RECORD."""
    split, heldout, source = data.split, data.heldout, str(Path(results_dir).resolve())
    set_data_digest(frame_digest(data.table))
    mlflow.log_params({"split": split.kind, **{f"split_{k}": v for k, v in split.sizes().items()}})
    for context, part in zip(("training", "validation", "test"), split):
        log_dataset_input(part, name=f"profile-{context}", context=context, source=source)
    if heldout is not None:
        mlflow.log_params({**{f"heldout_config_{k}": v for k, v in heldout.sizes().items()},
                           "heldout_config_value": str(heldout.heldout_value)})
        log_dataset_input(heldout.test, name=f"profile-heldout-{heldout.heldout_knob}-test", context="test", source=source)
    log_json({"results_dir": source, "dataset_names": dataset_names, **split_record(split, heldout)}, SPLIT_RECORD)


def log_fit(fit: FittedSplit) -> None:
    """One fitted split's model checkpoints (best.pt, epoch_NNN.pt; the resume state stays local),
    history and per-config errors, under the artifact names of its split."""
    checkpoint, history = (CHECKPOINT, HISTORY) if fit.prefix == "test_" else (HELDOUT_CHECKPOINT, HELDOUT_HISTORY)
    for path in model_checkpoints(fit.checkpoint_dir):
        mlflow.log_artifact(str(path), artifact_path=str(Path(checkpoint).parent))
    log_json(fit.history, history)
    log_csv(fit.scores.per_config(), per_config_artifact(fit.prefix))


def per_config_artifact(prefix: str) -> str:
    """The per-config error table of an evaluation set ('test_', 'heldout_config_')."""
    return f"evaluation/per_config_{prefix.rstrip('_')}.csv"


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


@dataclass
class EstimatorEvaluationParams:
    """A latency estimator and the profiling rows it never trained on: scored by evaluate_estimator,
    plotted by visualize_estimator."""

    model: str = f"models:/{MODEL_NAME}@champion"  # a models:/ URI, a train_estimator run id, a runs:/ URI or a checkpoint file
    results_dir: str = DEFAULT_RESULTS_DIR  # a ProfileStore results directory
    dataset_names: str = ""  # comma-separated; empty = every data set in results_dir
    split: str = "recorded"  # recorded: the training run's test samples (+ held-out config); all: every row


@dataclass
class EvaluationTarget:
    """The estimator, the table and the sets it is scored on, all checked before a run opens."""

    table: pd.DataFrame
    resolved: ResolvedEstimator
    sets: dict[str, tuple[LatencyEstimator, pd.DataFrame]]  # evaluation_sets

    def record(self, params: EstimatorEvaluationParams) -> dict[str, Any]:
        """The head of an evaluation's JSON artifact; its "sets" are filled per set."""
        return {"model": params.model, "training_run": self.resolved.run_id, "results_dir": params.results_dir,
                "split": params.split, "sets": {}}


def prepare_evaluation(params: EstimatorEvaluationParams) -> EvaluationTarget:
    """The table, the estimator and its evaluation sets (`split` is checked there): a typo fails
    here, before a run opens, so it leaves nothing behind."""
    table = load_profile_table(params.results_dir, comma_list(params.dataset_names, "dataset_names") or None)
    resolved = resolve_estimator(params.model)
    return EvaluationTarget(table, resolved, evaluation_sets(resolved, table, params.split))
