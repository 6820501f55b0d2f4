"""Resolve the references entry points take: a base-VLM model (registry URI or directory), the VLM a
controller or adaptive run answers with (`VLMReference`: the base VLM or a local MolmoE-1B release) and a
block-importance order (an `importance` run id or a JSON file)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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


VLM_REFERENCE_ARTIFACT = "vlm_reference.json"  # a served model's VLM when it is a local release (not bundled)
VLM_BACKENDS: tuple[str, ...] = ("base_vlm", "molmoe_arch")


@dataclass(frozen=True)
class VLMReference:
    """Which VLM a controller or adaptive entry point answers with: the embedded base VLM (`model_path` a
    checkpoint directory or a models:/ URI) or MolmoE-1B loaded from a local release directory
    (`backend=molmoe_arch`, `model_path` that directory; `engine` eager | graph | fused)."""

    backend: str = "base_vlm"
    model_path: str = "data/base_vlm"
    engine: str = "eager"
    device: str = "cpu"

    def check(self) -> None:
        """ModelReferenceError naming the parameter for a backend without real weights or a bad engine/device."""
        from core.profiling.planning import check_engine_and_device

        if self.backend not in VLM_BACKENDS:
            raise ModelReferenceError(f"parameter backend={self.backend!r} is not one of {list(VLM_BACKENDS)}")
        if not self.model_path:
            raise ModelReferenceError(f"parameter model_path is empty: backend={self.backend} needs "
                                      + ("a checkpoint directory or models:/ URI" if self.backend == "base_vlm"
                                         else "a MolmoE-1B release directory (random weights answer nothing)"))
        if self.backend == "molmoe_arch" and not Path(self.model_path).is_dir():
            raise ModelReferenceError(f"parameter model_path={self.model_path!r} is not a directory "
                                      "(backend=molmoe_arch reads a local MolmoE-1B release)")
        try:
            check_engine_and_device(self.backend, self.engine, self.device)
        except ValueError as exc:
            raise ModelReferenceError(f"parameter {exc}") from None

    def base_model_dir(self) -> Path | None:
        """The base VLM's checkpoint directory (downloaded for a models:/ URI); None for a release."""
        return resolve_base_model_dir(self.model_path) if self.backend == "base_vlm" else None

    def load(self):
        """The backend (core.vlm.backend.VLMBackend), after `check`."""
        from core.vlm.registry import load_backend

        self.check()
        checkpoint = self.base_model_dir()
        return load_backend(self.backend, self.device, checkpoint_dir=str(checkpoint) if checkpoint else None,
                            engine=self.engine, model_path=self.model_path if self.backend == "molmoe_arch" else "")

    def served_artifacts(self, directory: Path) -> dict[str, str]:
        """The pyfunc artifacts that rebuild this VLM where the model is served: the base VLM's checkpoint
        (copied, small) or a reference to the release directory by absolute path (a MolmoE-1B release is
        ~7 GB and the user's own copy: it is read from there, not copied into every logged model)."""
        checkpoint = self.base_model_dir()
        if checkpoint is not None:
            return {BASE_VLM_ARTIFACT: str(checkpoint)}
        reference = Path(directory) / VLM_REFERENCE_ARTIFACT
        reference.write_text(json.dumps({"backend": self.backend, "model_path": str(Path(self.model_path).resolve()),
                                         "engine": self.engine, "device": self.device}))
        return {VLM_REFERENCE_ARTIFACT: str(reference)}


def served_vlm(artifacts: dict[str, str]):
    """The backend a served pyfunc was logged with (`VLMReference.served_artifacts`): the bundled base VLM
    on the CPU, or the referenced release on the engine and device the run used."""
    if VLM_REFERENCE_ARTIFACT in artifacts:
        record = json.loads(Path(artifacts[VLM_REFERENCE_ARTIFACT]).read_text())
        return VLMReference(record["backend"], record["model_path"], record.get("engine", "eager"),
                            record.get("device", "cpu")).load()
    return VLMReference("base_vlm", artifacts[BASE_VLM_ARTIFACT]).load()
