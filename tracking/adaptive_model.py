"""The served adaptive VLM: `models:/adaptive-vlm@champion`, the three champions behind one endpoint.

`log_adaptive_vlm` bundles the base VLM checkpoint (or, for a MolmoE-1B release, a reference to its
directory: `tracking.model_refs.VLMReference.served_artifacts`), the budget controller and the latency
estimator an `adaptive_inference` run resolved (the champions, when it ran on the registry's aliases)
and records their versions as tags of the run and of the registered version, so `mlflow models serve -m
models:/adaptive-vlm@champion --env-manager local` needs no tracking store. Each server process keeps
its own online calibration across requests.

Request (one row per request): `image` (base64 PNG), `question`, `budget_ms` (> 0). Response: `answer`,
the knobs used, the controller's first choice, `guardrail_intervened`, `fits`, and the measured stage
latencies `T_vision_ms`, `T_prefill_ms`, `T_decode_ms`, `T_total_ms` (arrival to answer) and
`overhead_ms`. Bad input is refused in one line naming the row and field (HTTP 400).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from tracking.models import log_pyfunc_model
from tracking.model_refs import VLMReference

MODEL_NAME = "adaptive-vlm"
CONTROLLER_ARTIFACT, ESTIMATOR_ARTIFACT = "controller", "estimator.pt"
RESPONSE_COLUMNS: tuple[str, ...] = (
    "answer", "tier", "top_k", "num_active_blocks", "controller_top_k", "controller_num_active_blocks",
    "guardrail_intervened", "fits", "T_vision_ms", "T_prefill_ms", "T_decode_ms", "T_total_ms", "overhead_ms")


def _refuse(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class AdaptiveVLMPyfunc(mlflow.pyfunc.PythonModel):
    """Adaptive inference behind a pyfunc (module doc)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self._build(dict(context.artifacts), context.artifacts[CONTROLLER_ARTIFACT], context.artifacts[ESTIMATOR_ARTIFACT])

    def _build(self, vlm_artifacts: dict[str, str], controller_dir: str, estimator_file: str) -> None:
        from core.adaptive.calibration import OnlineCalibration
        from core.adaptive.guardrail import Guardrail
        from core.adaptive.inference import AdaptiveInference, freeze_heap
        from core.control.decision import LearnedController
        from core.latency.estimator import LatencyEstimator
        from tracking.model_refs import served_vlm

        backend = served_vlm(vlm_artifacts)
        controller = LearnedController.load(controller_dir)
        guardrail = Guardrail(LatencyEstimator.load(estimator_file), controller.options, controller.prior_accuracy)
        self.session = AdaptiveInference(backend, controller, guardrail, OnlineCalibration(controller.latency_factor))
        freeze_heap()  # the loaded models stay out of every garbage collection a request meets

    def _sample(self, i: int, row: pd.Series):
        from core.vqa.sample import VQASample
        from tracking.pyfunc_models import decode_image

        image, question, budget = row.get("image"), row.get("question"), row.get("budget_ms")
        if not isinstance(image, str) or not image:
            raise _refuse(f"request row {i}: field image missing (a base64 PNG)")
        if not isinstance(question, str) or not question.strip():
            raise _refuse(f"request row {i}: field question missing")
        try:
            budget = float(budget)
        except (TypeError, ValueError):
            raise _refuse(f"request row {i}: field budget_ms must be a number > 0, got {budget!r}") from None
        if not math.isfinite(budget) or budget <= 0:
            raise _refuse(f"request row {i}: field budget_ms must be a number > 0, got {budget!r}")
        try:
            decoded = decode_image(image)
        except Exception as exc:  # binascii.Error, PIL.UnidentifiedImageError, ...
            raise _refuse(f"request row {i}: field image is not a base64 PNG ({type(exc).__name__})") from None
        return VQASample(f"request:{i}", "request", "vqa", decoded, question, (), 16), budget

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input).reset_index(drop=True)
        requests = [self._sample(i, row) for i, row in frame.iterrows()]  # every row is checked before any is answered
        rows = []
        for sample, budget in requests:
            a = self.session.answer(sample, budget)
            rows.append({"answer": a.text, "tier": a.tier, "top_k": a.top_k, "num_active_blocks": a.num_active_blocks,
                         "controller_top_k": a.controller_top_k, "controller_num_active_blocks": a.controller_num_active_blocks,
                         "guardrail_intervened": a.intervened, "fits": a.fits, "T_vision_ms": a.T_vision_ms,
                         "T_prefill_ms": a.T_prefill_ms, "T_decode_ms": a.T_decode_ms, "T_total_ms": a.T_total_ms,
                         "overhead_ms": a.overhead_ms})
        return pd.DataFrame(rows, columns=list(RESPONSE_COLUMNS))


