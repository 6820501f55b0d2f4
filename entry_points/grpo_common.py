"""What the three GRPO trainers share (`train_grpo_controller`, `train_two_stage_controller -P
stage=stage2`, `train_joint_controller`): the parameters, their search space, and the run body. Not
an entry point itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from core.control.budgets import check_fractions
from core.control.decision import LATENCY_QUANTILE
from core.control.grpo import GRPOConfig
from core.control.reward import REWARD_KINDS, RewardConfig
from tracking.cli import ParameterError, config_from_params, number_list
from tracking.controller_models import MODEL_NAME, resolve_controller
from tracking.controller_runs import TrainingInputs, train_grpo_and_register, training_inputs
from tracking.model_refs import VLMReference
from tracking.entry_point import EpochHook
from tracking.registry import Promotion
from tracking.tuning import CategoricalParam, FloatParam, Objective, Tuning

PROMOTION = Promotion(MODEL_NAME, metric="test_accuracy_auc", mode="max")
REWARD_SOURCES = ("replay", "live")
_G, _R = GRPOConfig(), RewardConfig()
# Tuned on the validation samples' reward of the decision rule's picks, never on the held-out table.
TUNING = Tuning(
    search_space=[FloatParam("lr", 1e-5, 3e-3, log=True), CategoricalParam("group_size", (4, 5, 8, 16)),
                  FloatParam("violation_target", 0.005, 0.05, log=True), FloatParam("entropy_coef", 1e-4, 0.05, log=True),
                  CategoricalParam("hidden_width", (64, 128, 256))],
    objective=Objective(metric="val_reward_mean", direction="maximize"))


@dataclass
class GRPOParams:
    """The GRPO parameters every GRPO trainer takes (each entry point adds its data, stage and size ones)."""

    output_dir: str = "outputs/controllers"  # <output_dir>/<run id>/: the controller, checkpoints/, TensorBoard events
    lr: float = _G.lr  # Adam's learning rate
    group_size: int = _G.group_size  # configs drawn per (sample, budget); advantages are relative to the group
    num_iterations: int = _G.num_iterations  # PPO passes per rollout batch (1: TRL's default)
    clip_epsilon: float = _G.clip_epsilon  # PPO clip of the probability ratio
    beta: float = _G.kl_beta  # weight of the KL to the initial policy (TRL's beta; 0 = none)
    entropy_coef: float = _G.entropy_coef  # entropy bonus
    reward: str = _R.kind  # constrained (Lagrange multiplier on the violation rate) | penalty (the seed's)
    alpha: float = _R.alpha  # reward weight of accuracy
    penalty_beta: float = _R.beta  # penalty reward: weight of the relative overshoot max(0, T - B) / B
    violation_target: float = _R.violation_target  # constrained reward: the violation rate the multiplier holds
    multiplier_lr: float = _R.multiplier_lr  # constrained reward: multiplier step per unit of (rate - target)
    reward_source: str = "replay"  # replay (grid accuracy, estimator latency x measured spread) | live (the base VLM answers)
    train_split: float = _G.train_split  # share of the controller data's samples for training; the rest validates
    device: str = _G.device  # torch device of the training
    seed: int = _G.seed  # of the split, the budgets, the rollouts and the initial weights
    use_global_view: bool = _G.use_global_view  # feed the pooled global view (false: question + budget only)
    budgets_per_sample: int = _G.budgets_per_sample  # budgets f ~ U[0.4, 1.1] per training sample and epoch
    hidden_width: int = _G.hidden_width
    num_threads: int = 1  # torch threads (small nets: one is fastest on a busy machine)
    estimator: str = "models:/latency-estimator@champion"  # a models:/ URI, train_estimator run id or checkpoint file
    measured_table: str = "data/profiles/cpu-base-vlm"  # measured test-split profile: calibration + held-out scores
    model_path: str = "data/base_vlm"  # base_vlm: directory or models:/ URI; molmoe_arch: a MolmoE-1B release directory
    backend: str = "base_vlm"  # the VLM whose features the controller reads: base_vlm | molmoe_arch (the controller data's)
    data_root: str = ""  # the real benchmarks' files the measured table answered; '' = the synthetic suite
    vlm_device: str = "cpu"  # where the VLM computes the measured samples' features (cuda for MolmoE-1B)
    calibration_seed: int = 0  # of the measured table's 70/30 calibration/held-out split
    latency_quantile: float = LATENCY_QUANTILE  # the fit check: calibration runs' quantile of measured / predicted T_total
    budget_fractions: str = ""  # extra budget fractions to score, comma-separated (0.5 ... 1.0 always)
    resume_dir: str = ""  # a killed run's <output_dir>/<run id>/checkpoints: continue from its last.pt
    tensorboard: bool = False  # write TensorBoard events under <output_dir>/<run id>/tensorboard
    register: bool = True  # register the model as model_name
    model_name: str = PROMOTION.model_name


def grpo_config(params: GRPOParams, policy: str, batch_size: int, num_epochs: int, **extra: Any) -> GRPOConfig:
    reward = RewardConfig(kind=params.reward, alpha=params.alpha, beta=params.penalty_beta,
                          violation_target=params.violation_target, multiplier_lr=params.multiplier_lr)
    return config_from_params(GRPOConfig, params, policy=policy, batch_size=batch_size, num_epochs=num_epochs,
                              kl_beta=params.beta, reward=reward, **extra)


def check_grpo(params: GRPOParams, config: GRPOConfig) -> None:
    if params.reward not in REWARD_KINDS:
        raise ParameterError(f"parameter reward must be one of {list(REWARD_KINDS)}, got {params.reward!r}")
    if params.reward_source not in REWARD_SOURCES:
        raise ParameterError(f"parameter reward_source must be one of {list(REWARD_SOURCES)}, got {params.reward_source!r}")
    config.validate()
    if extra := number_list(params.budget_fractions, "budget_fractions"):
        check_fractions(extra)


def grpo_inputs(params: GRPOParams, data_dir: str, estimator: str | None = None,
                dataset_names: list[str] | None = None) -> TrainingInputs:
    vlm = VLMReference(params.backend, params.model_path, device=params.vlm_device)
    return training_inputs(data_dir, vlm, estimator or params.estimator, params.measured_table,
                           params.calibration_seed, number_list(params.budget_fractions, "budget_fractions"),
                           dataset_names, params.data_root)


def stage1_net(reference: str, parameter: str):
    """The tier net of a stage-1 two-stage controller (run id, models:/ URI or directory)."""
    controller, _ = resolve_controller(reference)
    if tuple(controller.net.config.heads) != ("tier",) or controller.stage2 is not None:
        raise ParameterError(f"parameter {parameter}: {reference} is a {controller.kind} controller with heads "
                             f"{list(controller.net.config.heads)}, not a stage-1 (tier) controller")
    return controller.net


def run_grpo(params: GRPOParams, prepared: TrainingInputs, config: GRPOConfig, stage1=None,
             epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    return train_grpo_and_register(prepared, config, params.latency_quantile, params.output_dir, params.tensorboard,
                                   params.model_name if params.register else None, PROMOTION, params.reward_source,
                                   stage1, params.resume_dir, epoch_hook)


def grpo_headline(kind: str, metrics: Mapping[str, Any], model_name: str) -> str:
    version = f"; registered {model_name} version {int(metrics['registered_version'])}" if "registered_version" in metrics else ""
    return (f"{kind} controller (GRPO): held-out test_accuracy_auc={metrics.get('test_accuracy_auc', float('nan')):.4f}, "
            f"test_adherence_min={metrics.get('test_adherence_min', float('nan')):.4f} (best epoch {metrics['best_epoch']}, "
            f"val_reward_mean {metrics.get('val_reward_mean', float('nan')):.4f}){version}")
