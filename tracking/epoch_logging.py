"""Per-epoch metrics: batched to MLflow with step=epoch, and kept as CSV history artifacts."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tracking.artifacts import log_csv


@dataclass
class EpochLogger:
    """Buffers epoch metrics and sends them with one `log_batch` call every `flush_every` epochs.

    `training_columns` / `validation_columns` choose which keys go to `training_history.csv` and
    `validation_history.csv` (the epoch column comes first in both).
    """

    training_columns: Sequence[str]
    validation_columns: Sequence[str]
    flush_every: int = 10
    prefix: str = ""
    _buffer: list[Metric] = field(default_factory=list)
    _rows: list[dict[str, float]] = field(default_factory=list)

    def log(self, epoch: int, metrics: Mapping[str, float]) -> None:
        timestamp_ms = int(time.time() * 1000)
        row = {"epoch": epoch}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value
            if math.isfinite(value):
                self._buffer.append(Metric(self.prefix + key, value, timestamp_ms, epoch))
        self._rows.append(row)
        if len(self._rows) % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("EpochLogger.flush needs an active MLflow run")
        client = MlflowClient()
        for start in range(0, len(self._buffer), 1000):  # log_batch takes at most 1000 metrics
            client.log_batch(run.info.run_id, metrics=self._buffer[start : start + 1000])
        self._buffer.clear()

    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows)

    def close(self) -> None:
        """Flush and write the history CSVs as artifacts."""
        self.flush()
        frame = self.history()
        if frame.empty:
            return
        for name, columns in (
            ("training_history.csv", self.training_columns),
            ("validation_history.csv", self.validation_columns),
        ):
            present = ["epoch"] + [c for c in columns if c in frame.columns]
            log_csv(frame[present], name)


def epoch_callback(
    logger: EpochLogger, epoch_hook: Callable[[int, Mapping[str, float]], None] | None = None
) -> Callable[[int, Mapping[str, float]], None]:
    """on_epoch(epoch, metrics) for a core trainer: log the epoch's metrics, then call `epoch_hook`
    (tune's pruning hook) after a flush, so a pruned trial keeps the epochs it ran."""

    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items() if k != "epoch"}
        logger.log(epoch, values)
        if epoch_hook is not None:
            logger.flush()
            epoch_hook(epoch, values)

    return on_epoch
