"""Training a forecaster (DLinear or the calendar MLP) on per-minute load windows, and the saved
forecaster a service calls.

Straight line: seed -> model/optimiser -> (resume from checkpoint) -> epochs of shuffled
mini-batches on scaled data (DLinear: MSE; calendar MLP: pinball loss of its P50/P90 heads) ->
validation -> early stopping on val loss -> best weights restored. The best state is a deep copy
(the original study kept a live reference to the state dict, so its "restore" restored nothing).
A non-finite loss stops training at once (TrainingDivergedError): a diverged model is never returned.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from core.forecasting.burstgpt import CHANNELS, load_trace, per_minute_series, trace_source
from core.forecasting.calendar_mlp import MINUTES_PER_DAY, QUANTILES, CalendarMLP, FeatureSpec, pinball_loss, window_features
from core.forecasting.dlinear import DLinear
from core.forecasting.windows import (ForecastDataError, ForecastDatasets, StandardScaler, build_datasets, check_history,
                                      parse_split)

# The calendar MLP is the default: it beats DLinear on the held-out windows (benchmarks/README.md).
MODEL_KINDS: tuple[str, ...] = ("calendar_mlp", "dlinear")
# What a checkpoint must agree on to be resumed (epochs and patience may grow; threads do not matter).
_RESUMABLE_ONLY_IF_EQUAL = ("model_kind", "seq_len", "horizon", "kernel_size", "individual", "decomposition",
                            "hidden_width", "recent_minutes", "lag_days")


class TrainingDivergedError(ForecastDataError):
    """The training loss became NaN or infinite; the message names the epoch and the learning rate."""


@dataclass
class ForecastTrainConfig:
    """All training knobs with their defaults in one place (minutes for window sizes)."""

    model_kind: str = MODEL_KINDS[0]
    seq_len: int = 120
    horizon: int = 3
    stride: int = 1
    kernel_size: int = 25  # DLinear only
    individual: bool = True  # DLinear only
    decomposition: bool = True  # DLinear only
    hidden_width: int = 64  # calendar MLP only
    recent_minutes: int = 15  # calendar MLP only: raw minutes fed as features
    lag_days: int = 0  # calendar MLP only: previous days' same minutes (0: no gain measured on the synthetic trace)
    batch_size: int = 256
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0
    num_epochs: int = 150
    patience: int = 10  # epochs without a val-loss improvement before stopping
    seed: int = 0
    num_threads: int | None = 1  # torch intra-op threads (1 is fastest for these small models); None leaves torch's

    def validate(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ForecastDataError(f"model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        for name in ("seq_len", "horizon", "stride", "kernel_size", "batch_size", "num_epochs", "patience", "hidden_width"):
            if getattr(self, name) <= 0:
                raise ForecastDataError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ForecastDataError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ForecastDataError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ForecastDataError(f"num_threads must be > 0, got {self.num_threads}")
        self.feature_spec().validate()

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(self.seq_len, self.horizon, self.recent_minutes, self.lag_days)

    def context_minutes(self) -> int:
        """Minutes of history before a window's first target that the model reads."""
        return self.feature_spec().context_minutes() if self.model_kind == "calendar_mlp" else self.seq_len

    def checkpoint_name(self, data_digest: str) -> str:
        """A checkpoint file name that only a run on the same data with the same settings resumes
        (epochs and patience aside, so a finished training can be extended)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("num_epochs", "patience", "num_threads")}
        key = hashlib.sha256(json.dumps([settings, data_digest], sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.model_kind}-{key}.pt"


@dataclass
class EpochRecord:
    """One epoch's figures; losses are on standardised data (MSE or pinball), val_mae likewise (P50)."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_mae: float
    lr: float
    epoch_time_s: float
    is_best: bool


# Per-epoch record keys that go to the training and the validation history CSVs.
TRAINING_KEYS: tuple[str, ...] = ("train_loss", "lr", "epoch_time_s")
VALIDATION_KEYS: tuple[str, ...] = ("val_loss", "val_mae", "is_best")


@dataclass
class TrainResult:
    model: nn.Module  # best weights loaded
    config: ForecastTrainConfig
    best_epoch: int
    best_val_loss: float
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int = 0  # 0 = fresh start

    def record(self) -> dict:
        """What the run's training_config.json keeps: the full config, the best epoch, where it resumed."""
        return {"train_config": asdict(self.config), "best_epoch": self.best_epoch,
                "resumed_from_epoch": self.resumed_from_epoch}


