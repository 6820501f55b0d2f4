"""Training DLinear on per-minute load windows, and the saved forecaster a service calls.

Straight line: seed -> model/optimiser -> (resume from checkpoint) -> epochs of shuffled
mini-batch MSE on scaled data -> validation -> early stopping on val loss -> best weights restored.
The best state is a deep copy (the original study kept a live reference to the state dict, so its
"restore" restored nothing).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from core.forecasting.dlinear import DLinear
from core.forecasting.windows import ForecastDataError, ForecastDatasets, StandardScaler


@dataclass
class ForecastTrainConfig:
    """All training knobs with their defaults in one place (minutes for window sizes)."""

    seq_len: int = 120
    horizon: int = 3
    stride: int = 1
    kernel_size: int = 25
    individual: bool = True
    decomposition: bool = True
    batch_size: int = 256
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0
    num_epochs: int = 150
    patience: int = 10  # epochs without a val-loss improvement before stopping
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's setting

    def validate(self) -> None:
        for name in ("seq_len", "horizon", "stride", "kernel_size", "batch_size", "num_epochs", "patience"):
            if getattr(self, name) <= 0:
                raise ForecastDataError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ForecastDataError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ForecastDataError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class EpochRecord:
    """One epoch's figures; losses are MSE on standardised data, val_mae likewise."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_mae: float
    lr: float
    epoch_time_s: float
    is_best: bool


@dataclass
class TrainResult:
    model: DLinear  # best weights loaded
    best_epoch: int
    best_val_loss: float
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int = 0  # 0 = fresh start


def build_model(config: ForecastTrainConfig, num_channels: int) -> DLinear:
    return DLinear(config.seq_len, config.horizon, num_channels, individual=config.individual,
                   kernel_size=config.kernel_size, decomposition=config.decomposition)


@torch.no_grad()
def _evaluate(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 8192) -> tuple[float, float]:
    """(MSE, MAE) over all windows, batched to bound memory."""
    model.eval()
    sq_sum, abs_sum = 0.0, 0.0
    for start in range(0, len(X), batch_size):
        error = model(X[start:start + batch_size]) - Y[start:start + batch_size]
        sq_sum += float((error**2).sum())
        abs_sum += float(error.abs().sum())
    count = Y.numel()
    return sq_sum / count, abs_sum / count


def _save_checkpoint(path: Path, state: dict) -> None:
    # Write then rename, so a run killed mid-save leaves the previous checkpoint intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_dlinear(
    data: ForecastDatasets,
    config: ForecastTrainConfig,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_path: Path | None = None,
) -> TrainResult:
    """Train DLinear with early stopping on val loss.

    In: scaled windows (config.seq_len / horizon must match data's), the config, an optional
    callback called with every new EpochRecord (exceptions it raises propagate, e.g. an Optuna
    prune), an optional checkpoint file written after every epoch and resumed from when it exists.
    Out: TrainResult with the best-val-loss weights loaded into `model`.
    """
    config.validate()
    if (config.seq_len, config.horizon) != (data.seq_len, data.horizon):
        raise ForecastDataError(
            f"config seq_len/horizon = {config.seq_len}/{config.horizon} do not match the data's "
            f"windows {data.seq_len}/{data.horizon}"
        )
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    shuffle_rng = torch.Generator().manual_seed(config.seed)

    X_train, Y_train = torch.from_numpy(data.X_train).float(), torch.from_numpy(data.Y_train).float()
    X_val, Y_val = torch.from_numpy(data.X_val).float(), torch.from_numpy(data.Y_val).float()
    model = build_model(config, X_train.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.MSELoss()

    history: list[EpochRecord] = []
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, best_val_loss, bad_epochs, stopped_early, start_epoch = 0, float("inf"), 0, False, 0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint_path is not None and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=True)
        shape_keys = ("seq_len", "horizon", "kernel_size", "individual", "decomposition")
        saved_model = {k: saved["config"][k] for k in shape_keys}
        wanted_model = {k: getattr(config, k) for k in saved_model}
        if saved_model != wanted_model:
            raise ForecastDataError(
                f"checkpoint {checkpoint_path} was written for model {saved_model}, not {wanted_model}"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle_rng.set_state(saved["shuffle_rng"])
        history = [EpochRecord(**record) for record in saved["history"]]
        best_state, best_epoch, best_val_loss = saved["best_state"], saved["best_epoch"], saved["best_val_loss"]
        bad_epochs, stopped_early, start_epoch = saved["bad_epochs"], saved["stopped_early"], saved["epoch"]

    # A checkpoint of a run that already stopped early has nothing left to train.
    last_epoch = start_epoch if stopped_early else config.num_epochs
    epochs = tqdm(range(start_epoch + 1, last_epoch + 1), desc="DLinear epochs",
                  initial=start_epoch, total=last_epoch)
    for epoch in epochs:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(X_train), generator=shuffle_rng)
        loss_sum = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = loss_fn(model(X_train[batch]), Y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
        val_loss, val_mae = _evaluate(model, X_val, Y_val)

        is_best = val_loss < best_val_loss
        if is_best:
            best_state = copy.deepcopy(model.state_dict())  # a copy, not a live view
            best_epoch, best_val_loss, bad_epochs = epoch, val_loss, 0
        else:
            bad_epochs += 1
        stopped_early = bad_epochs >= config.patience
        record = EpochRecord(epoch, loss_sum / len(order), val_loss, val_mae,
                             optimizer.param_groups[0]["lr"], time.perf_counter() - started, is_best)
        history.append(record)
        epochs.set_postfix(train=f"{record.train_loss:.4f}", val=f"{val_loss:.4f}", best=best_epoch)
        if checkpoint_path is not None:
            _save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "shuffle_rng": shuffle_rng.get_state(), "history": [asdict(r) for r in history],
                "best_state": best_state, "best_epoch": best_epoch, "best_val_loss": best_val_loss,
                "bad_epochs": bad_epochs, "stopped_early": stopped_early, "config": asdict(config),
            })
        if on_epoch is not None:
            on_epoch(record)
        if stopped_early:
            break
    epochs.close()

    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, best_epoch=best_epoch, best_val_loss=best_val_loss, history=history,
                       stopped_early=stopped_early, resumed_from_epoch=start_epoch)


