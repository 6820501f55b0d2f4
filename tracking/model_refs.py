"""Resolve the references entry points take: a base-VLM model (registry URI or directory) and a
block-importance order (an `importance` run id or a JSON file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from core.knobs import drop_order_from_importance

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
BASE_VLM_ARTIFACT = "base_vlm"  # name of the checkpoint directory inside the pyfunc model


class ModelReferenceError(ValueError):
    """A model or run reference that cannot be resolved."""


def resolve_base_model_dir(ref: str) -> Path:
    """A checkpoint directory for `ref`: a directory as is, or a `models:/name@alias` (or runs:/) URI
    whose pyfunc model is downloaded."""
    path = Path(ref)
    if path.is_dir():
        return path
    if not ref.startswith(("models:/", "runs:/")):
        raise ModelReferenceError(f"base_model={ref!r} is neither a checkpoint directory nor a models:/ or runs:/ URI")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    except MlflowException as exc:
        raise ModelReferenceError(f"base_model={ref!r} cannot be resolved: {str(exc).splitlines()[0]}") from None
    checkpoint = local / "artifacts" / BASE_VLM_ARTIFACT
    if not checkpoint.is_dir():
        raise ModelReferenceError(f"base_model={ref!r} holds no {BASE_VLM_ARTIFACT} checkpoint artifact")
    return checkpoint


def resolve_drop_order(ref: str, num_blocks: int) -> list[int] | None:
    """The measured drop order from an `importance` run id or a JSON file; None for ''.

    The JSON is either {"drop_order": [...]} or {block_index: score} (higher = more important).
    """
    if not ref:
        return None
    if RUN_ID.match(ref):
        try:
            ref = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path="importance/drop_order.json")
        except MlflowException as exc:
            raise ModelReferenceError(f"importance run {ref} has no importance/drop_order.json ({str(exc).splitlines()[0]})") from None
    path = Path(ref)
    if not path.is_file():
        raise ModelReferenceError(f"importance={ref!r} is neither an importance run id nor a JSON file")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "drop_order" in data:
            order = [int(b) for b in data["drop_order"]]
        elif isinstance(data, dict):
            order = drop_order_from_importance({int(k): float(v) for k, v in data.items()}, num_blocks)
        else:
            raise ValueError("a JSON list or value")
    except (ValueError, TypeError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ModelReferenceError(f"importance file {path}: expected JSON {{'drop_order': [...]}} or {{block: score}} "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    if sorted(order) != list(range(1, num_blocks - 1)):
        raise ModelReferenceError(f"{path}: drop_order {order} is not a permutation of the middle blocks 1..{num_blocks - 2}")
    return order
