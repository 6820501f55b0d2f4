"""The budget controller as an MLflow model: its pyfunc, logging and registration, and resolving a reference.

A controller's run artifacts (written by `log_budget_controller`):
  controller/                 the core LearnedController (controller.pt + estimator.pt): `resolve_controller` reads it
  model                       BudgetControllerPyfunc, registered as MODEL_NAME (tag controller_kind)
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Mapping

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from core.control.decision import CONTROLLER_FILE, LearnedController
from tracking.model_refs import VLMReference, served_vlm
from tracking.models import log_pyfunc_model
from tracking.registry import Promotion

MODEL_NAME = "budget-controller"
CONTROLLER_ARTIFACT = "controller"
FEATURES_ARTIFACT = "features"  # known samples' features (parquet): requests by sample_id skip the VLM
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
TRAINERS = ("train_supervised_controller", "train_two_stage_controller", "train_grpo_controller", "train_joint_controller")
# Per-epoch keys -> TensorBoard tags (the seeds' monitoring guide: Train/Loss, Val/Budget_Violation_Rate, ...).
_TB_SIDES = {"train_": "Train", "val_": "Val"}


class ControllerReferenceError(ValueError):
    """A controller reference that leads to no controller (one line naming it)."""


class BudgetControllerPyfunc(mlflow.pyfunc.PythonModel):
    """`models:/budget-controller@champion`: requests and budgets in, knobs out.

    Input columns: `budget_ms` and `question`, and per row either `sample_id` (a sample whose features
    were bundled, or any suite sample "<dataset>:<split>:<index>") or `image` (base64 PNG). Output, one
    row per input row: tier, top_k, num_active_blocks, fits (False: no config's calibrated latency fits
    the budget, the fastest config is returned), T_total_upper_ms.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.controller = LearnedController.load(context.artifacts[CONTROLLER_ARTIFACT])
        self.known = pd.read_parquet(context.artifacts[FEATURES_ARTIFACT]).set_index("sample_id")
        self.vlm_artifacts = dict(context.artifacts)
        self._backend = None

    def _features(self, frame: pd.DataFrame) -> pd.DataFrame:
        from core.control.data import sample_features
        from core.vqa.sample import VQASample
        from core.vqa.suite import sample_from_id
        from tracking.pyfunc_models import decode_image

        ids = frame["sample_id"].astype(str) if "sample_id" in frame else pd.Series([""] * len(frame))
        rows: list[pd.Series | None] = [self.known.loc[s] if s in self.known.index else None for s in ids]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            if self._backend is None:  # loaded on the first request that needs it
                self._backend = served_vlm(self.vlm_artifacts)
            samples = []
            for i in todo:
                image = frame["image"].iloc[i] if "image" in frame else None
                if isinstance(image, str) and image:
                    samples.append(VQASample(f"request:{i}", "request", "vqa", decode_image(image),
                                             str(frame["question"].iloc[i]), (), 16))
                else:
                    samples.append(sample_from_id(ids.iloc[i]))
            computed = sample_features(self._backend, samples)
            for i, (_, row) in zip(todo, computed.iterrows()):
                rows[i] = row
        return pd.DataFrame([r for r in rows]).reset_index(drop=True)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input).reset_index(drop=True)
        features = self._features(frame)
        return self.controller.decide(features, frame["budget_ms"].to_numpy(dtype=float))