def log_adaptive_vlm(vlm: VLMReference, controller_dir: str, estimator_file: str, versions: dict[str, str],
                     example: pd.DataFrame, register: bool) -> int | None:
    """Log the pyfunc `adaptive_model` of this run (and register it as MODEL_NAME, alias champion, when
    `register`); `versions` ({"base_model": "base-vlm/1", ...}, '' for a path) become tags."""
    tags = {f"{key}_version": value or "path" for key, value in versions.items()}
    mlflow.set_tags({f"adaptive_vlm_{k}": v for k, v in tags.items()})
    with tempfile.TemporaryDirectory() as tmp:
        vlm_artifacts = vlm.served_artifacts(Path(tmp))
        model = AdaptiveVLMPyfunc()
        model._build(vlm_artifacts, controller_dir, estimator_file)
        version = log_pyfunc_model(
            "adaptive_model", AdaptiveVLMPyfunc(),
            {**vlm_artifacts, CONTROLLER_ARTIFACT: controller_dir, ESTIMATOR_ARTIFACT: estimator_file},
            example, model.predict(None, example), registered_model_name=MODEL_NAME if register else None,
            extra_requirements=("transformers", "pillow", "safetensors", "tokenizers"))
    if version is not None:
        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(MODEL_NAME, str(version), key, value)
        client.set_registered_model_alias(MODEL_NAME, "champion", str(version))
    return version


@dataclass
class ResolvedModels:
    """The three models an adaptive run uses, and the registry versions they came from ('' for a path)."""

    backend: Any  # core.vlm.backend.StagedVLM
    vlm: VLMReference
    controller: Any  # core.control.decision.LearnedController
    estimator: Any  # core.latency.estimator.LatencyEstimator
    versions: dict[str, str]


def resolve_models(vlm: VLMReference, controller_path: str, estimator_ref: str, importance: str = "") -> ResolvedModels:
    """Load the VLM, controller and estimator references (models:/ URIs, run ids or paths; an empty
    `estimator_ref` = the controller's own); ValueError in one line for a missing alias or version, or
    a controller trained on another knob space than the VLM's. A MolmoE-1B release's version is
    "release:<directory>": the user's own files, never in the registry."""
    from core.control.decision import ControllerError
    from core.control.policies import knob_options
    from tracking.controller_models import resolve_controller
    from tracking.estimator_refs import resolve_estimator
    from tracking.model_refs import resolve_drop_order
    from tracking.registry import resolved_version

    versions = {key: resolved_version(ref) for key, ref in (("controller", controller_path), ("estimator", estimator_ref))}
    versions["base_model"] = (resolved_version(vlm.model_path) if vlm.backend == "base_vlm"
                              else f"release:{Path(vlm.model_path).resolve()}")
    backend = vlm.load()
    if (order := resolve_drop_order(importance, backend.space.num_blocks)) is not None:
        backend.set_drop_order(order)
    controller, _ = resolve_controller(controller_path)
    if controller.options != knob_options(backend.space):
        raise ControllerError(f"controller_path={controller_path!r}: its knob space {controller.options} is not "
                              f"the base VLM's {knob_options(backend.space)}")
    estimator = resolve_estimator(estimator_ref).estimator if estimator_ref else controller.estimator
    return ResolvedModels(backend, vlm, controller, estimator, versions)


def log_served_model(models: ResolvedModels, sample, l_full_ms: float) -> int | None:
    """The three models of an adaptive_inference run behind one pyfunc; registered (and made champion)
    only when each came from the registry (the VLM: or is a MolmoE-1B release), so a run on explicit
    checkpoint paths never moves adaptive-vlm@champion."""
    from tracking.pyfunc_models import encode_image

    example = pd.DataFrame({"image": [encode_image(sample.image)], "question": [sample.question],
                            "budget_ms": [0.8 * l_full_ms]})
    with tempfile.TemporaryDirectory() as tmp:
        controller_dir = str(models.controller.save(Path(tmp) / CONTROLLER_ARTIFACT))
        estimator_file = str(models.estimator.save(Path(tmp) / ESTIMATOR_ARTIFACT))
        version = log_adaptive_vlm(models.vlm, controller_dir, estimator_file, models.versions, example,
                                   register=all(models.versions.values()))
    if version is not None:
        mlflow.set_tag("adaptive_vlm_version", str(version))
    return version


def log_request_plan(plan, split: str, data_root: str, tags: dict[str, str]) -> None:
    """The requests of an adaptive run (core.adaptive.experiment.RequestPlan) as its dataset input, and
    the held-out split they came from as params."""
    from core.vqa.sample import samples_frame
    from tracking.artifacts import log_dataset_input

    name = "measured-table-heldout" if plan.heldout else f"{'real' if data_root else 'synthetic'}-vqa-{split}"
    log_dataset_input(samples_frame(plan.requests), name, split, tags)
    if plan.heldout is not None:
        mlflow.log_params({**plan.heldout.setup.split.as_params(), "requests_per_run": len(plan.requests)})


def log_run_results(rows: pd.DataFrame, metrics: dict[str, float], lookup: pd.DataFrame | None,
                    replay_decisions: pd.DataFrame | None) -> None:
    """An adaptive-inference run's metrics, per-request rows, knob distribution, yardstick tables and plots."""
    from core.adaptive import plots, report
    from tracking.artifacts import log_csv, log_figure, log_json

    mlflow.log_metrics(metrics)
    log_csv(rows, "adaptive/requests.csv")
    log_csv(report.knob_distribution(rows), "adaptive/knob_distribution.csv")
    for frame, name in ((lookup, "lookup_table"), (replay_decisions, "replay_decisions")):
        if frame is not None:
            log_csv(frame, f"adaptive/{name}.csv")
    log_json(metrics, "adaptive/metrics.json")
    log_figure(plots.plot_latency_over_time(rows), "plots/latency_vs_budget_over_time.png")
    log_figure(plots.plot_calibration_over_time(rows), "plots/calibration_factor_over_time.png")