def build_model(config: ForecastTrainConfig, num_channels: int) -> nn.Module:
    if config.model_kind == "dlinear":
        return DLinear(config.seq_len, config.horizon, num_channels, individual=config.individual,
                       kernel_size=config.kernel_size, decomposition=config.decomposition)
    return CalendarMLP(config.feature_spec().num_features(num_channels), config.horizon, num_channels, config.hidden_width)


def model_inputs(config: ForecastTrainConfig, data: ForecastDatasets, part: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """What the model reads for the windows `rows` of `part`: DLinear the scaled history windows, the
    calendar MLP their features (float32, in the order of data.t0(part)[rows])."""
    if config.model_kind == "dlinear":
        return getattr(data, f"X_{part}")[rows]
    return window_features(data.scaler.transform(data.split.full), data.t0(part)[rows], config.feature_spec())


def _loss_fn(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return pinball_loss if isinstance(model, CalendarMLP) else nn.functional.mse_loss


@torch.no_grad()
def _evaluate(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 8192) -> tuple[float, float]:
    """(loss, MAE of the point forecast) over all windows, batched to bound memory."""
    model.eval()
    loss_fn, loss_sum, abs_sum = _loss_fn(model), 0.0, 0.0
    for start in range(0, len(X), batch_size):
        output, target = model(X[start:start + batch_size]), Y[start:start + batch_size]
        loss_sum += float(loss_fn(output, target)) * len(target)
        abs_sum += float((point_forecast(output) - target).abs().sum())
    return loss_sum / len(Y), abs_sum / Y.numel()


def _save_checkpoint(path: Path, state: dict) -> None:
    # Write then rename, so a run killed mid-save leaves the previous checkpoint intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_forecaster(
    data: ForecastDatasets,
    config: ForecastTrainConfig,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_path: Path | None = None,
) -> TrainResult:
    """Train `config.model_kind` with early stopping on val loss.

    In: scaled windows (config.seq_len / horizon must match data's), the config, an optional
    callback called with every new EpochRecord (exceptions it raises propagate, e.g. an Optuna
    prune), an optional checkpoint file written after every epoch and resumed from when it exists
    (it must hold the same data digest and model settings). Out: TrainResult with the best-val-loss
    weights loaded into `model`. Raises TrainingDivergedError on a non-finite loss.
    """
    config.validate()
    if (config.seq_len, config.horizon) != (data.seq_len, data.horizon):
        raise ForecastDataError(
            f"config seq_len/horizon = {config.seq_len}/{config.horizon} do not match the data's "
            f"windows {data.seq_len}/{data.horizon}"
        )
    context = config.context_minutes()
    if data.t0_val.min() < context:
        raise ForecastDataError(f"the validation part starts at minute {int(data.t0_val.min())} but the model reads "
                                f"{context} minutes of history (seq_len, lag_days): use a longer trace or fewer lag_days")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    shuffle_rng = torch.Generator().manual_seed(config.seed)

    keep = data.t0_train >= context  # the calendar MLP may read further back than seq_len
    X_train = torch.from_numpy(model_inputs(config, data, "train", keep)).float()
    Y_train = torch.from_numpy(data.Y_train[keep]).float()
    X_val, Y_val = torch.from_numpy(model_inputs(config, data, "val")).float(), torch.from_numpy(data.Y_val).float()
    model = build_model(config, Y_train.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = _loss_fn(model)
    digest = data.digest()

    history: list[EpochRecord] = []
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, best_val_loss, bad_epochs, stopped_early, start_epoch = 0, float("inf"), 0, False, 0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint_path is not None and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=True)
        saved_model = {k: saved["config"].get(k) for k in _RESUMABLE_ONLY_IF_EQUAL}
        wanted_model = {k: getattr(config, k) for k in _RESUMABLE_ONLY_IF_EQUAL}
        if saved_model != wanted_model:
            raise ForecastDataError(
                f"checkpoint {checkpoint_path} was written for model {saved_model}, not {wanted_model}"
            )
        if saved.get("data_digest") != digest:
            raise ForecastDataError(f"checkpoint {checkpoint_path} was written for other data (digest "
                                    f"{saved.get('data_digest')}, not {digest}): pass another checkpoint_dir")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle_rng.set_state(saved["shuffle_rng"])
        history = [EpochRecord(**record) for record in saved["history"]]
        best_state, best_epoch, best_val_loss = saved["best_state"], saved["best_epoch"], saved["best_val_loss"]
        bad_epochs, stopped_early, start_epoch = saved["bad_epochs"], saved["stopped_early"], saved["epoch"]

    # A checkpoint of a run that already stopped early has nothing left to train.
    last_epoch = start_epoch if stopped_early else config.num_epochs
    epochs = tqdm(range(start_epoch + 1, last_epoch + 1), desc=f"{config.model_kind} epochs",
                  initial=start_epoch, total=last_epoch)
    for epoch in epochs:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(X_train), generator=shuffle_rng)
        loss_sum = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = loss_fn(model(X_train[batch]), Y_train[batch])
            if not torch.isfinite(loss):
                epochs.close()
                raise TrainingDivergedError(f"training diverged at epoch {epoch}: the loss is {float(loss)} "
                                            f"(lr={config.lr}); lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
        val_loss, val_mae = _evaluate(model, X_val, Y_val)
        if not math.isfinite(val_loss):
            epochs.close()
            raise TrainingDivergedError(f"training diverged at epoch {epoch}: the validation loss is {val_loss} "
                                        f"(lr={config.lr}); lower lr")

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
                "data_digest": digest,
            })
        if on_epoch is not None:
            on_epoch(record)
        if stopped_early:
            break
    epochs.close()

    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, config=config, best_epoch=best_epoch, best_val_loss=best_val_loss,
                       history=history, stopped_early=stopped_early, resumed_from_epoch=start_epoch)


