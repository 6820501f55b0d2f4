"""The decision rule every learned controller shares, and the controller it belongs to.

A request arrives with its features (the `samples` frame's columns: text_tokens, crops_<tier>,
vision_tokens_<tier>, q_emb_*, gv_*) and a budget B in ms. The controller

  1. scores every config of the knob space by the heads' joint log-probability: the sum of the tier,
     top_k and blocks heads' log-probs (the heads are trained as independent marginals of the
     best-config label, so their sum ranks configs as the product of the marginals). The stage-1 net
     has the tier head alone: its configs are ranked by the tier's log-prob, and within the tier by
     the config's mean accuracy on the controller data (`prior_accuracy`);
  2. predicts every config's T_total at a calibrated upper quantile (`upper_latency_ms`): the
     estimator's P90 of T_total, times `latency_factor`;
  3. picks the most likely config whose calibrated latency fits B; if none fits, the config of lowest
     calibrated latency, with fits=False (the request is answered either way).
     Stage 1 with risk pricing (core.control.risk) ranks within its tier by the prior accuracy less a
     price per budget fraction times the config's probability of missing B: the controller spends an
     expected violation rate (`label_violation_target`) where it buys accuracy, the fit check still holds.
     A two-stage controller with a stage-2 net (stage 2 by GRPO, or the joint controller) ranks within
     the tier stage 1 picked by the stage-2 heads' log-probs for that tier instead of the prior.

Calibration (`calibrate_factor`). On the calibration part of the measured table, each measured
per-run T_total is divided by the estimator's P90 at the same (sample, config), computed exactly as at
decision time (with the predicted answer length); the `latency_quantile` (default 0.95,
`LATENCY_QUANTILE`) of those ratios is the factor. So "fits" means: in the calibration runs, 95% of
runs of a config came in under its corrected prediction. The adherence target (0.97 of all answers)
is an aggregate: the learned controllers reach it by where they spend the remaining risk (the priced
labels of core.control.risk, GRPO's constrained reward), and a 0.97 floor per config leaves them
nothing to spend (held-out AUC of the supervised controller 0.537 at 0.97, 0.587 at 0.95). The factor absorbs the estimator's bias, the run-to-run spread, drift between the
estimator's table and this machine, and answer-length errors.

Answer length. T_total includes decode, one forward per answer token after the first, and the answer
is not known before it is generated. `OutputLengthModel` predicts it from the question features alone
(a ridge regression onto each training sample's 90th-percentile answer length over the 75 configs,
rounded to the nearest token, at least 1): answer length is a property of the question type (a colour
is one word, a sign two), which the question embedding carries, while its variation across configs
(a wrong answer of another length) is small and left to the calibration factor. A length head on the
controller net would learn the same thing with more parameters and a coupling to the knob training.

The rule is vectorised over requests: one estimator pass over the distinct (text_tokens, crops per
tier, predicted length) combinations of a batch, one net forward, then array operations.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from core.control.policies import ControllerConfig, ControllerNet, StackedNumpyForward, build_net
from core.control.risk import FitModel, ViolationPrices, priced_choice
from core.knobs import KNOBS, TIERS
from core.latency.estimator import LatencyEstimator

CHECKPOINT_FORMAT = "budget-controller/1"
CONTROLLER_FILE, ESTIMATOR_FILE = "controller.pt", "estimator.pt"
CONTROLLER_KINDS = ("supervised", "two_stage", "grpo", "joint")
LATENCY_QUANTILE = 0.95  # the fit check's quantile of measured / predicted T_total on the calibration runs (module doc)
QUESTION_PREFIX, GLOBAL_VIEW_PREFIX = "q_emb_", "gv_"
_NUMPY_MAX_REQUESTS = 64  # below this the net runs in numpy (torch's per-op dispatch dominates small batches)
_LATENCY_CACHE_SIZE = 4096  # distinct request sizes kept for single-request decisions
_TIE_DECIMALS = 9  # mean accuracies that differ below this are a tie (then the faster config wins)


class ControllerError(ValueError):
    """Bad input to a controller (one line naming the field or file)."""


# --- the request features ------------------------------------------------------------------------
def feature_columns(frame: pd.DataFrame, prefix: str) -> list[str]:
    """The columns `<prefix>0`, `<prefix>1`, ... of `frame`, in index order."""
    columns = [c for c in frame.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(columns, key=lambda c: int(c[len(prefix):]))


def request_columns() -> list[str]:
    """The request-size columns the latency prediction reads from a samples frame."""
    return ["text_tokens", *(f"crops_{t}" for t in TIERS), *(f"vision_tokens_{t}" for t in TIERS)]


def check_requests(frame: pd.DataFrame, source: str, question_dim: int, global_view_dim: int) -> None:
    """ControllerError (one line naming `source` and the field) unless `frame` has every column a decision reads."""
    missing = [c for c in request_columns() if c not in frame.columns]
    if missing:
        raise ControllerError(f"{source}: field {missing[0]} missing")
    for prefix, dim in ((QUESTION_PREFIX, question_dim), (GLOBAL_VIEW_PREFIX, global_view_dim)):
        if dim and len(feature_columns(frame, prefix)) != dim:
            raise ControllerError(f"{source}: {len(feature_columns(frame, prefix))} {prefix}* features, the controller "
                                  f"was trained on {dim}")


# --- the configs --------------------------------------------------------------------------------
def _options_key(options: dict[str, list]) -> tuple:
    return tuple((k, tuple(options[k])) for k in KNOBS)


@functools.lru_cache(maxsize=16)
def _grid_arrays(key: tuple) -> dict[str, np.ndarray]:
    """The grid of an options key as read-only arrays (built once: the decision path reads them per call)."""
    options = dict(key)
    rows = list(product(options["tier"], options["top_k"], options["num_active_blocks"]))
    arrays = {"tier": np.array([r[0] for r in rows], dtype=object), "top_k": np.array([r[1] for r in rows]),
              "num_active_blocks": np.array([r[2] for r in rows]),
              "tier_index": np.array([TIERS.index(r[0]) for r in rows])}
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def grid_arrays(options: dict[str, list]) -> dict[str, np.ndarray]:
    """{tier, top_k, num_active_blocks, tier_index: (configs,) array}, tier-major as KnobSpace.grid()."""
    return _grid_arrays(_options_key(options))


def config_grid(options: dict[str, list]) -> pd.DataFrame:
    """Every config, tier-major as KnobSpace.grid(): columns tier, top_k, num_active_blocks, tier_index."""
    return pd.DataFrame({k: v.copy() for k, v in grid_arrays(options).items()})


def check_space(options: dict[str, list], table: pd.DataFrame, source: str,
                owner: str = "the controller was trained on the knob space") -> None:
    """ControllerError (one line) when the knob options of `table` are not `options` (`owner`'s)."""
    for knob in KNOBS:
        present = sorted(pd.unique(table[knob]).tolist(), key=lambda v: (TIERS.index(v) if knob == "tier" else v))
        if [str(v) for v in present] != [str(v) for v in options[knob]]:
            raise ControllerError(f"{source}: field {knob} has options {present}, {owner} with {list(options[knob])}")


# --- answer length -----------------------------------------------------------------------------
@dataclass
class OutputLengthModel:
    """Ridge regression of the answer length (tokens) on standardised question features (module doc)."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # (d + 1,), the last one the intercept
    max_tokens: int

    def predict(self, question: np.ndarray) -> np.ndarray:
        """(N, d) question features -> (N,) int64 predicted answer lengths in [1, max_tokens]."""
        folded = self.__dict__.get("_folded")
        if folded is None:  # the scaling folded into the weights: one product per call on the request path
            slope = self.weights[:-1] / self.std
            folded = self.__dict__["_folded"] = (slope, float(self.weights[-1] - self.mean @ slope))
        raw = np.asarray(question, dtype=np.float64) @ folded[0] + folded[1]
        return np.clip(np.rint(raw), 1, self.max_tokens).astype(np.int64)

    def predict_one(self, question: np.ndarray) -> int:
        """`predict` for one request's (1, d) or (d,) features, with one numpy call (the request path's)."""
        if "_folded" not in self.__dict__:
            self.predict(np.zeros((1, len(self.mean))))
        slope, intercept = self.__dict__["_folded"]
        raw = float(np.dot(np.ravel(question), slope)) + intercept
        return int(min(max(round(raw), 1), self.max_tokens))  # round: half to even, as np.rint

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, values: dict) -> "OutputLengthModel":
        return cls(np.asarray(values["mean"]), np.asarray(values["std"]), np.asarray(values["weights"]),
                   int(values["max_tokens"]))


def fit_output_length(question: np.ndarray, output_tokens: np.ndarray, ridge: float = 1.0) -> OutputLengthModel:
    """Fit on (N, d) question features of training samples and (N,) their target lengths (>= 1)."""
    x = np.asarray(question, dtype=np.float64)
    y = np.asarray(output_tokens, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    design = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    penalty = ridge * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    weights = np.linalg.solve(design.T @ design + penalty, design.T @ y)
    return OutputLengthModel(mean, std, weights, int(max(1, y.max())))


def length_targets(grid: pd.DataFrame, sample_ids: Sequence[str], quantile: float = 0.9) -> np.ndarray:
    """Per sample (in `sample_ids` order), the `quantile` of its answer lengths over the grid's configs."""
    per_sample = grid.astype({"sample_id": str}).groupby("sample_id")["output_tokens"].quantile(quantile)
    return per_sample.reindex([str(s) for s in sample_ids]).to_numpy(dtype=np.float64)


