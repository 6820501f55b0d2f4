"""Core models wrapped as MLflow pyfunc models (loading and calling only; the science is in core/)."""

from __future__ import annotations

import mlflow
import pandas as pd


class ForecasterPyfunc(mlflow.pyfunc.PythonModel):
    """`models:/workload-predictor@champion`: history dataframe in, next `horizon` minutes out.

    Input: at least `seq_len` rows with columns requests, input_tokens, output_tokens (per minute,
    oldest first). Output: `horizon` rows with `step` (1..horizon) and the three channels.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from core.forecast_training import Forecaster

        self.forecaster = Forecaster.load(context.artifacts["forecaster"])

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        forecast = self.forecaster.forecast(pd.DataFrame(model_input))
        return forecast.rename_axis("step").reset_index()