def study_datasets(series: pd.DataFrame, config: ForecastTrainConfig, split: str, moving_average_window: int,
                   trace: str) -> ForecastDatasets:
    """The windows of a study: `series`' channels split by `split` ("train,val[[,gap],test]" fractions, `parse_split`), checked to
    hold the history the model (and the baselines: a day, `moving_average_window`) read, before any training."""
    if moving_average_window <= 0:
        raise ForecastDataError(f"moving_average_window must be > 0, got {moving_average_window}")
    fractions = parse_split(split)
    data = build_datasets(series.to_numpy(dtype=float), config.seq_len, config.horizon, config.stride, fractions.train,
                          fractions.val, tuple(series.columns), fractions.test, fractions.gap)
    check_history(data, trace, config.context_minutes(), max(MINUTES_PER_DAY, moving_average_window))
    return data


@dataclass
class ForecastStudy:
    """A study's data: the per-minute series, its windows, and where the trace came from (for the record)."""

    series: pd.DataFrame  # load per minute, all channels
    data: ForecastDatasets  # the scaled windows of the chronological split
    source: str | dict[str, str]


def load_study(trace: str, seed: int, num_days: int, models: Sequence[str], log_types: Sequence[str],
               config: ForecastTrainConfig, split: str, moving_average_window: int) -> ForecastStudy:
    """Read (or generate, `trace="synthetic"`) a trace, filtered to `models` / `log_types` (empty: all), and
    build the study's windows (`study_datasets`)."""
    series = per_minute_series(load_trace(trace, seed, num_days, list(models) or None, list(log_types) or None))
    data = study_datasets(series[list(CHANNELS)], config, split, moving_average_window, f"trace {trace}")
    return ForecastStudy(series, data, trace_source(trace, seed, num_days))


def train_with_reference(
    data: ForecastDatasets, config: ForecastTrainConfig, on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_dir: Path | str | None = None,
) -> tuple[TrainResult, TrainResult | None]:
    """Train `config`'s model and, when it is not DLinear, a DLinear reference with the same settings on the
    same windows (None otherwise); each resumes from its own checkpoint under `checkpoint_dir` when given."""
    def checkpoint(c: ForecastTrainConfig) -> Path | None:
        return Path(checkpoint_dir) / c.checkpoint_name(data.digest()) if checkpoint_dir else None

    result = train_forecaster(data, config, on_epoch, checkpoint(config))
    if config.model_kind == "dlinear":
        return result, None
    reference = replace(config, model_kind="dlinear")
    return result, train_forecaster(data, reference, checkpoint_path=checkpoint(reference))


@torch.no_grad()
def predict(model: nn.Module, inputs: np.ndarray, scaler: StandardScaler, batch_size: int = 4096) -> np.ndarray:
    """Forecast from scaled model inputs (N, ...): out (N, horizon, C) for DLinear, (N, horizon, C,
    len(QUANTILES)) for a quantile model, float64 in original units, clipped at 0 (loads are counts)."""
    model.eval()
    X = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    out = torch.cat([model(X[start:start + batch_size]) for start in range(0, len(X), batch_size)]).numpy()
    if out.ndim == 4:  # quantiles last: unscale with the channel axis last
        out = np.moveaxis(scaler.inverse_transform(np.moveaxis(out, -1, 0)), 0, -1)
    else:
        out = scaler.inverse_transform(out)
    return np.maximum(out, 0.0)