@torch.no_grad()
def predict(model: nn.Module, X_scaled: np.ndarray, scaler: StandardScaler, batch_size: int = 4096) -> np.ndarray:
    """Forecast scaled windows X (N, seq_len, C); out (N, horizon, C) float64 in original units."""
    model.eval()
    X = torch.as_tensor(np.asarray(X_scaled, dtype=np.float32))
    outputs = [model(X[start:start + batch_size]) for start in range(0, len(X), batch_size)]
    return scaler.inverse_transform(torch.cat(outputs).numpy())


class Forecaster:
    """A trained forecaster as a plain, picklable object: weights + model hyper-parameters +
    scaler statistics + channel names. `forecast` takes recent per-minute load in original units."""

    weights_file = "dlinear_state.pt"
    meta_file = "forecaster.json"

    def __init__(self, state_dict: dict[str, torch.Tensor], model_hparams: dict, scaler_state: dict,
                 channels: tuple[str, ...] | list[str]) -> None:
        self.state_dict = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
        self.model_hparams = dict(model_hparams)
        self.scaler_state = {k: list(v) for k, v in scaler_state.items()}
        self.channels = tuple(channels)
        self.seq_len = int(self.model_hparams["seq_len"])
        self.horizon = int(self.model_hparams["horizon"])
        self._model: DLinear | None = None
        self._scaler: StandardScaler | None = None

    @classmethod
    def from_training(cls, model: DLinear, scaler: StandardScaler, channels: tuple[str, ...] | list[str]) -> "Forecaster":
        return cls(model.state_dict(), model.hparams, scaler.state_dict(), channels)

    def __getstate__(self) -> dict:
        # The rebuilt model is a cache; pickle only the plain parts.
        return {**self.__dict__, "_model": None, "_scaler": None}

    def _ready(self) -> tuple[DLinear, StandardScaler]:
        if self._model is None:
            self._model = DLinear(**self.model_hparams)
            self._model.load_state_dict(self.state_dict)
            self._model.eval()
            self._scaler = StandardScaler().load_state_dict(self.scaler_state)
        return self._model, self._scaler

    def forecast(self, history: pd.DataFrame) -> pd.DataFrame:
        """In: per-minute load with the channel columns, oldest first, >= seq_len rows (the last
        seq_len are used). Out: `horizon` rows (index `step` 1..H), one column per channel."""
        missing = [c for c in self.channels if c not in history.columns]
        if missing:
            raise ForecastDataError(f"history is missing column(s) {missing}")
        if len(history) < self.seq_len:
            raise ForecastDataError(f"history has {len(history)} rows, needs at least seq_len = {self.seq_len}")
        window = history[list(self.channels)].to_numpy(dtype=float)[-self.seq_len:]
        if not np.isfinite(window).all():
            raise ForecastDataError("history has NaN or infinite values in its last seq_len rows")
        model, scaler = self._ready()
        out = predict(model, scaler.transform(window)[None], scaler)[0]
        return pd.DataFrame(out, columns=list(self.channels),
                            index=pd.RangeIndex(1, self.horizon + 1, name="step"))

    def save(self, directory: str | Path) -> Path:
        """Write the weights (torch.save) and the metadata (JSON) into directory; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict, directory / self.weights_file)
        meta = {"model_hparams": self.model_hparams, "scaler_state": self.scaler_state,
                "channels": list(self.channels)}
        (directory / self.meta_file).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Forecaster":
        directory = Path(directory)
        for name in (cls.weights_file, cls.meta_file):
            if not (directory / name).is_file():
                raise ForecastDataError(f"{directory / name}: forecaster file not found")
        meta = json.loads((directory / cls.meta_file).read_text())
        state = torch.load(directory / cls.weights_file, weights_only=True)
        return cls(state, meta["model_hparams"], meta["scaler_state"], meta["channels"])
