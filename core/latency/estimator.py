"""The latency estimator: profiling rows in, predicted latency components (and their P90) out.

One straight line, nanoGPT-style:
  profiling table -> `core.latency.data` (schema gate, `split_by_sample` / `split_heldout_config`)
  -> `train_estimator` (MLP on standardised `core.latency.features`, best-val-loss weights restored)
  -> `LatencyEstimator.predict_frame` -> `core.latency.evaluation.evaluate_predictor` (per (sample,
  config) medians).

What is predicted: T_vision_ms, T_prefill_ms and T_decode_per_token_ms, each as a point value and
an upper quantile (P90 by default, for guardrails). The end-to-end time for an answer of L tokens
follows: T_total_ms = vision + prefill + (L - 1) * decode_per_token (the first token comes from
prefill). The P90 of the total is the sum of the component P90s: an upper bound when components
co-vary, which is the safe side for a guardrail.

Rows and medians. A profiling table holds several `run_index` repeats per (sample, config). We
train on the rows (each repeat is a draw of the noise; a log-space fit of them estimates the
typical run, and the P90 head needs the spread) but report errors against per-(sample, config)
medians, the figure the profiler calls "the latency". On a table with ~10% run-to-run noise
(data/profiles/h100-molmoe-arch) per-row errors would mostly measure noise no estimator can predict;
medians of 3 runs still carry about a third of it (see `core.latency.metrics.run_to_run_noise`).

Decode per token is undefined for answers of one token (no decode forward; the schema stores 0):
those rows are masked out of the decode loss and metrics.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from core.data_digest import frame_digest
from core.knobs import TIERS
from core.latency.data import TARGETS, EstimatorError, aggregate_runs, prepare_table, target_arrays
from core.latency.features import (
    FEATURES,
    OUTPUT_COLUMNS,
    STEP_KNOBS,
    STEP_LEVELS,
    add_total,
    feature_matrix,
    features_from_raw,
    knob_levels,
    raw_matrix,
)
from core.latency.metrics import mean_over_components
from core.timing import PREDICTED_COMPONENTS

LOSSES: tuple[str, ...] = ("log_mse", "rel_l1", "mse")
CHECKPOINT_FORMAT = "latency-estimator/2"  # /2: step-ramp features and their ends
# The training state in a checkpoint directory (optimizer, RNG, history): for resuming, not a model.
RESUME_STATE = "last.pt"
_NUMPY_MAX_ROWS = 256  # below this a numpy forward beats torch's dispatch overhead
_TORCH_CHUNK_ROWS = 8192  # activations of one chunk stay in cache
_TRAIN_METRIC_GROUPS = 8192  # at most this many training (sample, config) groups feed the per-epoch train_ metrics
LR_SCHEDULES = ("cosine", "constant")
# The keys of a `train_estimator` history record, by the side they describe (besides "epoch").
TRAINING_RECORD_KEYS: tuple[str, ...] = (
    "train_loss", "train_mae_prefill", "train_mae_decode", "train_rel_error_prefill", "train_rel_error_decode",
    "train_mae_vision", "train_rel_error_vision", "lr", "epoch_time_s")
VALIDATION_RECORD_KEYS: tuple[str, ...] = (
    "val_loss", "val_mae_prefill", "val_mae_decode", "val_rel_error_prefill", "val_rel_error_decode", "val_mae_vision",
    "val_rel_error_vision", "val_rel_error_mean", "val_p90_coverage", "is_best")


def epoch_lr(config: "EstimatorConfig", epoch: int) -> float:
    """The learning rate of `epoch` (1-based). A closed form of (epoch, num_epochs), so a resumed or
    extended run needs no scheduler state."""
    if config.lr_schedule == "constant":
        return config.lr
    floor = config.lr / 100
    progress = (epoch - 1) / max(config.num_epochs - 1, 1)
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class EstimatorConfig:
    """Every hyper-parameter of the estimator with its default, in one place (train_estimator's
    command-line defaults read them from here)."""

    hidden_width: int = 128
    depth: int = 3  # hidden layers
    lr: float = 1e-3  # Adam
    # "cosine": each epoch's lr follows a half cosine from lr down to lr / 100 (small tables get few
    # steps; a decayed lr settles where a constant one keeps jittering); "constant": lr throughout.
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-5
    batch_size: int = 64
    num_epochs: int = 50
    # "rel_l1": mean |pred/true - 1|, the held-out metric (MAPE) itself, and robust to timing noise,
    # which is skewed towards slow rows; "log_mse": MSE of standardised log ms (a geometric-mean fit,
    # pulled by the slow tail); "mse": MSE of ms / train std.
    loss: str = "rel_l1"
    quantile: float = 0.9  # upper-quantile head, pinball loss in log space
    train_split: float = 0.8  # share of samples for training (+ validation) in the splits
    seed: int = 0
    device: str = "cpu"
    # torch intra-op threads while training (restored after). Batches of 64 are dispatch-bound:
    # a second thread only adds synchronisation, 10x slower on a busy 2-core host. None: torch's.
    num_threads: int | None = 1

    def validate(self) -> "EstimatorConfig":
        for name in ("hidden_width", "depth", "batch_size", "num_epochs"):
            if int(getattr(self, name)) < 1:
                raise EstimatorError(f"parameter {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise EstimatorError(f"parameter lr must be a finite number > 0, got {self.lr}")
        check_device(self.device)
        if self.weight_decay < 0:
            raise EstimatorError(f"parameter weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise EstimatorError(f"parameter lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.loss not in LOSSES:
            raise EstimatorError(f"parameter loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if not 0 < self.quantile < 1:
            raise EstimatorError(f"parameter quantile must lie in (0, 1), got {self.quantile}")
        if not 0 < self.train_split < 1:
            raise EstimatorError(f"parameter train_split must lie in (0, 1), got {self.train_split}")
        if self.num_threads is not None and self.num_threads < 1:
            raise EstimatorError(f"parameter num_threads must be >= 1, got {self.num_threads}")
        return self

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "EstimatorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EstimatorError(f"{source}: unknown estimator parameter(s) {unknown}")
        return cls(**values)


class TrainingDiverged(EstimatorError):
    """The loss became NaN or infinite: training stops (nothing is registered)."""


def check_device(device: str) -> None:
    """EstimatorError naming the parameter unless `device` is a torch device this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise EstimatorError(f"device={device!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(parsed.type, False):
        raise EstimatorError(f"device={device!r} is not available on this machine"
                             + ("" if parsed.type in available else " (cpu, cuda, cuda:N, mps)"))


def split_digest(train_df: pd.DataFrame, val_df: pd.DataFrame) -> str:
    """The data a training run sees: a resume must see the same."""
    return frame_digest(train_df) + frame_digest(val_df)


def resume_state(checkpoint_dir: Path, config: "EstimatorConfig", data_digest: str, device: str = "cpu") -> dict | None:
    """The training state in `checkpoint_dir`/RESUME_STATE (None when there is none), checked: written with
    the same parameters (the epoch count, device and threads may differ: a resume may extend a run) and
    on the same train/val rows. EstimatorError naming the file otherwise, before anything is overwritten."""
    path = Path(checkpoint_dir) / RESUME_STATE
    if not path.is_file():
        return None
    saved = torch.load(path, map_location=device, weights_only=True)
    free = ("num_epochs", "device", "num_threads")
    was = {k: v for k, v in saved.get("config", {}).items() if k not in free}
    now = {k: v for k, v in asdict(config).items() if k not in free}
    if was != now:
        changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        raise EstimatorError(f"checkpoint {path} was written with other parameter(s) {changed}; cannot resume")
    if saved.get("data_digest") != data_digest:
        raise EstimatorError(f"checkpoint {path} was trained on other data (digest {saved.get('data_digest')}, "
                             f"this table's split: {data_digest}); cannot resume: same results_dir, dataset_names, "
                             "train_split and seed needed")
    return saved


# --- the model -------------------------------------------------------------------------------------
class LatencyEstimator(nn.Module):
    """MLP: standardised FEATURES -> standardised log latency of the three TARGETS (point) and their
    upper quantile (point + softplus(offset), so the bound never falls below the point).

    The feature and target scalers are buffers fitted on the training rows only (`fit_scalers`) and
    travel with the weights in the state dict. `predict_frame` is the table interface,
    `predict_array` the batched one, `predict_one` the per-request one (numpy, no torch dispatch).
    """

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        super().__init__()
        self.config = (config or EstimatorConfig()).validate()
        width, layers, fan_in = self.config.hidden_width, [], len(FEATURES)
        for _ in range(self.config.depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * len(TARGETS))
        self.register_buffer("knob_levels", torch.full((len(STEP_KNOBS), STEP_LEVELS + 1), math.inf, dtype=torch.float64))
        self.register_buffer("feature_mean", torch.zeros(len(FEATURES)))
        self.register_buffer("feature_std", torch.ones(len(FEATURES)))
        self.register_buffer("target_log_mean", torch.zeros(len(TARGETS)))
        self.register_buffer("target_log_std", torch.ones(len(TARGETS)))
        self.register_buffer("target_scale_ms", torch.ones(len(TARGETS)))  # train std in ms, for loss "mse"
        self.meta: dict[str, object] = {}  # JSON-able facts: data it was trained on, best epoch
        self._numpy_params: tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray] | None = None
        self._levels: np.ndarray | None = None  # numpy copy of knob_levels (a request pays no torch call)

    # scalers -----------------------------------------------------------------------------------
    def fit_scalers(self, train_df: pd.DataFrame) -> "LatencyEstimator":
        """Fit step-ramp ends, feature mean/std and log-target mean/std on `train_df` (training rows only)."""
        raw = raw_matrix(train_df)
        self.knob_levels.copy_(torch.as_tensor(knob_levels(raw)))
        self._levels = None
        features = features_from_raw(raw, self.levels).astype(np.float64)
        y, mask = target_arrays(train_df)
        mean, std = features.mean(axis=0), features.std(axis=0)
        # A feature constant in training (e.g. one prompt length) carries no information there; an
        # infinite scale maps it to 0 everywhere, so an unseen value cannot push the MLP off its data.
        constant = std <= 1e-9 * np.maximum(np.abs(mean), 1.0)
        self.feature_mean.copy_(torch.as_tensor(mean))
        self.feature_std.copy_(torch.as_tensor(np.where(constant, np.inf, std)))
        for j in range(len(TARGETS)):
            values = y[mask[:, j], j]
            if len(values) == 0:
                raise EstimatorError(f"field {TARGETS[j]}: no training row defines it")
            logs = np.log(values)
            self.target_log_mean[j] = float(logs.mean())
            self.target_log_std[j] = float(logs.std()) if logs.std() > 1e-12 else 1.0
            self.target_scale_ms[j] = float(values.std()) if values.std() > 1e-12 else float(values.mean())
        self._numpy_params = None
        return self

    @property
    def levels(self) -> np.ndarray:
        """The step ramps' ends (`knob_levels` of the training rows)."""
        if self._levels is None:
            self._levels = self.knob_levels.detach().cpu().numpy().copy()
        return self._levels

    def features(self, df: pd.DataFrame) -> np.ndarray:
        """FEATURES of `df`'s rows under this model's step thresholds."""
        return feature_matrix(df, self.levels)

    def standardise(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(features, dtype=torch.float32, device=self.feature_mean.device)
        return (x - self.feature_mean) / self.feature_std

    # forward -----------------------------------------------------------------------------------
    def forward(self, x_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In: standardised features (N, F). Out: (point, upper) standardised log latency, (N, 3) each."""
        out = self.head(self.trunk(x_std))
        point = out[:, : len(TARGETS)]
        # Detached: the quantile head learns an offset without dragging the point estimate up.
        upper = point.detach() + nn.functional.softplus(out[:, len(TARGETS):])
        return point, upper

    def to_log_ms(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.target_log_std + self.target_log_mean

    def train(self, mode: bool = True) -> "LatencyEstimator":
        self._numpy_params = self._levels = None  # weights may change: drop the numpy copies
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._numpy_params = self._levels = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # inference ---------------------------------------------------------------------------------
    def _numpy_weights(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
        """Float32 (W^T, b) per layer with the feature scaler folded into the first layer, plus the
        log-target scale and offset for the six outputs (cached: a request pays no torch call)."""
        if self._numpy_params is None:
            linears = [m for m in self.trunk if isinstance(m, nn.Linear)] + [self.head]
            params = [(m.weight.detach().cpu().double().numpy().T.copy(), m.bias.detach().cpu().double().numpy().copy())
                      for m in linears]
            mean, std = self.feature_mean.cpu().double().numpy(), self.feature_std.cpu().double().numpy()
            w0, b0 = params[0]
            # (x - mean) / std @ W + b  ==  x @ (W / std) + (b - (mean / std) @ W)
            params[0] = (w0 / std[:, None], b0 - (mean / std) @ w0)
            layers = [(np.ascontiguousarray(w, dtype=np.float32), b.astype(np.float32)) for w, b in params]
            scale = np.tile(self.target_log_std.cpu().double().numpy(), 2)
            offset = np.tile(self.target_log_mean.cpu().double().numpy(), 2)
            self._numpy_params = (layers, scale, offset)
        return self._numpy_params

    def _forward_numpy(self, features: np.ndarray) -> np.ndarray:
        layers, scale, offset = self._numpy_weights()
        h = np.asarray(features, dtype=np.float32)
        for w, b in layers[:-1]:
            h = h @ w + b
            h = 0.5 * h * (1.0 + np.tanh(0.5 * h))  # SiLU; the tanh form cannot overflow
        out = (h @ layers[-1][0] + layers[-1][1]).astype(np.float64)
        k = len(TARGETS)
        out[:, k:] = out[:, :k] + np.logaddexp(0.0, out[:, k:])  # upper = point + softplus(offset)
        return np.exp(out * scale + offset)

    @torch.inference_mode()
    def _forward_torch(self, features: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(features), _TORCH_CHUNK_ROWS):
            point, upper = self(self.standardise(features[start:start + _TORCH_CHUNK_ROWS]))
            log_ms = torch.cat([self.to_log_ms(point), self.to_log_ms(upper)], dim=1)
            outputs.append(torch.exp(log_ms.double()).cpu().numpy())
        return np.concatenate(outputs) if outputs else np.empty((0, 2 * len(TARGETS)))

    def predict_array(self, raw: np.ndarray) -> np.ndarray:
        """In: (N, 6) RAW_COLUMNS values, tier as index. Out: (N, 6) ms in OUTPUT_COLUMNS order
        (three points, then three upper quantiles). Small batches run in numpy, large in torch."""
        if self.training:
            self.eval()
        features = features_from_raw(raw, self.levels)
        return self._forward_numpy(features) if len(features) <= _NUMPY_MAX_ROWS else self._forward_torch(features)

    def predict_frame(self, df_configs: pd.DataFrame) -> pd.DataFrame:
        """In: rows with RAW_COLUMNS (tier by name), optionally output_tokens. Out: same index,
        columns T_vision_ms, T_prefill_ms, T_decode_per_token_ms and their _p90 variants, plus
        T_total_ms and T_total_ms_p90 when output_tokens is given."""
        out = pd.DataFrame(self.predict_array(raw_matrix(df_configs)), columns=list(OUTPUT_COLUMNS), index=df_configs.index)
        return add_total(out, df_configs)

    def predict_one(self, tier: str, top_k: int, num_active_blocks: int, vision_tokens: int, text_tokens: int,
                    crops: int, output_tokens: int | None = None) -> dict[str, float]:
        """One request, one config -> {column: ms} as predict_frame would give (numpy path, ~tens of us)."""
        if tier not in TIERS:
            raise EstimatorError(f"field tier={tier!r} is not one of {list(TIERS)}")
        if self.training:
            self.eval()
        raw = np.array([[vision_tokens, text_tokens, crops, TIERS.index(tier), top_k, num_active_blocks]], dtype=np.float64)
        values = self._forward_numpy(features_from_raw(raw, self.levels))[0]
        out = dict(zip(OUTPUT_COLUMNS, values.tolist()))
        if output_tokens is not None:
            steps = max(int(output_tokens) - 1, 0)
            out["T_total_ms"] = out["T_vision_ms"] + out["T_prefill_ms"] + steps * out["T_decode_per_token_ms"]
            out["T_total_ms_p90"] = (out["T_vision_ms_p90"] + out["T_prefill_ms_p90"]
                                     + steps * out["T_decode_per_token_ms_p90"])
        return out

    # persistence -------------------------------------------------------------------------------
    def checkpoint(self, extra_meta: dict | None = None) -> dict:
        """The plain dict `save` writes: format tag, FEATURES, config, state dict (CPU), meta."""
        return {
            "format": CHECKPOINT_FORMAT,
            "features": list(FEATURES),
            "targets": list(TARGETS),
            "config": asdict(self.config),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "meta": {**self.meta, **(extra_meta or {})},
        }

    def save(self, path: str | os.PathLike[str], extra_meta: dict | None = None) -> Path:
        """Weights + scalers + config + meta in one torch.save file (write, then rename)."""
        path = Path(path)
        _atomic_torch_save(self.checkpoint(extra_meta), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LatencyEstimator":
        """Rebuild a saved estimator; EstimatorError naming the file for a missing, foreign or
        wrong-shaped checkpoint (other features, other hidden width or depth)."""
        path = Path(path)
        if not path.is_file():
            raise EstimatorError(f"estimator checkpoint {path} does not exist")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise EstimatorError(f"estimator checkpoint {path} cannot be read ({type(exc).__name__})") from None
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise EstimatorError(f"estimator checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
        if list(saved.get("features", [])) != list(FEATURES) or list(saved.get("targets", [])) != list(TARGETS):
            raise EstimatorError(
                f"estimator checkpoint {path}: field features {saved.get('features')} / targets {saved.get('targets')} "
                f"do not match this code's {list(FEATURES)} / {list(TARGETS)}"
            )
        config = EstimatorConfig.from_dict(dict(saved.get("config", {})), source=f"estimator checkpoint {path}")
        try:
            model = cls(config)
        except EstimatorError as exc:
            raise EstimatorError(f"estimator checkpoint {path}: {exc}") from None
        state = saved.get("state_dict", {})
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise EstimatorError(f"estimator checkpoint {path}: state has missing {missing} / unexpected {unexpected} tensors")
        for key, tensor in expected.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise EstimatorError(
                    f"estimator checkpoint {path}: field {key} has shape {tuple(state[key].shape)}, "
                    f"config hidden_width={config.hidden_width} depth={config.depth} needs {tuple(tensor.shape)}"
                )
        model.load_state_dict(state)
        model.meta = dict(saved.get("meta", {}))
        return model.eval()


def _atomic_torch_save(obj: dict, path: Path) -> None:
    # Write then rename: a run killed mid-save leaves the previous file intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --- training --------------------------------------------------------------------------------------
@dataclass
class _Tensors:
    """One split as tensors: standardised features, standardised log targets, ms targets, mask."""

    x: torch.Tensor
    y_z: torch.Tensor
    y_ms: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def build(cls, model: LatencyEstimator, df: pd.DataFrame, device: torch.device) -> "_Tensors":
        y, mask = target_arrays(df)
        log_y = np.log(np.where(mask, y, 1.0))  # masked entries get a dummy that the mask removes
        mean, std = model.target_log_mean.cpu().double().numpy(), model.target_log_std.cpu().double().numpy()
        y_z = np.where(mask, (log_y - mean) / std, 0.0)
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        return cls(model.standardise(model.features(df)).to(device), as_tensor(y_z), as_tensor(y), as_tensor(mask))


def _loss(model: LatencyEstimator, config: EstimatorConfig, x: torch.Tensor, y_z: torch.Tensor, y_ms: torch.Tensor,
          mask: torch.Tensor) -> torch.Tensor:
    """Point loss + pinball loss of the upper quantile, averaged over defined (row, component) entries.

    Written as one masked sum: with batches of 64 the step time is op dispatch, not arithmetic.
    """
    point, upper = model(x)
    if config.loss == "log_mse":
        point_error = (point - y_z).square()
    elif config.loss == "rel_l1":
        # pred / true = exp(log pred - log true); both logs are z * std + mean, the means cancel.
        point_error = (torch.exp((point - y_z) * model.target_log_std) - 1).abs()
    else:  # "mse": in ms, each component scaled by its train std so that none dominates
        point_error = ((torch.exp(model.to_log_ms(point)) - y_ms) / model.target_scale_ms).square()
    # Pinball loss in log space: log is monotone, so its quantile is the latency's quantile.
    error = y_z - upper
    pinball = error * (config.quantile - (error < 0).to(error.dtype))
    return ((point_error + pinball) * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def _loss_and_coverage(model: LatencyEstimator, config: EstimatorConfig, data: _Tensors) -> tuple[float, float]:
    """(loss over the rows, share of defined entries at or below the predicted upper quantile)."""
    loss_sum, hits, count = 0.0, 0.0, 0.0
    for start in range(0, len(data.x), _TORCH_CHUNK_ROWS):
        part = slice(start, start + _TORCH_CHUNK_ROWS)
        loss = _loss(model, config, data.x[part], data.y_z[part], data.y_ms[part], data.mask[part])
        _, upper = model(data.x[part])
        weight = float(data.mask[part].sum())
        loss_sum += float(loss) * weight
        hits += float(((data.y_z[part] <= upper) * data.mask[part]).sum())
        count += weight
    return loss_sum / max(count, 1.0), hits / max(count, 1.0)


@torch.no_grad()
def _median_metrics(model: LatencyEstimator, data: _Tensors, prefix: str) -> dict[str, float]:
    """MAE (ms) and relative error (fraction) per component against per-(sample, config) medians."""
    preds = []
    for start in range(0, len(data.x), _TORCH_CHUNK_ROWS):
        point, _ = model(data.x[start:start + _TORCH_CHUNK_ROWS])
        preds.append(torch.exp(model.to_log_ms(point)))
    pred = torch.cat(preds)
    out: dict[str, float] = {}
    for j, short in enumerate(PREDICTED_COMPONENTS):  # TARGETS order
        rows = data.mask[:, j] > 0
        error = (pred[rows, j] - data.y_ms[rows, j]).abs()
        out[f"{prefix}mae_{short}"] = float(error.mean()) if rows.any() else float("nan")
        out[f"{prefix}rel_error_{short}"] = float((error / data.y_ms[rows, j]).mean()) if rows.any() else float("nan")
    return out


def train_estimator(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    config: EstimatorConfig,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> tuple[LatencyEstimator, list[dict]]:
    """Train the MLP on `train_df` rows; select the epoch by loss on `val_df` rows.

    In: profiling rows (validated here), the config, an optional callback given each epoch's
    record (its exceptions propagate, e.g. an Optuna prune), an optional checkpoint directory
    (best.pt whenever val loss improves, epoch_010.pt-style every 10 epochs, all loadable with
    LatencyEstimator.load; RESUME_STATE (last.pt) holds the training state) and `resume` (continue
    from checkpoint_dir/last.pt when it exists).
    Out: (model with the best-val-loss weights restored, in eval mode; history). One history
    record per epoch: epoch, train_loss (mean over the epoch's batches), val_loss (point + pinball
    loss on val rows), train_/val_ mae_{vision,prefill,decode} (ms) and rel_error_{...} (fraction)
    against per-(sample, config) medians (train_: a fixed random subset of at most 8,192 groups),
    val_rel_error_mean (their mean over the components: the tuning objective, as its scale does not
    depend on the loss kind), val_p90_coverage (share of val rows under the upper quantile), lr,
    epoch_time_s, is_best (0/1).
    """
    config.validate()
    data_digest = split_digest(train_df, val_df)
    train_df = prepare_table(train_df, "train_df")
    val_df = prepare_table(val_df, "val_df")
    threads_before = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(train_df, val_df, config, on_epoch, checkpoint_dir, resume, data_digest)
    finally:
        torch.set_num_threads(threads_before)


def _train(train_df: pd.DataFrame, val_df: pd.DataFrame, config: EstimatorConfig, on_epoch: Callable[[dict], None] | None,
           checkpoint_dir: Path | None, resume: bool, data_digest: str) -> tuple[LatencyEstimator, list[dict]]:
    torch.manual_seed(config.seed)
    shuffle_rng = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)

    model = LatencyEstimator(config).fit_scalers(train_df).to(device)  # scalers see training rows only
    model.meta = {
        "backends": sorted(train_df["backend"].unique().tolist()),
        "datasets": sorted(train_df["dataset"].unique().tolist()),
        "devices": sorted(train_df["device"].unique().tolist()),
        "train_rows": int(len(train_df)), "val_rows": int(len(val_df)),
        "train_samples": int(train_df["sample_id"].nunique()), "val_samples": int(val_df["sample_id"].nunique()),
    }
    train_rows, val_rows = _Tensors.build(model, train_df, device), _Tensors.build(model, val_df, device)
    train_groups = aggregate_runs(train_df)
    if len(train_groups) > _TRAIN_METRIC_GROUPS:  # train_ metrics on a fixed random subset: they are a check, not the objective
        train_groups = train_groups.sample(n=_TRAIN_METRIC_GROUPS, random_state=config.seed)
    train_groups = _Tensors.build(model, train_groups, device)
    val_groups = _Tensors.build(model, aggregate_runs(val_df), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)

    history: list[dict] = []
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, best_val_loss, start_epoch = 0, math.inf, 0
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = checkpoint_dir / RESUME_STATE if checkpoint_dir is not None else None
    saved = resume_state(checkpoint_dir, config, data_digest, str(device)) if resume and checkpoint_dir is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle_rng.set_state(saved["shuffle_rng"])
        history, best_state = list(saved["history"]), saved["best_state"]
        best_epoch, best_val_loss, start_epoch = saved["best_epoch"], saved["best_val_loss"], saved["epoch"]

    n_train = len(train_rows.x)
    epochs = tqdm(range(start_epoch + 1, config.num_epochs + 1), desc="estimator epochs",
                  initial=start_epoch, total=config.num_epochs)
    for epoch in epochs:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config, epoch)
        model.train()
        order = torch.randperm(n_train, generator=shuffle_rng).to(device)
        # One gather per epoch, then contiguous slices: cheaper than indexing every batch.
        x, y_z, y_ms, mask = (t[order] for t in (train_rows.x, train_rows.y_z, train_rows.y_ms, train_rows.mask))
        loss_sum = torch.zeros((), device=device)
        for start in range(0, n_train, config.batch_size):
            part = slice(start, start + config.batch_size)
            loss = _loss(model, config, x[part], y_z[part], y_ms[part], mask[part])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * (min(start + config.batch_size, n_train) - start)  # no per-step sync
        model.eval()
        val_loss, val_coverage = _loss_and_coverage(model, config, val_rows)
        if not (math.isfinite(float(loss_sum)) and math.isfinite(val_loss)):  # before a checkpoint keeps the weights
            raise TrainingDiverged(f"training diverged at epoch {epoch}: train_loss={float(loss_sum) / n_train}, "
                                   f"val_loss={val_loss} (lr={config.lr}, loss={config.loss}): try a lower lr")
        is_best = val_loss < best_val_loss
        if is_best:
            best_state = copy.deepcopy(model.state_dict())  # a copy, not a live view of the weights
            best_epoch, best_val_loss = epoch, val_loss
        val_metrics = _median_metrics(model, val_groups, "val_")
        record = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / n_train,
            "val_loss": val_loss,
            **_median_metrics(model, train_groups, "train_"),
            **val_metrics,
            "val_rel_error_mean": mean_over_components(val_metrics, "val_rel_error"),
            "val_p90_coverage": val_coverage,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - started,
            "is_best": int(is_best),
        }
        history.append(record)
        epochs.set_postfix(loss=f"{record['train_loss']:.4f}", val_loss=f"{val_loss:.4f}",
                           mae_prefill=f"{record['val_mae_prefill']:.2f}", mae_decode=f"{record['val_mae_decode']:.3f}")
        if checkpoint_dir is not None:
            if is_best:
                model.save(checkpoint_dir / "best.pt", {"epoch": epoch, "val_loss": val_loss})
            if epoch % 10 == 0:
                model.save(checkpoint_dir / f"epoch_{epoch:03d}.pt", {"epoch": epoch, "val_loss": val_loss})
            _atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "shuffle_rng": shuffle_rng.get_state(),
                "history": history, "best_state": best_state, "best_epoch": best_epoch, "best_val_loss": best_val_loss,
                "epoch": epoch, "config": asdict(config), "data_digest": data_digest,
            }, last_path)
        if on_epoch is not None:
            on_epoch(record)
    epochs.close()

    model.load_state_dict(best_state)
    model.meta["best_epoch"] = best_epoch
    model.meta["best_val_loss"] = best_val_loss
    return model.eval(), history


def best_epoch_metrics(model: LatencyEstimator, history: list[dict]) -> dict[str, float]:
    """best_epoch, best_val_loss and best_val_rel_error_mean of the weights `train_estimator` restored
    (the last epoch's figures when no epoch improved the val loss, e.g. a NaN loss throughout)."""
    best_epoch = int(model.meta.get("best_epoch", 0))
    best = next(r for r in history if r["epoch"] == best_epoch) if best_epoch else history[-1]
    return {"best_epoch": float(best_epoch), "best_val_loss": float(best["val_loss"]),
            "best_val_rel_error_mean": float(best["val_rel_error_mean"])}


def model_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The loadable models `train_estimator` wrote to `checkpoint_dir` (best.pt, epoch_NNN.pt), not
    the RESUME_STATE it keeps for an interrupted run."""
    return [p for p in sorted(Path(checkpoint_dir).glob("*.pt")) if p.name != RESUME_STATE]


__all__ = [
    "CHECKPOINT_FORMAT", "EstimatorConfig", "LatencyEstimator", "LOSSES", "LR_SCHEDULES", "RESUME_STATE", "TrainingDiverged",
    "TRAINING_RECORD_KEYS", "VALIDATION_RECORD_KEYS", "best_epoch_metrics", "check_device", "epoch_lr", "model_checkpoints",
    "resume_state", "split_digest", "train_estimator",
]
