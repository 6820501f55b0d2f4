"""Supervised training of the controllers: the supervised controller (three heads) and stage 1 of the
two-stage controller (the tier head alone), on the controller data.

One straight line:
  controller data (`samples`, `grid`) + measured table's calibration part + latency estimator
  -> `fit_rule`: the answer-length model (train samples) and the latency factor (calibration part)
  -> `controller_arrays`: per sample, every config's accuracy, predicted median and calibrated upper T_total
  -> `train_controller`: labels per (sample, budget f ~ U[0.4, 1.1], drawn anew every epoch; fixed and
     seeded for validation) = the most accurate config on that sample whose calibrated upper latency
     fits B = f x L_full (ties to the faster; none fits: the fastest); cross-entropy on each head's
     knob of the label; the weights of the epoch with the lowest validation loss are kept
  -> a `core.control.decision.LearnedController`.

Per-epoch metrics (train_ and val_), the monitoring guide's names first:
  loss                       mean cross-entropy over the heads' knobs
  accuracy_mean              grid accuracy of the config the controller picks (decision rule, latency check on)
  latency_mean               its predicted (estimator median) T_total_ms
  budget_violation_rate      share of picks whose calibrated upper latency exceeds B
  expected_violation_rate    mean P(measured T_total > B) of the picks (the rule's fit model, core.control.risk)
  unguarded_accuracy_mean, unguarded_budget_violation_rate
                             the same for the heads' own most likely config without the latency check:
                             did the net learn the budget, or does the check do the work?
  label_accuracy_all, label_accuracy_<knob>
                             the seed's knob-label accuracies (secondary figures)
  label_accuracy_mean        grid accuracy of the labels themselves (what a perfect net would reach)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from core.control.budgets import TRAIN_FRACTION_RANGE
from core.control.decision import (
    GLOBAL_VIEW_PREFIX,
    QUESTION_PREFIX,
    ControllerError,
    LearnedController,
    OutputLengthModel,
    calibrate_factor,
    calibration_ratios,
    check_requests,
    choose,
    choose_tier_then_prior,
    config_grid,
    feature_columns,
    fit_output_length,
    joint_log_prob,
    length_targets,
    predicted_latency_ms,
)
from core.control.policies import ControllerConfig, build_net
from core.control.risk import FitModel, ViolationPrices, price_violations, priced_choice
from core.knobs import KNOBS
from core.latency.estimator import LatencyEstimator, check_device
from core.vqa.sample import dataset_of

STAGES = {"supervised": KNOBS, "stage1": ("tier",)}
METRIC_NAMES: tuple[str, ...] = (
    "loss", "accuracy_mean", "latency_mean", "budget_violation_rate", "expected_violation_rate", "unguarded_accuracy_mean",
    "unguarded_budget_violation_rate", "label_accuracy_all", *(f"label_accuracy_{k}" for k in KNOBS), "label_accuracy_mean")
TRAINING_RECORD_KEYS: tuple[str, ...] = tuple(f"train_{m}" for m in METRIC_NAMES) + ("lr", "epoch_time_s")
VALIDATION_RECORD_KEYS: tuple[str, ...] = tuple(f"val_{m}" for m in METRIC_NAMES) + ("is_best",)


@dataclass
class TrainingConfig:
    """Every training hyper-parameter with its default (the trainers' -P defaults read them from here)."""

    batch_size: int = 64
    num_epochs: int = 50
    lr: float = 1e-4  # Adam
    weight_decay: float = 0.0
    train_split: float = 0.8  # share of the controller data's samples for training; the rest validates
    seed: int = 42  # of the split, the budgets drawn, the initial weights and the batch order
    device: str = "cpu"
    budgets_per_sample: int = 4  # budgets drawn per training sample and epoch
    hidden_width: int = 128
    depth: int = 2
    dropout: float = 0.1
    use_global_view: bool = True
    stage: str = "supervised"  # supervised: three heads; stage1: the tier head alone
    # Weight of the sample's data set's mean accuracy (training samples) in the accuracy the label maximises;
    # the rest is the sample's own. 0 is the seed's label, which follows per-sample luck: among configs that
    # happen to answer a sample right, ties go to the cheapest, so labels drift to configs that are right
    # less often (`label_accuracy` below).
    # 0.5: val accuracy 0.584 as at 1 (0: 0.533), and a label that still follows what tells samples of one
    # data set apart (at 1 it cannot)
    label_prior_weight: float = 0.5
    # The expected share of budget violations the labels (and stage 1's choice within its tier) may spend where
    # they buy accuracy (core.control.risk); 0: none, every label is the most accurate config passing the fit
    # check. 0.02 leaves a point of the 0.97 adherence target for the held-out spread.
    label_violation_target: float = 0.02
    num_threads: int | None = 1  # torch threads while training (batches of 64 are dispatch-bound)

    def validate(self) -> "TrainingConfig":
        for name in ("batch_size", "num_epochs", "budgets_per_sample", "hidden_width", "depth"):
            if int(getattr(self, name)) < 1:
                raise ControllerError(f"parameter {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ControllerError(f"parameter lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.train_split < 1:
            raise ControllerError(f"parameter train_split must lie in (0, 1), got {self.train_split}")
        if not 0 <= self.dropout < 1:
            raise ControllerError(f"parameter dropout must lie in [0, 1), got {self.dropout}")
        if not 0 <= self.label_prior_weight <= 1:
            raise ControllerError(f"parameter label_prior_weight must lie in [0, 1], got {self.label_prior_weight}")
        if not 0 <= self.label_violation_target < 1:
            raise ControllerError(f"parameter label_violation_target must lie in [0, 1), got {self.label_violation_target}")
        if self.stage not in STAGES:
            raise ControllerError(f"parameter stage must be one of {list(STAGES)}, got {self.stage!r}")
        check_device(self.device)
        return self


@dataclass
class ControllerArrays:
    """The controller data as arrays, one row per sample, one column per config (tier-major grid order)."""

    sample_ids: list[str]
    question: np.ndarray  # (N, q)
    global_view: np.ndarray  # (N, g), g may be 0
    accuracy: np.ndarray  # (N, C)
    latency_ms: np.ndarray  # (N, C) estimator median T_total
    upper_ms: np.ndarray  # (N, C) calibrated upper-quantile T_total (what labels and the rule check)

    def take(self, rows: np.ndarray) -> "ControllerArrays":
        return ControllerArrays([self.sample_ids[i] for i in rows], self.question[rows], self.global_view[rows],
                                self.accuracy[rows], self.latency_ms[rows], self.upper_ms[rows])


@dataclass
class Rule:
    """What the decision rule learns besides the net: the answer-length model and the latency factor."""

    output_length: OutputLengthModel
    latency_factor: float
    latency_quantile: float
    calibration_runs: int
    # measured per-run T_total / the estimator's median at the same (sample, config), calibration runs:
    # the spread GRPO's replay rollouts draw their noise from
    median_ratios: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # P(measured <= B) of a config from its calibrated upper latency (core.control.risk)
    fit: FitModel | None = None


def split_samples(sample_ids: Sequence[str], train_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val) of a seeded split by sample; each side keeps at least one sample."""
    n = len(sample_ids)
    if n < 2:
        raise ControllerError(f"controller data: {n} sample; a train/val split needs >= 2")
    order = np.random.default_rng(seed).permutation(n)
    n_train = min(max(1, round(train_split * n)), n - 1)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def fit_rule(samples: pd.DataFrame, grid: pd.DataFrame, train_rows: np.ndarray, features: pd.DataFrame,
             calibration: pd.DataFrame, estimator: LatencyEstimator, options: dict[str, list],
             latency_quantile: float) -> Rule:
    """The answer-length model on the training samples' answer lengths, then the latency factor from the
    calibration runs (`calibration`, a measured table) and their samples' `features` (same columns as
    `samples`), the estimator's P90 computed at the predicted length as at decision time."""
    train = samples.iloc[train_rows]
    question = train[feature_columns(train, QUESTION_PREFIX)].to_numpy(np.float64)
    length = fit_output_length(question, length_targets(grid, train["sample_id"].astype(str).tolist()))
    ids = calibration["sample_id"].astype(str).unique().tolist()
    known = features.assign(sample_id=features["sample_id"].astype(str)).drop_duplicates("sample_id").set_index("sample_id")
    absent = [s for s in ids if s not in known.index]
    if absent:
        raise ControllerError(f"calibration table: sample {absent[0]} has no features")
    requests = known.loc[ids].reset_index()
    lengths = length.predict(requests[feature_columns(requests, QUESTION_PREFIX)].to_numpy(np.float64))
    point, upper = predicted_latency_ms(estimator, requests, lengths, options)
    ratios = calibration_ratios(upper, ids, options, calibration)
    factor = calibrate_factor(ratios, latency_quantile)
    return Rule(length, factor, latency_quantile, len(ratios), calibration_ratios(point, ids, options, calibration),
                FitModel.from_ratios(ratios / factor))


def controller_arrays(samples: pd.DataFrame, grid: pd.DataFrame, estimator: LatencyEstimator, rule: Rule,
                      options: dict[str, list], use_global_view: bool = True) -> ControllerArrays:
    """Accuracy per (sample, config) from `grid`; latency from the estimator at the rule's predicted
    answer length (median, and P90 x the rule's factor). ControllerError for a sample lacking a config."""
    q_columns, g_columns = feature_columns(samples, QUESTION_PREFIX), feature_columns(samples, GLOBAL_VIEW_PREFIX)
    check_requests(samples, "controller data samples", len(q_columns), len(g_columns) if use_global_view else 0)
    ids = samples["sample_id"].astype(str).tolist()
    configs = config_grid(options).reset_index().rename(columns={"index": "config"})
    cells = grid.astype({"sample_id": str}).merge(configs[["config", *KNOBS]], on=list(KNOBS), how="inner")
    accuracy = cells.pivot_table(index="sample_id", columns="config", values="accuracy", aggfunc="mean")
    accuracy = accuracy.reindex(index=ids, columns=configs["config"])
    if accuracy.isna().any().any():
        where = np.argwhere(accuracy.isna().to_numpy())[0]
        raise ControllerError(f"controller data grid: sample {ids[where[0]]} lacks config "
                              f"{'-'.join(str(v) for v in configs.loc[where[1], list(KNOBS)])}")
    question = samples[q_columns].to_numpy(np.float32)
    lengths = rule.output_length.predict(question)
    point, upper = predicted_latency_ms(estimator, samples, lengths, options)
    global_view = samples[g_columns].to_numpy(np.float32) if use_global_view else np.zeros((len(samples), 0), np.float32)
    return ControllerArrays(ids, question, global_view, accuracy.to_numpy(np.float64), point, upper * rule.latency_factor)


def best_configs(accuracy: np.ndarray, upper_ms: np.ndarray, budget_ms: np.ndarray,
                 risk: tuple[FitModel, np.ndarray] | None = None) -> np.ndarray:
    """(M,) the label: per row, the most accurate config whose upper_ms fits budget_ms (ties to the lower
    upper_ms), else the config of lowest upper_ms. With `risk` = (fit model, (M,) prices), the accuracy
    less the price of the config's violation risk (core.control.risk)."""
    if risk is not None:
        return priced_choice(accuracy, upper_ms, budget_ms, risk[0], risk[1])[0]
    key = np.round(accuracy, 9) - upper_ms * 1e-12  # the latency term only breaks accuracy ties
    return choose(key, upper_ms, budget_ms)[0]


def head_labels(config_index: np.ndarray, options: dict[str, list]) -> dict[str, np.ndarray]:
    """The config indices (tier-major grid) as each knob's option index."""
    n_k, n_b = len(options["top_k"]), len(options["num_active_blocks"])
    return {"tier": config_index // (n_k * n_b), "top_k": (config_index // n_b) % n_k, "num_active_blocks": config_index % n_b}


@dataclass
class TrainedController:
    controller: LearnedController
    history: list[dict] = field(default_factory=list)
    train_ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)
    best_epoch: int = 0


def label_accuracy(arrays: ControllerArrays, reference: ControllerArrays, prior_weight: float) -> np.ndarray:
    """(N, C) the accuracy labels maximise: (1 - prior_weight) x each sample's own accuracy + prior_weight x
    the mean accuracy per config of the `reference` (training) samples of its data set. The data set only
    shapes the labels; the controller never reads it (it must infer it from the question, if at all)."""
    if prior_weight == 0:
        return arrays.accuracy
    groups = np.array([dataset_of(s) for s in reference.sample_ids])
    prior = {g: reference.accuracy[groups == g].mean(axis=0) for g in np.unique(groups)}
    overall = reference.accuracy.mean(axis=0)
    rows = np.stack([prior.get(dataset_of(s), overall) for s in arrays.sample_ids])
    return (1 - prior_weight) * arrays.accuracy + prior_weight * rows


class _Budgets:
    """Rows of (sample row, budget fraction) with their labels, for one pass."""

    def __init__(self, arrays: ControllerArrays, fractions: np.ndarray, l_full_ms: float, options: dict[str, list],
                 label_accuracy: np.ndarray, fit: FitModel | None = None, prices: ViolationPrices | None = None) -> None:
        self.rows = np.repeat(np.arange(len(arrays.sample_ids)), fractions.shape[1])
        self.fraction = fractions.reshape(-1)
        self.budget_ms = self.fraction * l_full_ms
        risk = None if prices is None or fit is None else (fit, prices.at(self.fraction))
        self.label = best_configs(label_accuracy[self.rows], arrays.upper_ms[self.rows], self.budget_ms, risk)
        self.labels = head_labels(self.label, options)


def _draw_fractions(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    low, high = TRAIN_FRACTION_RANGE
    return rng.uniform(low, high, size=(n, k))


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(nn.functional.cross_entropy(v, labels[k]) for k, v in logits.items()) / len(logits)


@torch.inference_mode()
def _evaluate(controller: LearnedController, arrays: ControllerArrays, features: torch.Tensor, budgets: _Budgets,
              device: torch.device) -> dict[str, float]:
    """The METRIC_NAMES of the net on `budgets` (eval mode)."""
    net = controller.net.eval()
    logits = {}
    for start in range(0, len(budgets.rows), 8192):
        part = slice(start, start + 8192)
        out = net(torch.as_tensor(budgets.fraction[part], dtype=torch.float32, device=device),
                  features[torch.as_tensor(budgets.rows[part], device=device)])
        for k, v in out.items():
            logits.setdefault(k, []).append(v)
    logits = {k: torch.cat(v) for k, v in logits.items()}
    labels = {k: torch.as_tensor(budgets.labels[k], device=device) for k in logits}
    log_probs = {k: torch.log_softmax(v, dim=1).cpu().numpy() for k, v in logits.items()}
    upper = arrays.upper_ms[budgets.rows]
    picked, _ = controller.choose(log_probs, upper, budgets.budget_ms)
    # The heads' own choice: the same ranking with every config allowed to fit.
    unguarded, _ = controller.choose(log_probs, np.zeros_like(upper), np.full(len(upper), 1.0))
    at = np.arange(len(picked))
    out = {"loss": float(_loss(logits, labels)),
           "accuracy_mean": float(arrays.accuracy[budgets.rows, picked].mean()),
           "latency_mean": float(arrays.latency_ms[budgets.rows, picked].mean()),
           "budget_violation_rate": float((upper[at, picked] > budgets.budget_ms).mean()),
           "expected_violation_rate": (math.nan if controller.fit is None else float(
               (1 - controller.fit.fit_probability(budgets.budget_ms, upper[at, picked][:, None])).mean())),
           "unguarded_accuracy_mean": float(arrays.accuracy[budgets.rows, unguarded].mean()),
           "unguarded_budget_violation_rate": float((upper[at, unguarded] > budgets.budget_ms).mean()),
           "label_accuracy_mean": float(arrays.accuracy[budgets.rows, budgets.label].mean())}
    right = {k: log_probs[k].argmax(axis=1) == budgets.labels[k] for k in log_probs}
    out["label_accuracy_all"] = float(np.logical_and.reduce(list(right.values())).mean())
    out.update({f"label_accuracy_{k}": float(right[k].mean()) if k in right else math.nan for k in KNOBS})
    return out


def train_controller(
    arrays: ControllerArrays, rule: Rule, estimator: LatencyEstimator, options: dict[str, list], space_name: str,
    l_full_ms: float, config: TrainingConfig, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedController:
    """Train the net of `config.stage` on `arrays` (module doc); on_epoch(epoch, record) after each epoch
    with the train_/val_ metrics. Returns the controller with the lowest-validation-loss weights."""
    config.validate()
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(arrays, rule, estimator, options, space_name, l_full_ms, config, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _stage1_prices(train: ControllerArrays, label_value: np.ndarray, prior: np.ndarray, fit: FitModel | None,
                   label_prices: ViolationPrices | None, l_full_ms: float, config: TrainingConfig,
                   options: dict[str, list]) -> ViolationPrices | None:
    """Stage 1's own prices: its choice within a tier reads the prior accuracy, not the sample's, so the price
    that holds the labels' violation rate does not hold its own. Solved on the training samples with the
    tier of their label (what the tier head learns) and the prior as the value."""
    if label_prices is None or fit is None:
        return None
    n_per_tier = len(options["top_k"]) * len(options["num_active_blocks"])
    tier_index = np.arange(train.upper_ms.shape[1]) // n_per_tier

    def label_tier(fraction: float, rows: np.ndarray) -> np.ndarray:
        budget = np.full(len(rows), fraction * l_full_ms)
        label = best_configs(label_value[rows], train.upper_ms[rows], budget, (fit, label_prices.at(np.full(len(rows), fraction))))
        return tier_index[None, :] == (label // n_per_tier)[:, None]

    value = np.broadcast_to(prior, train.upper_ms.shape)
    return price_violations(value, train.upper_ms, fit, l_full_ms, config.label_violation_target, seed=config.seed,
                            allowed_at=label_tier)


def _train(arrays, rule, estimator, options, space_name, l_full_ms, config, on_epoch) -> TrainedController:
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_rows, val_rows = split_samples(arrays.sample_ids, config.train_split, config.seed)
    train, val = arrays.take(train_rows), arrays.take(val_rows)
    net_config = ControllerConfig(
        question_dim=arrays.question.shape[1], global_view_dim=arrays.global_view.shape[1],
        use_global_view=config.use_global_view and arrays.global_view.shape[1] > 0, hidden_width=config.hidden_width,
        depth=config.depth, dropout=config.dropout, heads=STAGES[config.stage], options=options)
    net = build_net(net_config)
    kind = "supervised" if config.stage == "supervised" else "two_stage"
    train_labels = label_accuracy(train, train, config.label_prior_weight)
    prices = (price_violations(train_labels, train.upper_ms, rule.fit, l_full_ms, config.label_violation_target, seed=config.seed)
              if config.label_violation_target > 0 and rule.fit is not None else None)
    prior = train.accuracy.mean(axis=0)
    # the supervised rule reads the heads alone; stage 1's choice within its tier needs prices of its own
    rule_prices = (prices if config.stage == "supervised"
                   else _stage1_prices(train, train_labels, prior, rule.fit, prices, l_full_ms, config, options))
    controller = LearnedController(net, kind, space_name, l_full_ms, estimator, rule.latency_factor,
                                   rule.latency_quantile, rule.output_length, prior, fit=rule.fit, prices=rule_prices)
    train_x, val_x = net.inputs(train.question, train.global_view), net.inputs(val.question, val.global_view)
    net.fit_scalers(train_x)
    net.to(device)
    train_x, val_x = train_x.to(device), val_x.to(device)
    val_budgets = _Budgets(val, _draw_fractions(np.random.default_rng(config.seed + 1), len(val_rows),
                                                config.budgets_per_sample), l_full_ms, options,
                           label_accuracy(val, train, config.label_prior_weight), rule.fit, prices)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history, best_loss, best_state, best_epoch = [], math.inf, copy.deepcopy(net.state_dict()), 0
    for epoch in tqdm(range(1, config.num_epochs + 1), desc=f"train {kind} controller", leave=False):
        started = time.perf_counter()
        budgets = _Budgets(train, _draw_fractions(rng, len(train_rows), config.budgets_per_sample), l_full_ms, options,
                           train_labels, rule.fit, prices)
        fraction = torch.as_tensor(budgets.fraction, dtype=torch.float32, device=device)
        rows = torch.as_tensor(budgets.rows, device=device)
        labels = {k: torch.as_tensor(budgets.labels[k], device=device) for k in net.config.heads}
        net.train()
        for batch in torch.randperm(len(rows), generator=torch.Generator().manual_seed(int(rng.integers(2**31)))).split(config.batch_size):
            batch = batch.to(device)
            loss = _loss(net(fraction[batch], train_x[rows[batch]]), {k: v[batch] for k, v in labels.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in _evaluate(controller, train, train_x, budgets, device).items()},
                  **{f"val_{k}": v for k, v in _evaluate(controller, val, val_x, val_budgets, device).items()}}
        if not math.isfinite(record["train_loss"]):
            raise ControllerError(f"training diverged at epoch {epoch} (loss {record['train_loss']}); lower lr")
        record["is_best"] = float(record["val_loss"] < best_loss)
        if record["is_best"]:
            # A deep copy: a state_dict() alone is a view of the live weights (the seed's restore bug).
            best_loss, best_state, best_epoch = record["val_loss"], copy.deepcopy(net.state_dict()), epoch
        record.update(lr=config.lr, epoch_time_s=time.perf_counter() - started)
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    net.load_state_dict(best_state)
    controller.net = net.cpu().eval()
    return TrainedController(controller, history, train.sample_ids, val.sample_ids, best_epoch)
