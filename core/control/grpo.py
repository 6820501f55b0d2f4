"""GRPO for the budget controllers, read top to bottom (CleanRL's ppo.py layout): config, policy,
rollouts, the update, the loop.

Policies (`POLICIES`), all scoring the 75 configs of the knob space at once as one categorical:
  end_to_end  one ControllerNet with the three heads (Exp 5); a config's log-prob is the sum of its
              tier, top_k and blocks log-probs: sampling the joint is sampling each knob on its own
  stage2      Exp 4: a trained stage-1 tier net, frozen, picks the tier by its decision rule (the most
              likely tier with a config whose calibrated latency fits B); a stage-2 net's per-tier
              top_k and blocks heads for that tier are trained: log-prob = log p(k | t) + log p(b | t)
  joint       both stages trained together (the joint guide): log p(t) + log p(k | t) + log p(b | t),
              stage 1 at lr x stage1_lr_ratio (optionally starting from a trained stage 1)

Rollouts (`reward_source=replay`): per epoch every training sample gets `budgets_per_sample` budgets
f ~ U[0.4, 1.1]; per (sample, budget) row the policy draws `group_size` configs; accuracy comes from
the controller data's grid, T_total from the estimator's median at the predicted answer length times
a ratio drawn from the calibration runs' measured / predicted T_total (the run-to-run spread, the
estimator's error and the drift of this machine: the policy sees what a margin has to cover).
`RolloutSource` is the interface: `LiveRollouts` (core.control.live) answers with the base VLM.

The update (one per batch of rows): advantages normalised within each group, (r - mean) / (std +
1e-4); `num_iterations` passes of the PPO-clipped surrogate min(rho A, clip(rho, 1-eps, 1+eps) A)
with rho the ratio to the policy that drew the rollouts; minus `entropy_coef` x the policy's entropy;
plus `kl_beta` x the exact KL to the initial policy (0 by default, as in TRL); then the reward's
multiplier (constrained reward) moves by the batch's violation rate.

Decisions use the shared rule (core.control.decision): the most likely config, or the most likely
tier and then the most likely config in it, whose calibrated upper latency fits B.

Per-epoch records: train_<m> for m in TRAIN_METRICS (means over the epoch's updates; reward,
accuracy and latency over its rollouts) and val_<m> for m in VAL_METRICS: the decision rule's picks on
the validation samples at fixed, seeded budgets with fixed noise draws (`loss` there is minus the mean
reward, a violation priced at the initial multiplier so that epochs compare); `unguarded_*` the policy's most likely config without the latency check.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from core.control.budgets import TRAIN_FRACTION_RANGE
from core.control.decision import ControllerError, LearnedController, pick_tier
from core.control.policies import ControllerConfig, ControllerNet, TierControllerNet, build_net, stage2_config
from core.control.reward import Reward, RewardConfig
from core.control.supervised import ControllerArrays, Rule, TrainedController, split_samples
from core.knobs import KNOBS, TIERS
from core.latency.estimator import LatencyEstimator, check_device

POLICIES = ("end_to_end", "stage2", "joint")
KIND_OF_POLICY = {"end_to_end": "grpo", "stage2": "two_stage", "joint": "joint"}
TRAIN_METRICS: tuple[str, ...] = (
    "loss", "reward_mean", "reward_std", "accuracy_mean", "accuracy_std", "latency_mean", "latency_std",
    "budget_violation_rate", "clip_ratio", "kl", "entropy", "advantage_std", "multiplier", "rollouts_per_s")
VAL_METRICS: tuple[str, ...] = (
    "loss", "reward_mean", "reward_std", "accuracy_mean", "accuracy_std", "latency_mean", "latency_std",
    "budget_violation_rate", "unguarded_accuracy_mean", "unguarded_budget_violation_rate")
TRAINING_RECORD_KEYS: tuple[str, ...] = tuple(f"train_{m}" for m in TRAIN_METRICS) + ("lr", "epoch_time_s")
VALIDATION_RECORD_KEYS: tuple[str, ...] = tuple(f"val_{m}" for m in VAL_METRICS) + ("is_best",)
CHECKPOINT_EVERY = 10  # epochs
LAST_FILE, BEST_FILE = "last.pt", "best.pt"
_MASKED = -1e9  # log-prob of configs outside the tier stage 1 picked (exp() is 0, 0 x it is 0)


@dataclass
class GRPOConfig:
    """Every GRPO hyper-parameter with its default (the entry points' -P defaults read them here)."""

    policy: str = "end_to_end"  # POLICIES
    batch_size: int = 64  # (sample, budget) rows per update
    num_epochs: int = 100
    group_size: int = 5  # configs drawn per row (the seed's)
    num_iterations: int = 1  # PPO passes per rollout batch (TRL's default; 1 makes the ratio 1 and the clip idle)
    clip_epsilon: float = 0.2
    kl_beta: float = 0.0  # weight of the KL to the initial policy (TRL's default 0)
    entropy_coef: float = 0.05  # 0.01 let the joint policy collapse onto one config within 10 epochs on the toy grid
    lr: float = 1e-4  # Adam
    stage1_lr_ratio: float = 1.0  # joint: stage 1's lr over stage 2's
    budgets_per_sample: int = 4
    train_split: float = 0.8
    seed: int = 42
    device: str = "cpu"
    hidden_width: int = 128
    depth: int = 2
    use_global_view: bool = True
    num_threads: int | None = 1
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> "GRPOConfig":
        if self.policy not in POLICIES:
            raise ControllerError(f"parameter policy must be one of {list(POLICIES)}, got {self.policy!r}")
        for name in ("batch_size", "num_epochs", "num_iterations", "budgets_per_sample", "hidden_width", "depth"):
            if int(getattr(self, name)) < 1:
                raise ControllerError(f"parameter {name} must be >= 1, got {getattr(self, name)}")
        if int(self.group_size) < 2:
            raise ControllerError(f"parameter group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        for name in ("lr", "stage1_lr_ratio"):
            if not 0 < float(getattr(self, name)) < math.inf:
                raise ControllerError(f"parameter {name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("clip_epsilon", "kl_beta", "entropy_coef"):
            if not 0 <= float(getattr(self, name)) < math.inf:
                raise ControllerError(f"parameter {name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.train_split < 1:
            raise ControllerError(f"parameter train_split must lie in (0, 1), got {self.train_split}")
        try:
            self.reward.validate()
        except ValueError as exc:
            raise ControllerError(str(exc)) from None
        check_device(self.device)
        return self

    def as_dict(self) -> dict:
        return asdict(self)


# --- the policy ------------------------------------------------------------------------------------
class Policy(torch.nn.Module):
    """The nets of one policy and the (N, configs) log-probs they give, tier-major as the knob grid."""

    def __init__(self, policy: str, first: ControllerNet, stage2: ControllerNet | None = None) -> None:
        super().__init__()
        self.policy, self.first, self.stage2 = policy, first, stage2

    def config_log_probs(self, fraction: torch.Tensor, x: torch.Tensor, tier: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs of every config for rows (fraction (N,), inputs (N, d)); `tier` (N,) long: stage2's tier."""
        if self.stage2 is None:
            out = self.first(fraction, x)
            t, k, b = (torch.log_softmax(out[knob], dim=1) for knob in KNOBS)
            joint = t[:, :, None, None] + k[:, None, :, None] + b[:, None, None, :]
            return joint.reshape(len(x), -1)
        second = self.stage2(fraction, x)
        n_t = len(TIERS)
        k = torch.log_softmax(second["top_k"].reshape(len(x), n_t, -1), dim=2)
        b = torch.log_softmax(second["num_active_blocks"].reshape(len(x), n_t, -1), dim=2)
        if tier is None:
            t = torch.log_softmax(self.first(fraction, x)["tier"], dim=1)
        else:  # stage 1 decided the tier: only its configs are drawn
            t = torch.full((len(x), n_t), _MASKED, device=x.device).scatter(1, tier[:, None], 0.0)
        joint = t[:, :, None, None] + k[:, :, :, None] + b[:, :, None, :]
        return joint.reshape(len(x), -1)

    def trained_parameters(self, config: GRPOConfig) -> list[dict]:
        """Adam parameter groups: stage 1 frozen for stage2, at lr x stage1_lr_ratio for joint."""
        if self.policy == "end_to_end":
            return [{"params": list(self.first.parameters()), "lr": config.lr}]
        groups = [{"params": list(self.stage2.parameters()), "lr": config.lr}]
        if self.policy == "joint":
            groups.append({"params": list(self.first.parameters()), "lr": config.lr * config.stage1_lr_ratio})
        else:
            self.first.requires_grad_(False)
        return groups


def build_policy(config: GRPOConfig, question_dim: int, global_view_dim: int, options: dict[str, list],
                 stage1: ControllerNet | None = None) -> Policy:
    """A fresh policy; `stage1` (a trained tier net) is required by stage2 and optional for joint."""
    net_config = ControllerConfig(question_dim=question_dim, global_view_dim=global_view_dim,
                                  use_global_view=config.use_global_view and global_view_dim > 0,
                                  hidden_width=config.hidden_width, depth=config.depth, dropout=0.0,
                                  options=options)
    if config.policy == "end_to_end":
        return Policy(config.policy, build_net(net_config))
    if stage1 is None and config.policy == "stage2":
        raise ControllerError("policy stage2 needs a trained stage-1 controller (parameter stage1_checkpoint)")
    if stage1 is not None:
        if tuple(stage1.config.heads) != ("tier",):
            raise ControllerError(f"the stage-1 controller has heads {list(stage1.config.heads)}, not the tier head alone")
        if (stage1.config.question_dim, stage1.config.global_view_dim if stage1.uses_global_view else 0) != (
                question_dim, global_view_dim if net_config.use_global_view else 0):
            raise ControllerError("the stage-1 controller was trained on other request features than the controller data's")
        first = copy.deepcopy(stage1)
        first.config.dropout = 0.0
        for module in first.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    else:
        net_config.heads = ("tier",)
        first = TierControllerNet(net_config)
    second = build_net(stage2_config(first.config, config.hidden_width))
    return Policy(config.policy, first, second)


# --- rollouts ------------------------------------------------------------------------------------
class RolloutSource(Protocol):
    """Where rewards come from: accuracy and measured-like T_total of configs drawn for rows."""

    name: str

    def score(self, rows: np.ndarray, configs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """rows (N,) into the training arrays, configs (N, G) grid indices -> (accuracy, T_total_ms), (N, G) each."""


class ReplayRollouts:
    """Accuracy from the grid; T_total = estimator median x a drawn calibration ratio (module doc)."""

    name = "replay"

    def __init__(self, arrays: ControllerArrays, noise_ratios: np.ndarray) -> None:
        if len(noise_ratios) == 0:
            raise ControllerError("calibration table: no measured run to draw the replay noise from")
        self.accuracy, self.latency_ms = arrays.accuracy, arrays.latency_ms
        self.noise = np.asarray(noise_ratios, dtype=np.float64)

    def score(self, rows: np.ndarray, configs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        r = rows[:, None]
        noise = self.noise[rng.integers(len(self.noise), size=configs.shape)]
        return self.accuracy[r, configs], self.latency_ms[r, configs] * noise


# --- the loop --------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """(sample row, budget) pairs of one pass."""

    rows: np.ndarray
    fraction: np.ndarray
    budget_ms: np.ndarray


def _draw_rows(rng: np.random.Generator, n_samples: int, per_sample: int, l_full_ms: float) -> _Rows:
    low, high = TRAIN_FRACTION_RANGE
    fraction = rng.uniform(low, high, size=n_samples * per_sample)
    return _Rows(np.repeat(np.arange(n_samples), per_sample), fraction, fraction * l_full_ms)


def _stage1_tiers(policy: Policy, fraction: torch.Tensor, x: torch.Tensor, upper_ms: np.ndarray,
                  budget_ms: np.ndarray) -> torch.Tensor:
    """The tier the frozen stage 1's rule picks per row (its most likely tier with a fitting config)."""
    with torch.no_grad():
        tier_log_prob = torch.log_softmax(policy.first(fraction, x)["tier"], dim=1).cpu().numpy()
    fitting = upper_ms <= budget_ms[:, None]
    tier_index = np.repeat(np.arange(len(TIERS)), upper_ms.shape[1] // len(TIERS))
    return torch.as_tensor(pick_tier(tier_log_prob, fitting, tier_index), device=x.device)


def _controller(policy: Policy, kind: str, space_name: str, l_full_ms: float, estimator: LatencyEstimator,
                rule: Rule, prior_accuracy: np.ndarray) -> LearnedController:
    first = copy.deepcopy(policy.first).cpu().eval()
    second = None if policy.stage2 is None else copy.deepcopy(policy.stage2).cpu().eval()
    return LearnedController(first, kind, space_name, l_full_ms, estimator, rule.latency_factor, rule.latency_quantile,
                             rule.output_length, prior_accuracy, second)


def _validate(controller: LearnedController, arrays: ControllerArrays, val_rows: _Rows, noise: np.ndarray,
              reward: Reward) -> dict[str, float]:
    """VAL_METRICS of the decision rule's picks (module doc)."""
    rows = val_rows.rows
    gv = arrays.global_view[rows] if controller.net.uses_global_view else None
    log_probs = controller.head_log_probs(arrays.question[rows], gv, val_rows.budget_ms)
    upper = arrays.upper_ms[rows]
    picked, _ = controller.choose(log_probs, upper, val_rows.budget_ms)
    unguarded, _ = controller.choose(log_probs, np.zeros_like(upper), np.ones(len(rows)))
    out: dict[str, float] = {}
    for prefix, pick in (("", picked), ("unguarded_", unguarded)):
        accuracy = arrays.accuracy[rows, pick]
        latency = arrays.latency_ms[rows, pick] * noise
        violated = latency > val_rows.budget_ms
        out[f"{prefix}accuracy_mean"] = float(accuracy.mean())
        out[f"{prefix}budget_violation_rate"] = float(violated.mean())
        if not prefix:
            rewards = reward(accuracy, latency, val_rows.budget_ms)
            out.update(loss=float(-rewards.mean()), reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                       accuracy_std=float(accuracy.std()), latency_mean=float(latency.mean()), latency_std=float(latency.std()))
    return out


def train_grpo(
    arrays: ControllerArrays, rule: Rule, estimator: LatencyEstimator, options: dict[str, list], space_name: str,
    l_full_ms: float, noise_ratios: np.ndarray, config: GRPOConfig,
    rollout_source: Callable[[ControllerArrays], RolloutSource] | None = None,
    stage1: ControllerNet | None = None, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_dir: Path | None = None, resume_dir: Path | None = None,
) -> TrainedController:
    """Train the policy of `config.policy` by GRPO (module doc). `noise_ratios`: measured / predicted
    median T_total of the calibration runs (`Rule.median_ratios`: replay's noise, validation's fixed draws);
    `rollout_source(training arrays)` the rewards' source (default: ReplayRollouts). With `checkpoint_dir`, best.pt
    (by val reward) and every CHECKPOINT_EVERY epochs last.pt are written; `resume_dir` continues from
    its last.pt (same config, else ControllerError). Returns the best-by-val-reward controller."""
    config.validate()
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(arrays, rule, estimator, options, space_name, l_full_ms, rollout_source, noise_ratios, config, stage1,
                      on_epoch, checkpoint_dir, resume_dir)
    finally:
        torch.set_num_threads(threads)


def _train(arrays, rule, estimator, options, space_name, l_full_ms, rollout_source, noise_ratios, config, stage1, on_epoch,
           checkpoint_dir, resume_dir) -> TrainedController:
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_rows, val_rows = split_samples(arrays.sample_ids, config.train_split, config.seed)
    train, val = arrays.take(train_rows), arrays.take(val_rows)
    source = rollout_source(train) if rollout_source is not None else ReplayRollouts(train, noise_ratios)
    kind = KIND_OF_POLICY[config.policy]
    gv_dim = arrays.global_view.shape[1]
    policy = build_policy(config, arrays.question.shape[1], gv_dim, options, stage1)
    train_x = policy.first.inputs(train.question, train.global_view)
    val_x = policy.first.inputs(val.question, val.global_view)
    if stage1 is None:  # a trained stage 1 keeps the scalers it was trained with
        policy.first.fit_scalers(train_x)
    if policy.stage2 is not None:
        policy.stage2.fit_scalers(train_x)
    policy.to(device)
    train_x = train_x.to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if config.kl_beta > 0 else None
    optimizer = torch.optim.Adam(policy.trained_parameters(config), foreach=True)
    reward = Reward(config.reward)
    # Validation prices a violation at the initial multiplier, so val rewards of different epochs compare
    # (best.pt is chosen by them) while the training multiplier moves.
    val_reward = Reward(config.reward)
    prior_accuracy = train.accuracy.mean(axis=0)
    val_draw = np.random.default_rng(config.seed + 1)
    fixed_val = _draw_rows(val_draw, len(val_rows), config.budgets_per_sample, l_full_ms)
    fixed_noise = np.asarray(noise_ratios)[val_draw.integers(len(noise_ratios), size=len(fixed_val.rows))]
    history: list[dict] = []
    best_reward, best_epoch, start_epoch = -math.inf, 0, 1
    best = _controller(policy, kind, space_name, l_full_ms, estimator, rule, prior_accuracy)
    if resume_dir is not None:
        state = _load_state(Path(resume_dir) / LAST_FILE, config)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        reward.load_state(state["reward"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history, best_reward, best_epoch, start_epoch = state["history"], state["best_reward"], state["best_epoch"], state["epoch"] + 1
        if (Path(resume_dir) / BEST_FILE).is_file():
            policy_best = copy.deepcopy(policy)
            policy_best.load_state_dict(torch.load(Path(resume_dir) / BEST_FILE, weights_only=True)["policy"])
            best = _controller(policy_best, kind, space_name, l_full_ms, estimator, rule, prior_accuracy)
    accuracy_t = torch.as_tensor(train.accuracy, device=device)
    for epoch in tqdm(range(start_epoch, config.num_epochs + 1), desc=f"GRPO {config.policy}", leave=False,
                      initial=start_epoch - 1, total=config.num_epochs):
        started = time.perf_counter()
        epoch_rows = _draw_rows(rng, len(train_rows), config.budgets_per_sample, l_full_ms)
        order = rng.permutation(len(epoch_rows.rows))
        sums: dict[str, float] = {m: 0.0 for m in ("loss", "clip_ratio", "kl", "entropy", "advantage_std")}
        rewards_all, accuracy_all, latency_all, violated_all = [], [], [], []
        updates, rollout_time, rollouts = 0, 0.0, 0
        policy.train()
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            rows, budget = epoch_rows.rows[batch], epoch_rows.budget_ms[batch]
            t0 = time.perf_counter()
            fraction = torch.as_tensor(epoch_rows.fraction[batch], dtype=torch.float32, device=device)
            x = train_x[torch.as_tensor(rows, device=device)]
            tier = _stage1_tiers(policy, fraction, x, train.upper_ms[rows], budget) if config.policy == "stage2" else None
            log_probs = policy.config_log_probs(fraction, x, tier)
            configs = torch.multinomial(log_probs.detach().exp(), config.group_size, replacement=True)
            accuracy, latency = source.score(rows, configs.cpu().numpy(), rng)
            r = reward(accuracy, latency, budget[:, None])
            r_t = torch.as_tensor(r, dtype=torch.float32, device=device)
            advantage = (r_t - r_t.mean(dim=1, keepdim=True)) / (r_t.std(dim=1, keepdim=True) + 1e-4)
            old = log_probs.detach().gather(1, configs)
            rollout_time += time.perf_counter() - t0
            rollouts += configs.numel()
            for iteration in range(config.num_iterations):
                if iteration:
                    log_probs = policy.config_log_probs(fraction, x, tier)
                new = log_probs.gather(1, configs)
                ratio = torch.exp(new - old)
                clipped = torch.clamp(ratio, 1 - config.clip_epsilon, 1 + config.clip_epsilon)
                policy_loss = -torch.min(ratio * advantage, clipped * advantage).mean()
                probs = log_probs.exp()
                entropy = -(probs * log_probs).sum(dim=1).mean()
                loss = policy_loss - config.entropy_coef * entropy
                kl = torch.zeros((), device=device)
                if reference is not None:
                    with torch.no_grad():
                        ref = reference.config_log_probs(fraction, x, tier)
                    kl = (probs * (log_probs - ref)).sum(dim=1).mean()
                    loss = loss + config.kl_beta * kl
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            violated = latency > budget[:, None]
            # Budgets that no config meets at the rule's calibrated upper latency violate whatever the
            # policy picks: counted in, they would hold the rate above the target and raise the multiplier
            # without end. The multiplier follows the budgets the policy can keep.
            keepable = (train.upper_ms[rows] <= budget[:, None]).any(axis=1)
            if keepable.any():
                reward.update(float(violated[keepable].mean()))
            with torch.no_grad():
                sums["loss"] += float(loss)
                sums["clip_ratio"] += float(((ratio - 1).abs() > config.clip_epsilon).float().mean())
                sums["kl"] += float(kl)
                sums["entropy"] += float(entropy)
                sums["advantage_std"] += float(advantage.std())
            updates += 1
            rewards_all.append(r.reshape(-1)); accuracy_all.append(accuracy.reshape(-1))  # noqa: E702
            latency_all.append(latency.reshape(-1)); violated_all.append(violated.reshape(-1))  # noqa: E702
        train_time = time.perf_counter() - started
        if not math.isfinite(sums["loss"]):
            raise ControllerError(f"GRPO diverged at epoch {epoch} (loss {sums['loss']}); lower lr")
        rewards_e, accuracy_e, latency_e = (np.concatenate(v) for v in (rewards_all, accuracy_all, latency_all))
        record: dict[str, float] = {"epoch": epoch, **{f"train_{k}": v / max(updates, 1) for k, v in sums.items()},
                                    "train_reward_mean": float(rewards_e.mean()), "train_reward_std": float(rewards_e.std()),
                                    "train_accuracy_mean": float(accuracy_e.mean()), "train_accuracy_std": float(accuracy_e.std()),
                                    "train_latency_mean": float(latency_e.mean()), "train_latency_std": float(latency_e.std()),
                                    "train_budget_violation_rate": float(np.concatenate(violated_all).mean()),
                                    "train_multiplier": reward.multiplier,
                                    # rollouts drawn and scored per second of the epoch's training time
                                    "train_rollouts_per_s": rollouts / train_time if train_time > 0 else math.nan}
        current = _controller(policy, kind, space_name, l_full_ms, estimator, rule, prior_accuracy)
        record.update({f"val_{k}": v for k, v in _validate(current, val, fixed_val, fixed_noise, val_reward).items()})
        record["is_best"] = float(record["val_reward_mean"] > best_reward)
        if record["is_best"]:
            best_reward, best_epoch, best = record["val_reward_mean"], epoch, current
            if checkpoint_dir is not None:
                _save(Path(checkpoint_dir) / BEST_FILE, {"policy": policy.state_dict(), "epoch": epoch})
        record.update(lr=config.lr, epoch_time_s=time.perf_counter() - started)
        history.append(record)
        if checkpoint_dir is not None and (epoch % CHECKPOINT_EVERY == 0 or epoch == config.num_epochs):
            _save(Path(checkpoint_dir) / LAST_FILE, {
                "config": config.as_dict(), "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                "reward": reward.state(), "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "history": history, "best_reward": best_reward, "best_epoch": best_epoch, "epoch": epoch})
            _save(Path(checkpoint_dir) / f"epoch_{epoch:03d}.pt", {"policy": policy.state_dict(), "epoch": epoch})
        if on_epoch is not None:
            on_epoch(epoch, record)
    return TrainedController(best, history, train.sample_ids, val.sample_ids, best_epoch)


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)  # a kill mid-write leaves the previous file whole


def _load_state(path: Path, config: GRPOConfig) -> dict:
    if not path.is_file():
        raise ControllerError(f"parameter resume_dir: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy rng state inside
    saved = {k: v for k, v in state["config"].items() if k not in ("num_epochs", "device", "num_threads")}
    current = {k: v for k, v in config.as_dict().items() if k not in ("num_epochs", "device", "num_threads")}
    if saved != current:
        differing = sorted(k for k in current if saved.get(k) != current[k])
        raise ControllerError(f"parameter resume_dir: {path} was written by another GRPO config ({', '.join(differing)} differ)")
    return state