# --- latency ----------------------------------------------------------------------------------
def predicted_latency_ms(estimator: LatencyEstimator, requests: pd.DataFrame, output_tokens: np.ndarray,
                         options: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
    """(point, P90) T_total in ms, each (N requests, configs), for answers of `output_tokens` (N,)."""
    sizes = requests[request_columns()].to_numpy(dtype=np.float64)
    return latency_from_sizes(estimator, sizes, output_tokens, options)


def latency_from_sizes(estimator: LatencyEstimator, sizes: np.ndarray, output_tokens: np.ndarray,
                       options: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
    """`predicted_latency_ms` from (N, 7) request sizes in `request_columns()` order.

    The estimator runs once per distinct (text_tokens, crops and vision tokens per tier, length):
    requests that share them share the prediction exactly.
    """
    grid = grid_arrays(options)
    keys = np.column_stack([sizes, np.asarray(output_tokens, np.float64)])
    if len(keys) == 1:
        unique, inverse = keys, np.zeros(1, dtype=np.int64)
    else:
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
    tier_index = grid["tier_index"]
    n_configs, n_tiers = len(tier_index), len(TIERS)
    crops = unique[:, 1:1 + n_tiers][:, tier_index]  # (U, configs)
    vision = unique[:, 1 + n_tiers:1 + 2 * n_tiers][:, tier_index]
    raw = np.column_stack([  # RAW_COLUMNS order: vision_tokens, text_tokens, crops, tier, top_k, blocks
        vision.reshape(-1), np.repeat(unique[:, 0], n_configs), crops.reshape(-1), np.tile(tier_index, len(unique)),
        np.tile(grid["top_k"].astype(np.float64), len(unique)),
        np.tile(grid["num_active_blocks"].astype(np.float64), len(unique))])
    out = estimator.predict_array(raw).reshape(len(unique), n_configs, 6)
    steps = np.maximum(unique[:, -1] - 1, 0)[:, None]
    return total_from_stages(out[..., :3], steps)[inverse], total_from_stages(out[..., 3:], steps)[inverse]


def total_from_stages(stages_ms: np.ndarray, decode_steps: np.ndarray | int) -> np.ndarray:
    """(..., 3) vision, prefill and one decode step's ms -> (...) T_total of an answer of `decode_steps`
    forwards after the first token (broadcast against the leading axes)."""
    return stages_ms[..., 0] + stages_ms[..., 1] + decode_steps * stages_ms[..., 2]


def calibration_ratios(upper_ms: np.ndarray, sample_ids: Sequence[str], options: dict[str, list],
                       runs: pd.DataFrame) -> np.ndarray:
    """Measured per-run T_total_ms of `runs` (a measured table) over the uncalibrated prediction
    `upper_ms` (N samples in `sample_ids` order, configs) at the same (sample, config)."""
    grid = config_grid(options).reset_index().rename(columns={"index": "config_index"})
    index_of = {str(s): i for i, s in enumerate(sample_ids)}
    rows = runs.merge(grid[["config_index", *KNOBS]], on=list(KNOBS), how="inner")
    sample_index = rows["sample_id"].astype(str).map(index_of)
    if sample_index.isna().any():
        raise ControllerError(f"calibration table: sample {rows['sample_id'][sample_index.isna()].iloc[0]} has no features")
    predicted = upper_ms[sample_index.to_numpy(dtype=np.int64), rows["config_index"].to_numpy()]
    return rows["T_total_ms"].to_numpy(dtype=np.float64) / predicted


def calibrate_factor(ratios: np.ndarray, quantile: float) -> float:
    """The `quantile` of measured / predicted ratios: the factor the prediction is multiplied by."""
    if not 0 < quantile < 1:
        raise ControllerError(f"parameter latency_quantile must lie in (0, 1), got {quantile}")
    if len(ratios) == 0:
        raise ControllerError("calibration table: no measured run matches a config of the controller's knob space")
    return float(np.quantile(ratios, quantile))


# --- the rule --------------------------------------------------------------------------------
def joint_log_prob(log_probs: dict[str, np.ndarray]) -> np.ndarray:
    """{knob: (N, options) log-probs} of the three heads -> (N, configs) their sum, tier-major grid order."""
    tier, top_k, blocks = (log_probs[k] for k in KNOBS)
    joint = tier[:, :, None, None] + top_k[:, None, :, None] + blocks[:, None, None, :]
    return joint.reshape(len(tier), -1)


def choose(score: np.ndarray, upper_ms: np.ndarray, budget_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The config index of the highest `score` (N, configs) among those with upper_ms <= budget_ms, else
    of the lowest upper_ms; and whether one fitted. (indices (N,), fits (N,) bool)."""
    if len(score) == 1:  # one request (the live path): the same rule in fewer numpy calls
        masked = np.where(upper_ms[0] <= float(np.asarray(budget_ms).reshape(-1)[0]), score[0], -np.inf)
        best = int(masked.argmax())
        fits = bool(masked[best] > -np.inf)
        return np.array([best if fits else int(upper_ms[0].argmin())]), np.array([fits])
    fitting = upper_ms <= np.asarray(budget_ms, dtype=np.float64)[:, None]
    fits = fitting.any(axis=1)
    best_fitting = np.argmax(np.where(fitting, score, -np.inf), axis=1)
    return np.where(fits, best_fitting, np.argmin(upper_ms, axis=1)), fits


def pick_tier(tier_log_prob: np.ndarray, fitting: np.ndarray, tier_index: np.ndarray) -> np.ndarray:
    """Per row, the most likely tier that has a fitting config (rows where none fits: any)."""
    tier_fits = np.stack([fitting[:, tier_index == t].any(axis=1) for t in range(tier_log_prob.shape[1])], axis=1)
    return np.argmax(np.where(tier_fits, tier_log_prob, -np.inf), axis=1)


def choose_two_stage(tier_log_prob: np.ndarray, top_k_log_prob: np.ndarray, blocks_log_prob: np.ndarray,
                     upper_ms: np.ndarray, budget_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 + 2's rule: the most likely tier that has a fitting config, then within it the fitting
    config of highest stage-2 log-prob (top_k and blocks heads of that tier, (N, tiers, options) each).
    Falls back like `choose`."""
    n, n_tiers, n_k = top_k_log_prob.shape
    n_b = blocks_log_prob.shape[2]
    if n == 1:  # one request (the live path): the same rule in fewer numpy calls, on the tier-major grid
        fitting = (upper_ms[0] <= float(np.asarray(budget_ms).reshape(-1)[0])).reshape(n_tiers, n_k * n_b)
        tier_fits = fitting.any(axis=1)
        if not tier_fits.any():
            return np.array([int(upper_ms[0].argmin())]), np.array([False])
        tier = int(np.where(tier_fits, tier_log_prob[0], -np.inf).argmax())
        score = np.add.outer(top_k_log_prob[0, tier], blocks_log_prob[0, tier]).reshape(-1)
        return np.array([tier * n_k * n_b + int(np.where(fitting[tier], score, -np.inf).argmax())]), np.array([True])
    tier_index = np.repeat(np.arange(n_tiers), n_k * n_b)
    fitting = upper_ms <= np.asarray(budget_ms, dtype=np.float64)[:, None]
    tier = pick_tier(tier_log_prob, fitting, tier_index)
    score = (top_k_log_prob[:, :, :, None] + blocks_log_prob[:, :, None, :]).reshape(n, -1)
    in_tier = fitting & (tier_index[None, :] == tier[:, None])
    fits = fitting.any(axis=1)
    return np.where(fits, np.argmax(np.where(in_tier, score, -np.inf), axis=1), np.argmin(upper_ms, axis=1)), fits


def choose_tier_then_prior(tier_log_prob: np.ndarray, prior_accuracy: np.ndarray, tier_index: np.ndarray,
                           upper_ms: np.ndarray, budget_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1's rule: the most likely tier that has a fitting config, then within it the fitting config
    of highest `prior_accuracy` (ties to the faster). Falls back like `choose`."""
    fitting = upper_ms <= np.asarray(budget_ms, dtype=np.float64)[:, None]
    tier = pick_tier(tier_log_prob, fitting, tier_index)
    # Accuracies rounded to _TIE_DECIMALS dominate; the latency term (< 1e-10) only breaks their ties.
    key = np.round(prior_accuracy, _TIE_DECIMALS)[None, :] - upper_ms * 1e-12
    in_tier = fitting & (tier_index[None, :] == tier[:, None])
    fits = fitting.any(axis=1)
    return np.where(fits, np.argmax(np.where(in_tier, key, -np.inf), axis=1), np.argmin(upper_ms, axis=1)), fits


def choose_tier_then_priced(tier_log_prob: np.ndarray, prior_accuracy: np.ndarray, tier_index: np.ndarray,
                            upper_ms: np.ndarray, budget_ms: np.ndarray, fit: FitModel,
                            price: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1's rule with risk pricing: the most likely tier that has a fitting config, then within it the
    fitting config of highest prior accuracy - price x P(violation) (core.control.risk). Falls back like `choose`."""
    fitting = upper_ms <= np.asarray(budget_ms, dtype=np.float64)[:, None]
    tier = pick_tier(tier_log_prob, fitting, tier_index)
    value = np.broadcast_to(prior_accuracy, upper_ms.shape)
    index, fits, _ = priced_choice(value, upper_ms, budget_ms, fit, price, allowed=tier_index[None, :] == tier[:, None])
    return index, fits


@dataclass
class LearnedController:
    """A trained net with everything its decision rule needs (module doc); `decide` is the whole API."""

    net: ControllerNet
    kind: str  # CONTROLLER_KINDS
    space_name: str
    l_full_ms: float  # the L_full its budget fractions were normalised by
    estimator: LatencyEstimator
    latency_factor: float
    latency_quantile: float
    output_length: OutputLengthModel
    prior_accuracy: np.ndarray  # (configs,) mean accuracy per config on the controller data
    stage2: ControllerNet | None = None  # a two-stage controller's per-tier top_k / blocks net, if trained
    # The risk pricing of core.control.risk (None: every fitting config is as good as any other): stage 1's
    # choice within its tier is the prior accuracy less the price of the violation risk
    fit: FitModel | None = None
    prices: ViolationPrices | None = None

    @property
    def options(self) -> dict[str, list]:
        return self.net.config.options

    def check(self, requests: pd.DataFrame, source: str = "requests") -> None:
        c = self.net.config
        check_requests(requests, source, c.question_dim, c.global_view_dim if self.net.uses_global_view else 0)

    def _columns(self, requests: pd.DataFrame) -> tuple[list[str], list[str]]:
        """The q_emb_* and (if used) gv_* columns of a frame, cached per column layout."""
        key = tuple(requests.columns)
        cache = self.__dict__.setdefault("_column_cache", {})
        if key not in cache:
            cache[key] = (feature_columns(requests, QUESTION_PREFIX),
                          feature_columns(requests, GLOBAL_VIEW_PREFIX) if self.net.uses_global_view else [])
        return cache[key]

    def question(self, requests: pd.DataFrame) -> np.ndarray:
        return requests[self._columns(requests)[0]].to_numpy(dtype=np.float32)

    def uncalibrated_upper_ms(self, requests: pd.DataFrame) -> np.ndarray:
        """(N, configs) the estimator's P90 of T_total at the predicted answer length."""
        lengths = self.output_length.predict(self.question(requests))
        return predicted_latency_ms(self.estimator, requests, lengths, self.options)[1]

    def upper_latency_ms(self, requests: pd.DataFrame) -> np.ndarray:
        """(N, configs) the calibrated upper-quantile T_total the fit check uses."""
        return self.uncalibrated_upper_ms(requests) * self.latency_factor

    def log_probs(self, requests: pd.DataFrame, budget_ms: np.ndarray) -> dict[str, np.ndarray]:
        """{knob: (N, options) log-probs} of the net's heads for `requests` at `budget_ms` (N,); with a
        stage-2 net, its top_k and blocks heads as (N, tiers, options)."""
        q_columns, gv_columns = self._columns(requests)
        gv = requests[gv_columns].to_numpy(np.float32) if gv_columns else None
        return self.head_log_probs(requests[q_columns].to_numpy(np.float32), gv, budget_ms)

    def head_log_probs(self, question: np.ndarray, gv: np.ndarray | None, budget_ms: np.ndarray,
                       normalise: bool = True) -> dict[str, np.ndarray]:
        """`log_probs` on arrays: (N, q) question, (N, g) global-view features (None if unused), (N,) budgets.
        `normalise=False` returns the logits: the rule ranks configs by sums of one option per head, within
        a tier for stage 2, so a head's normaliser shifts every candidate alike and the pick is the same
        (the request path skips it: a few numpy calls fewer)."""
        fraction = np.asarray(budget_ms, dtype=np.float32) / self.l_full_ms
        if self.stage2 is not None and len(question) == 1:  # one request: both nets in one chain of calls
            stacked = self.__dict__.get("_stacked")
            if stacked is None or not stacked.current():
                for net in (self.net, self.stage2):
                    if net.training:
                        net.eval()
                stacked = self.__dict__["_stacked"] = StackedNumpyForward([self.net, self.stage2])
            first, second = stacked(fraction, question, gv)
            return {**_log_probs_from_logits(self.net, first, normalise), **_log_probs_from_logits(self.stage2, second, normalise)}
        out = _net_log_probs(self.net, question, gv, fraction, normalise)
        if self.stage2 is not None:
            out.update(_net_log_probs(self.stage2, question, gv, fraction, normalise))
        return out

    def _uncalibrated_upper(self, sizes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The estimator's P90 per config; a single request's is cached by its sizes and length (the
        estimator is deterministic: a repeated size is an exact hit)."""
        if len(sizes) != 1:
            return latency_from_sizes(self.estimator, sizes, lengths, self.options)[1]
        cache = self.__dict__.setdefault("_latency_cache", {})
        key = np.append(sizes[0], lengths[0]).astype(np.float64).tobytes()
        if key not in cache:
            if len(cache) >= _LATENCY_CACHE_SIZE:
                cache.clear()
            cache[key] = latency_from_sizes(self.estimator, sizes, lengths, self.options)[1]
        return cache[key]

    def choose(self, log_probs: dict[str, np.ndarray], upper_ms: np.ndarray, budget_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rule on precomputed heads and latencies: (config indices (N,), fits (N,))."""
        if "tier" in log_probs and log_probs.get("top_k", np.zeros((0, 0))).ndim == 3:
            return choose_two_stage(log_probs["tier"], log_probs["top_k"], log_probs["num_active_blocks"], upper_ms, budget_ms)
        if tuple(log_probs) == ("tier",):
            tier_index = grid_arrays(self.options)["tier_index"]
            if self.prices is not None and self.fit is not None:
                return choose_tier_then_priced(log_probs["tier"], self.prior_accuracy, tier_index, upper_ms, budget_ms,
                                               self.fit, self.prices.at(np.asarray(budget_ms) / self.l_full_ms))
            return choose_tier_then_prior(log_probs["tier"], self.prior_accuracy, tier_index, upper_ms, budget_ms)
        return choose(joint_log_prob(log_probs), upper_ms, budget_ms)

    def decide(self, requests: pd.DataFrame, budget_ms: np.ndarray | float) -> pd.DataFrame:
        """`requests` (the samples frame's columns) and budgets in ms (scalar or (N,)) -> one row per
        request: tier, top_k, num_active_blocks, fits, T_total_upper_ms (calibrated), in request order."""
        budget = np.broadcast_to(np.asarray(budget_ms, dtype=np.float64), (len(requests),))
        if not np.isfinite(budget).all() or (budget <= 0).any():
            raise ControllerError("field budget_ms must be a finite number > 0")
        # Every column is read once: pandas selections cost more than the arithmetic for small batches.
        q_columns, gv_columns = self._columns(requests)
        index, fits, upper = self.decide_arrays(
            requests[q_columns].to_numpy(np.float32), requests[gv_columns].to_numpy(np.float32) if gv_columns else None,
            requests[request_columns()].to_numpy(np.float64), budget)
        grid = grid_arrays(self.options)
        return pd.DataFrame({"tier": grid["tier"][index], "top_k": grid["top_k"][index],
                             "num_active_blocks": grid["num_active_blocks"][index], "fits": fits, "T_total_upper_ms": upper})

    def decide_arrays(self, question: np.ndarray, global_view: np.ndarray | None, sizes: np.ndarray,
                      budget_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`decide` on arrays: (N, q) question and (N, g) global-view features (None if unused), (N, 7) sizes in
        `request_columns()` order, (N,) budgets -> (config indices into the grid, fits, calibrated T_total of
        the pick). The per-request path of a server that keeps features as arrays."""
        upper = self._uncalibrated_upper(sizes, self.output_length.predict(question)) * self.latency_factor
        index, fits = self.choose(self.head_log_probs(question, global_view, budget_ms, normalise=False), upper, budget_ms)
        return index, fits, upper[np.arange(len(index)), index]

    # persistence ---------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """CONTROLLER_FILE (net, scalers, rule parameters) and ESTIMATOR_FILE in `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({
            "format": CHECKPOINT_FORMAT, "kind": self.kind, "space_name": self.space_name,
            "config": self.net.config.as_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            **({} if self.stage2 is None else {
                "stage2_config": self.stage2.config.as_dict(),
                "stage2_state_dict": {k: v.detach().cpu().clone() for k, v in self.stage2.state_dict().items()}}),
            # JSON text: torch's weights_only loader takes plain containers, numpy arrays it does not
            "rule": json.dumps({"l_full_ms": self.l_full_ms, "latency_factor": self.latency_factor,
                                "latency_quantile": self.latency_quantile, "output_length": self.output_length.as_dict(),
                                "prior_accuracy": np.asarray(self.prior_accuracy).tolist(),
                                "fit_ratios": None if self.fit is None else self.fit.as_list(),
                                "violation_prices": None if self.prices is None else self.prices.as_dict()}),
        }, directory / CONTROLLER_FILE)
        self.estimator.save(directory / ESTIMATOR_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "LearnedController":
        """A controller saved by `save`; ControllerError naming the file for a missing or foreign one."""
        path = Path(directory) / CONTROLLER_FILE
        if not path.is_file():
            raise ControllerError(f"controller checkpoint {path} does not exist")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ControllerError(f"controller checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
        net = build_net(ControllerConfig.from_dict(saved["config"]))
        net.load_state_dict(saved["state_dict"])
        stage2 = None
        if "stage2_config" in saved:
            stage2 = build_net(ControllerConfig.from_dict(saved["stage2_config"]))
            stage2.load_state_dict(saved["stage2_state_dict"])
            stage2.eval()
        rule = json.loads(saved["rule"])
        return cls(net.eval(), saved["kind"], saved["space_name"], float(rule["l_full_ms"]),
                   LatencyEstimator.load(Path(directory) / ESTIMATOR_FILE), float(rule["latency_factor"]),
                   float(rule["latency_quantile"]), OutputLengthModel.from_dict(rule["output_length"]),
                   np.asarray(rule["prior_accuracy"], dtype=np.float64), stage2,
                   None if rule.get("fit_ratios") is None else FitModel(np.asarray(rule["fit_ratios"], np.float64)),
                   None if rule.get("violation_prices") is None else ViolationPrices.from_dict(rule["violation_prices"]))


def describe_rule(controller: LearnedController) -> dict[str, object]:
    """The decision rule's parameters as flat params to log."""
    return {"latency_quantile": controller.latency_quantile, "latency_factor": round(controller.latency_factor, 6),
            "latency_base": "estimator P90 of T_total at the predicted answer length",
            "l_full_ms": round(controller.l_full_ms, 6), "controller_kind": controller.kind,
            "rule_violation_target": controller.prices.target if controller.prices is not None else "none (fit check only)",
            "rule": ("tier log-prob, then stage-2 log-prob within the tier" if controller.stage2 is not None
                     else "tier log-prob, then prior accuracy less the priced violation risk"
                     if tuple(controller.net.config.heads) == ("tier",) and controller.prices is not None
                     else "tier log-prob, then prior accuracy" if tuple(controller.net.config.heads) == ("tier",)
                     else "joint log-prob (sum of heads)")}


@torch.inference_mode()
def _net_log_probs(net: ControllerNet, question: np.ndarray, gv: np.ndarray | None,
                   fraction: np.ndarray, normalise: bool = True) -> dict[str, np.ndarray]:
    """{head: log-probs} of one net in eval mode: (N, options), or (N, tiers, options) for per-tier heads."""
    if net.training:  # eval() walks every module: 10-20 us a call on the per-request path
        net.eval()
    if len(question) <= _NUMPY_MAX_REQUESTS:
        logits = net.forward_numpy(fraction, np.hstack([question, gv]) if net.uses_global_view else question)
    else:
        logits = {k: v.numpy() for k, v in net(torch.as_tensor(fraction), net.inputs(question, gv)).items()}
    return _log_probs_from_logits(net, logits, normalise)


def _log_probs_from_logits(net: ControllerNet, logits: dict[str, np.ndarray], normalise: bool) -> dict[str, np.ndarray]:
    """A net's head outputs as the rule reads them: per-tier heads as (N, tiers, options); log-probs, or
    with `normalise=False` the float32 logits (the rule only ranks sums of them)."""
    if net.config.per_tier:
        logits = {k: v.reshape(len(v), len(TIERS), -1) for k, v in logits.items()}
    if not normalise:
        return logits
    return {k: (v - np.logaddexp.reduce(v, axis=-1, keepdims=True)).astype(np.float64) for k, v in logits.items()}