def log_budget_controller(controller: LearnedController, features: pd.DataFrame, vlm: VLMReference,
                          registered_model_name: str | None, promotion: Promotion | None = None) -> int | None:
    """Log `controller` as run artifact CONTROLLER_ARTIFACT and as the pyfunc `model` (with the VLM for
    image requests, `VLMReference.served_artifacts`, and `features` of known samples), registering it
    when a name is given; the run and the version are tagged controller_kind."""
    mlflow.set_tag("controller_kind", controller.kind)
    with tempfile.TemporaryDirectory() as tmp:
        directory = controller.save(Path(tmp) / CONTROLLER_ARTIFACT)
        mlflow.log_artifacts(str(directory), CONTROLLER_ARTIFACT)
        known = Path(tmp) / f"{FEATURES_ARTIFACT}.parquet"
        features.assign(sample_id=features["sample_id"].astype(str)).to_parquet(known, index=False)
        vlm_artifacts = vlm.served_artifacts(Path(tmp))
        example = pd.DataFrame({"sample_id": features["sample_id"].astype(str).head(3),
                                "question": features["question"].astype(str).head(3) if "question" in features else "",
                                "image": "", "budget_ms": controller.l_full_ms * 0.8})
        model = BudgetControllerPyfunc()
        model.controller, model.known, model.vlm_artifacts, model._backend = (
            controller, features.assign(sample_id=features["sample_id"].astype(str)).set_index("sample_id"), vlm_artifacts, None)
        version = log_pyfunc_model(
            "model", BudgetControllerPyfunc(),
            {CONTROLLER_ARTIFACT: str(directory), FEATURES_ARTIFACT: str(known), **vlm_artifacts},
            example, model.predict(None, example), registered_model_name=registered_model_name,
            extra_requirements=("transformers", "pillow", "safetensors", "tokenizers", "pyarrow"),
            optional_inputs=("sample_id", "image", "question"), promotion=promotion)
    if version is not None:
        MlflowClient().set_model_version_tag(registered_model_name, str(version), "controller_kind", controller.kind)
    return version


def _download(run_id: str, path: str) -> Path | None:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=tempfile.mkdtemp(prefix="controller-ref-")))
    except (MlflowException, OSError):
        return None


def resolve_controller(ref: str) -> tuple[LearnedController, str | None]:
    """(controller, source run id or None) for a models:/ URI (name/version or name@alias), a trainer's
    run id, a runs:/<id> URI or a directory holding controller.pt."""
    if not ref:
        raise ControllerReferenceError("controller is empty: pass a models:/ URI, a trainer run id or a directory")
    if Path(ref).is_dir():
        return LearnedController.load(ref), None
    client = MlflowClient()
    if ref.startswith("models:/"):
        name_version = ref[len("models:/"):].strip("/")
        try:
            if "@" in name_version:
                version = client.get_model_version_by_alias(*name_version.split("@", 1))
            else:
                version = client.get_model_version(*name_version.rsplit("/", 1))
        except (MlflowException, TypeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ControllerReferenceError(f"controller={ref!r} cannot be resolved in {mlflow.get_tracking_uri()}: {first}") from None
        run_id = version.run_id
    else:
        run_id = ref[len("runs:/"):].split("/", 1)[0] if ref.startswith("runs:/") else ref
        if not RUN_ID.match(run_id or ""):
            raise ControllerReferenceError(f"controller={ref!r} is neither a directory, a run id, a runs:/ URI nor a models:/ URI")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ControllerReferenceError(f"controller={ref!r}: run {run_id} does not exist in {mlflow.get_tracking_uri()}") from None
    if run.data.tags.get("entry_point") not in TRAINERS:
        raise ControllerReferenceError(f"controller={ref!r}: run {run_id} is a "
                                       f"{run.data.tags.get('entry_point') or 'untagged'} run, not a controller trainer")
    directory = _download(run_id, CONTROLLER_ARTIFACT)
    if directory is None or not (directory / CONTROLLER_FILE).is_file():
        raise ControllerReferenceError(f"controller={ref!r}: run {run_id} has no {CONTROLLER_ARTIFACT}/ artifact (did it finish?)")
    return LearnedController.load(directory), run_id


def tensorboard_tag(key: str) -> str | None:
    """A per-epoch key as its TensorBoard tag: train_budget_violation_rate -> Train/Budget_Violation_Rate."""
    for prefix, side in _TB_SIDES.items():
        if key.startswith(prefix):
            return f"{side}/" + "_".join(word.capitalize() for word in key[len(prefix):].split("_"))
    return None


class TensorBoardWriter:
    """Per-epoch records as TensorBoard scalars under `log_dir` (torch.utils.tensorboard's writer)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, epoch: int, record: Mapping[str, float]) -> None:
        for key, value in record.items():
            if (tag := tensorboard_tag(key)) is not None:
                self.writer.add_scalar(tag, float(value), epoch)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
