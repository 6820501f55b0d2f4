"""Model logging with an explicit signature and explicit pip requirements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.types.schema import ColSpec, Schema

from tracking.registry import Promotion, record_promotion
from tracking.run_context import REPO_ROOT

BASE_REQUIREMENTS = ("mlflow", "torch", "pandas", "numpy")


def pip_requirements(*extra_packages: str) -> list[str]:
    """Explicit pins of the installed versions (inferring requirements costs seconds per call)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in (*BASE_REQUIREMENTS, *extra_packages)]


def log_pyfunc_model(
    name: str,
    python_model: mlflow.pyfunc.PythonModel,
    artifacts: dict[str, str],
    input_example: pd.DataFrame,
    output_example: pd.DataFrame,
    registered_model_name: str | None = None,
    extra_requirements: tuple[str, ...] = (),  # package names; pinned to the installed versions
    params: dict[str, Any] | None = None,
    optional_inputs: tuple[str, ...] = (),
    promotion: Promotion | None = None,
) -> int | None:
    """Log a pyfunc model with `core/` and `tracking/` shipped as code, so it loads in a fresh process
    anywhere; register it under `registered_model_name` when given (storing `promotion` on the
    registered model). Returns the registered version, or None when not registered."""
    signature = infer_signature(input_example, output_example, params=params)
    if optional_inputs:  # columns a caller may leave out (the model fills a default)
        signature.inputs = Schema([
            ColSpec(c.type, c.name, required=c.name not in optional_inputs) for c in signature.inputs.inputs
        ])
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=python_model,
        artifacts=artifacts,
        code_paths=[str(REPO_ROOT / "core"), str(REPO_ROOT / "tracking")],
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements(*extra_requirements),
        registered_model_name=registered_model_name,
    )
    if not registered_model_name:
        return None
    if promotion is not None:
        record_promotion(promotion, registered_model_name)
    return int(info.registered_model_version)
