"""Core models wrapped as MLflow pyfunc models (loading and calling only; the science is in core/)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from core.knobs import KNOBS
from core.timing import STAGE_COLUMNS
from tracking.model_refs import BASE_VLM_ARTIFACT
from tracking.models import log_pyfunc_model


class ForecasterPyfunc(mlflow.pyfunc.PythonModel):
    """`models:/workload-predictor@champion`: history dataframe in, next `horizon` minutes out.

    Input: at least the model's context rows with columns requests, input_tokens, output_tokens (per
    minute, oldest first) and, for the calendar MLP, `minute` (minutes since the trace start). Output:
    `horizon` rows with `step` (1..horizon), the three channels (P50, >= 0) and, for the calendar MLP,
    `<channel>_p90`. Torch runs on the training's `num_threads` (set at load time).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import torch

        from core.forecasting.training import Forecaster

        self.forecaster = Forecaster.load(context.artifacts["forecaster"])
        if self.forecaster.config.num_threads is not None:
            torch.set_num_threads(self.forecaster.config.num_threads)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        forecast = self.forecaster.forecast(pd.DataFrame(model_input))
        return forecast.rename_axis("step").reset_index()


def log_forecaster(forecaster, history: pd.DataFrame, registered_model_name: str | None, promotion=None) -> int | None:
    """Log a core Forecaster as `model` (input example: `history`), registering it when a name is given;
    the run and the registered version are tagged with its `model_kind`."""
    kind = forecaster.config.model_kind
    mlflow.set_tag("model_kind", kind)
    with tempfile.TemporaryDirectory() as tmp:
        forecaster.save(Path(tmp) / "forecaster")
        output = forecaster.forecast(history).rename_axis("step").reset_index()
        version = log_pyfunc_model("model", ForecasterPyfunc(), {"forecaster": str(Path(tmp) / "forecaster")}, history,
                                   output, registered_model_name=registered_model_name, promotion=promotion)
    if version is not None:
        mlflow.MlflowClient().set_model_version_tag(registered_model_name, str(version), "model_kind", kind)
    return version


def encode_image(image) -> str:
    """PIL image -> base64 PNG string (the `image` column of the base-VLM pyfunc)."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


class BaseVLMPyfunc(mlflow.pyfunc.PythonModel):
    """`models:/base-vlm@champion`: answer questions about images under per-request knobs.

    Input columns: `image` (base64 PNG), `question`; optional `tier`, `top_k`, `num_active_blocks`
    (the full config where absent) and `max_new_tokens`. Output: `answer`, the knobs used, the
    active blocks, `output_tokens` and the latency components in ms.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from core.vlm.base_vlm import BaseVLMBackend

        # The checkpoint's drop_order.json, if any, is applied by from_pretrained.
        self.backend = BaseVLMBackend.from_pretrained(context.artifacts[BASE_VLM_ARTIFACT])

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from core.vqa.sample import VQASample

        space, full = self.backend.space, self.backend.space.full()
        rows = []
        for i, row in pd.DataFrame(model_input).reset_index(drop=True).iterrows():
            def knob(name: str, default):
                value = row.get(name)
                return default if value is None or (isinstance(value, float) and pd.isna(value)) or value == "" else value

            config = space.make(*(knob(name, getattr(full, name)) for name in KNOBS))
            max_new = int(knob("max_new_tokens", 16))
            sample = VQASample(f"request:{i}", "request", "vqa", decode_image(row["image"]), str(row["question"]), (), max_new)
            result = self.backend.answer(sample, config)
            rows.append({
                "answer": result.text, **config.as_dict(), "active_blocks": ",".join(map(str, result.active_blocks)),
                "output_tokens": result.output_tokens, **{column: getattr(result, column) for column in STAGE_COLUMNS},
            })
        return pd.DataFrame(rows)


def log_base_vlm(model, sample, registered_model_name: str | None, promotion=None, source_dir: str = "") -> int | None:
    """Log a core BaseVLM as `model` (its checkpoint directory, with the measured drop order of checkpoint
    directory `source_dir` when it has one), `sample` asked at the full config as the input example;
    registers it when a name is given."""
    import shutil

    from core.vlm.base_vlm import DROP_ORDER_FILE, BaseVLMBackend

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = model.save_pretrained(Path(tmp) / BASE_VLM_ARTIFACT)  # pyfunc artifacts keep the directory name
        if source_dir and (Path(source_dir) / DROP_ORDER_FILE).is_file():
            shutil.copy(Path(source_dir) / DROP_ORDER_FILE, checkpoint / DROP_ORDER_FILE)
        answering = BaseVLMPyfunc()
        answering.backend = BaseVLMBackend.from_pretrained(checkpoint, model.device)
        model_input = pd.DataFrame([{"image": encode_image(sample.image), "question": sample.question,
                                     **answering.backend.space.full().as_dict(), "max_new_tokens": sample.max_new_tokens}])
        return log_pyfunc_model("model", BaseVLMPyfunc(), {BASE_VLM_ARTIFACT: str(checkpoint)}, model_input,
                                answering.predict(None, model_input), registered_model_name=registered_model_name,
                                extra_requirements=("transformers", "pillow", "safetensors", "tokenizers"),
                                optional_inputs=(*KNOBS, "max_new_tokens"), promotion=promotion)


class LatencyEstimatorPyfunc(mlflow.pyfunc.PythonModel):
    """`models:/latency-estimator@champion`: a dataframe of requests x configs in, latency in ms out.

    Input columns: `tier` (low/medium/high), `top_k`, `num_active_blocks`, `vision_tokens`,
    `text_tokens`, `crops`; optional `output_tokens` (answer length). Param `output_tokens` is the
    answer length for rows without one. Output, one row per input row: `T_vision_ms`,
    `T_prefill_ms`, `T_decode_per_token_ms`, their P90 bounds (`*_p90`) and `T_total_ms` /
    `T_total_ms_p90` = vision + prefill + (output_tokens - 1) x decode per token.
    """

    CHECKPOINT_ARTIFACT = "latency_estimator"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from core.latency.estimator import LatencyEstimator

        self.estimator = LatencyEstimator.load(context.artifacts[self.CHECKPOINT_ARTIFACT])

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input).reset_index(drop=True)
        default_tokens = (params or {}).get("output_tokens")
        if default_tokens is not None:
            given = frame["output_tokens"] if "output_tokens" in frame else pd.Series(float("nan"), index=frame.index)
            frame["output_tokens"] = given.fillna(int(default_tokens)).astype("int64")
        return self.estimator.predict_frame(frame).reset_index(drop=True)


def log_latency_estimator(model, rows: pd.DataFrame, output_tokens: int, registered_model_name: str | None,
                          promotion=None) -> int | None:
    """Log a core LatencyEstimator as `model` (input example: five distinct configs of profiling `rows`;
    param `output_tokens`: the answer length for rows without one); registers it when a name is given."""
    from core.latency.features import RAW_COLUMNS

    example = rows[[*RAW_COLUMNS, "output_tokens"]].drop_duplicates().head(5).reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(Path(tmp) / f"{LatencyEstimatorPyfunc.CHECKPOINT_ARTIFACT}.pt")
        return log_pyfunc_model("model", LatencyEstimatorPyfunc(), {LatencyEstimatorPyfunc.CHECKPOINT_ARTIFACT: str(path)},
                                example, model.predict_frame(example).reset_index(drop=True),
                                registered_model_name=registered_model_name, params={"output_tokens": output_tokens},
                                optional_inputs=("output_tokens",), promotion=promotion)