def point_forecast(forecast: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The (N, H, C) point forecast: a quantile forecast's P50 head, or the forecast itself."""
    return forecast[..., QUANTILES.index(0.5)] if forecast.ndim == 4 else forecast


class Forecaster:
    """A trained forecaster as a plain, picklable object: model kind, weights, hyper-parameters,
    scaler statistics, channel names and torch threads. `forecast` takes recent per-minute load in
    original units (and, for the calendar MLP, each row's `minute` since the trace start)."""

    weights_file = "model_state.pt"
    meta_file = "forecaster.json"
    clock_column = "minute"

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor], model_hparams: dict, scaler_state: dict,
                 channels: tuple[str, ...] | list[str]) -> None:
        self.config = ForecastTrainConfig(**config)
        self.state_dict = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
        self.model_hparams = dict(model_hparams)
        self.scaler_state = {k: list(v) for k, v in scaler_state.items()}
        self.channels = tuple(channels)
        self.horizon = self.config.horizon
        self.context = self.config.context_minutes()
        self.uses_clock = self.config.model_kind == "calendar_mlp"
        self._model: nn.Module | None = None
        self._scaler: StandardScaler | None = None

    @classmethod
    def from_training(cls, result: TrainResult, data: ForecastDatasets) -> "Forecaster":
        return cls(asdict(result.config), result.model.state_dict(), result.model.hparams, data.scaler.state_dict(),
                   data.channels)

    def history_example(self, series: pd.DataFrame) -> pd.DataFrame:
        """The last `context` rows of a per-minute series (index = minute) as `forecast` takes them."""
        return series[list(self.channels)].iloc[-self.context:].rename_axis(self.clock_column).reset_index()

    def __getstate__(self) -> dict:
        # The rebuilt model is a cache; pickle only the plain parts.
        return {**self.__dict__, "_model": None, "_scaler": None}

    def _ready(self) -> tuple[nn.Module, StandardScaler]:
        if self._model is None:
            model_class = CalendarMLP if self.uses_clock else DLinear
            self._model = model_class(**self.model_hparams)
            self._model.load_state_dict(self.state_dict)
            self._model.eval()
            self._scaler = StandardScaler().load_state_dict(self.scaler_state)
        return self._model, self._scaler

    def forecast(self, history: pd.DataFrame) -> pd.DataFrame:
        """In: per-minute load with the channel columns (and `minute` for the calendar MLP), oldest
        first, at least `context` rows (the last are used). Out: `horizon` rows (index `step` 1..H),
        one column per channel (the P50 for a quantile model, which adds `<channel>_p90`), >= 0."""
        needed = [*self.channels, *([self.clock_column] if self.uses_clock else [])]
        missing = [c for c in needed if c not in history.columns]
        if missing:
            raise ForecastDataError(f"history is missing column(s) {missing}")
        if len(history) < self.context:
            raise ForecastDataError(f"history has {len(history)} rows, needs at least {self.context} (the model's "
                                    f"context: seq_len = {self.config.seq_len}, lag_days = {self.config.lag_days})")
        # Column by column on the last rows: a frame selection plus pandas' string index cost more than the model.
        window = np.column_stack([history[c].to_numpy(dtype=float)[-self.context:] for c in self.channels])
        if not np.isfinite(window).all():
            raise ForecastDataError("history has NaN or infinite values in its last rows")
        model, scaler = self._ready()
        scaled = scaler.transform(window)
        if self.uses_clock:
            clock = int(history[self.clock_column].iloc[-1]) + 1
            inputs = window_features(scaled, np.array([len(scaled)]), self.config.feature_spec(), np.array([clock]))
        else:
            inputs = scaled[None]
        out = predict(model, inputs, scaler)[0]
        columns, values = list(self.channels), point_forecast(out[None])[0]
        if out.ndim == 3:  # one frame built at once: inserting the P90 columns one by one doubled the call
            columns += [f"{channel}_p90" for channel in self.channels]
            values = np.hstack([values, out[:, :, QUANTILES.index(0.9)]])
        return pd.DataFrame(values, columns=columns, index=pd.RangeIndex(1, self.horizon + 1, name="step"))

    def save(self, directory: str | Path) -> Path:
        """Write the weights (torch.save) and the metadata (JSON) into directory; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict, directory / self.weights_file)
        meta = {"config": asdict(self.config), "model_hparams": self.model_hparams, "scaler_state": self.scaler_state,
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
        return cls(meta["config"], state, meta["model_hparams"], meta["scaler_state"], meta["channels"])
