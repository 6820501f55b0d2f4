"""Model logging with an explicit signature and explicit pip requirements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature

from tracking.run_context import REPO_ROOT

# Pinned like pyproject.toml; explicit, because inferring them costs seconds per call.
def pip_requirements(*extra: str) -> list[str]:
    import numpy
    import torch

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"pandas=={pd.__version__}",
        f"numpy=={numpy.__version__}",
        *extra,
    ]


def log_pyfunc_model(
    name: str,
    python_model: mlflow.pyfunc.PythonModel,
    artifacts: dict[str, str],
    input_example: pd.DataFrame,
    output_example: pd.DataFrame,
    registered_model_name: str | None = None,
    extra_requirements: tuple[str, ...] = (),
    params: dict[str, Any] | None = None,
) -> Any:
    """Log a pyfunc model with `core/` and `tracking/` shipped as code, so it loads in a fresh process anywhere."""
    signature = infer_signature(input_example, output_example, params=params)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=python_model,
        artifacts=artifacts,
        code_paths=[str(REPO_ROOT / "core"), str(REPO_ROOT / "tracking")],
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements(*extra_requirements),
        registered_model_name=registered_model_name,
    )
