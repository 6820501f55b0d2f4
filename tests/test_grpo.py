"""GRPO controllers (issue 15): the rewards, learning on a toy grid whose best config depends on the
budget and on a request feature (no labels given), resume after a kill, and the three GRPO trainers end
to end on a real SQLite store (the tiny controller data and measured table of tests.test_controllers),
one of them with live rollouts of the committed base VLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from core.control.grpo import GRPOConfig, build_policy, train_grpo
from core.control.reward import Reward, RewardConfig
from core.control.supervised import TrainingConfig, train_controller
from core.knobs import BASE_VLM_SPACE
from tests.test_controllers import (  # noqa: F401  (fixtures)
    BASE_VLM_DIR, OPTIONS, _runs, controller_inputs, estimator_file, toy_arrays, toy_rule,
)

NOISE = np.random.default_rng(0).normal(1.0, 0.02, 500)


def test_the_penalty_reward_is_the_seeds_and_the_multiplier_holds_the_violation_target():
    penalty = Reward(RewardConfig(kind="penalty", alpha=1.0, beta=0.5))
    assert np.allclose(penalty(np.array([1.0, 1.0, 0.0]), np.array([10.0, 12.0, 20.0]), 10.0), [1.0, 0.9, -0.5])
    constrained = Reward(RewardConfig(kind="constrained", violation_target=0.03, multiplier_lr=1.0, initial_multiplier=1.0))
    assert np.allclose(constrained(np.array([1.0, 1.0]), np.array([9.0, 11.0]), 10.0), [1.0, 0.0])
    assert constrained.update(0.53) == pytest.approx(1.5)  # above the target: violations cost more
    assert constrained.update(0.0) == pytest.approx(1.47)
    for _ in range(100):
        constrained.update(0.0)
    assert constrained.multiplier == 0.0  # never negative
    with pytest.raises(ValueError, match="violation_target"):
        RewardConfig(violation_target=1.5).validate()


def test_a_config_log_prob_is_the_sum_of_the_knobs_applied():
    arrays = toy_arrays(8)
    policy = build_policy(GRPOConfig(hidden_width=16), 4, 2, OPTIONS)
    x = policy.first.inputs(arrays.question, arrays.global_view)
    fraction = torch.full((8,), 0.8)
    joint = policy.config_log_probs(fraction, x)
    heads = {k: torch.log_softmax(v, 1) for k, v in policy.first(fraction, x).items()}
    assert torch.allclose(joint[:, 0], heads["tier"][:, 0] + heads["top_k"][:, 0] + heads["num_active_blocks"][:, 0])
    assert torch.allclose(joint.exp().sum(1), torch.ones(8))
    two_stage = build_policy(GRPOConfig(policy="joint", hidden_width=16), 4, 2, OPTIONS)
    tier = torch.tensor([2] * 8)
    masked = two_stage.config_log_probs(fraction, x, tier).exp()
    assert torch.allclose(masked.sum(1), torch.ones(8)) and masked[:, :50].max() < 1e-12  # only the high tier's 25


def _learned_vs_lookup(controller, arrays, val_ids, fractions=(0.75, 0.85, 0.95)):
    val = arrays.take(np.array([int(s.split(":")[-1]) for s in val_ids]))
    out = []
    for fraction in fractions:
        budget = np.full(len(val.sample_ids), fraction * 26.0)
        index, fits = controller.choose(controller.head_log_probs(val.question, val.global_view, budget), val.upper_ms, budget)
        fitting = val.upper_ms[0] <= budget[0]
        out.append((val.accuracy[np.arange(len(index)), index].mean(), val.accuracy[:, fitting].mean(axis=0).max(), fits.all()))
    return out


@pytest.mark.parametrize("policy", ["end_to_end", "stage2", "joint"])
def test_grpo_finds_the_best_config_of_each_request_kind_without_labels(policy):
    """Kind A needs the high tier, kind B top_k 6 with 8 blocks (tests.test_controllers.toy_arrays): from
    f = 0.75 a policy that reads the question answers both, a static config one of them."""
    arrays = toy_arrays()
    stage1 = None
    if policy == "stage2":
        stage1 = train_controller(arrays, toy_rule(4), None, OPTIONS, BASE_VLM_SPACE.name, 26.0,
                                  TrainingConfig(num_epochs=25, lr=3e-3, stage="stage1", hidden_width=64, dropout=0.0)).controller.net
    records = []
    trained = train_grpo(arrays, toy_rule(4), None, OPTIONS, BASE_VLM_SPACE.name, 26.0, NOISE,
                         GRPOConfig(policy=policy, num_epochs=30, lr=5e-3, hidden_width=64),
                         stage1=stage1, on_epoch=lambda epoch, record: records.append(record))
    assert {"train_reward_mean", "train_clip_ratio", "train_kl", "train_entropy", "train_advantage_std",
            "train_rollouts_per_s", "val_budget_violation_rate"} <= set(records[-1])
    assert records[-1]["val_accuracy_mean"] > records[0]["val_accuracy_mean"]  # (the reward's scale moves with the multiplier)
    assert trained.controller.kind == {"end_to_end": "grpo", "stage2": "two_stage", "joint": "joint"}[policy]
    for learned, lookup, fits in _learned_vs_lookup(trained.controller, arrays, trained.val_ids):
        assert fits and learned > lookup + 0.2, (policy, learned, lookup)


def test_a_killed_training_resumed_from_its_checkpoint_ends_as_an_unbroken_one(tmp_path):
    arrays = toy_arrays(60)
    config = GRPOConfig(num_epochs=20, lr=3e-3, hidden_width=16, batch_size=32)
    straight = train_grpo(arrays, toy_rule(4), None, OPTIONS, BASE_VLM_SPACE.name, 26.0, NOISE, config,
                          checkpoint_dir=tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_after_12(epoch, record):
        if epoch == 12:
            raise Killed

    with pytest.raises(Killed):
        train_grpo(arrays, toy_rule(4), None, OPTIONS, BASE_VLM_SPACE.name, 26.0, NOISE, config,
                   on_epoch=kill_after_12, checkpoint_dir=tmp_path / "b")
    assert (tmp_path / "b" / "last.pt").is_file() and (tmp_path / "b" / "epoch_010.pt").is_file()
    resumed = train_grpo(arrays, toy_rule(4), None, OPTIONS, BASE_VLM_SPACE.name, 26.0, NOISE, config,
                         checkpoint_dir=tmp_path / "b", resume_dir=tmp_path / "b")
    assert [r["epoch"] for r in resumed.history] == list(range(1, 21))
    assert [r["val_reward_mean"] for r in resumed.history] == pytest.approx([r["val_reward_mean"] for r in straight.history])
    other = GRPOConfig(num_epochs=20, lr=1e-3, hidden_width=16, batch_size=32)
    with pytest.raises(ValueError, match="another GRPO config \\(lr differ\\)"):
        train_grpo(arrays, toy_rule(4), None, OPTIONS, BASE_VLM_SPACE.name, 26.0, NOISE, other, resume_dir=tmp_path / "b")


def _grpo_args(inputs, tmp_path, data_param="profiling_results", **extra: str) -> list[str]:
    args = {data_param: inputs["data"], "measured_table": inputs["measured"], "estimator": inputs["estimator"],
            "output_dir": str(tmp_path / "out"), "lr": "0.001", "model_path": BASE_VLM_DIR, "budgets_per_sample": "2", **extra}
    return [item for key, value in args.items() for item in (f"--{key}", value)]


def test_the_three_grpo_trainers_register_controllers_that_evaluate_controller_scores(
        tracking_store, controller_inputs, tmp_path, capsys):
    from entry_points import (
        evaluate_controller, train_grpo_controller, train_joint_controller, train_two_stage_controller,
    )

    assert train_grpo_controller.main(_grpo_args(controller_inputs, tmp_path, num_epochs="2", tensorboard="true")) == 0
    assert train_two_stage_controller.main(_grpo_args(controller_inputs, tmp_path, "results_dir", stage="stage1",
                                                      num_epochs_stage1="2")) == 0
    stage1 = next(r for r in _runs() if r.data.tags["entry_point"] == "train_two_stage_controller").info.run_id
    assert train_two_stage_controller.main(_grpo_args(
        controller_inputs, tmp_path, "results_dir", stage="stage2", num_epochs_stage2="2", stage1_checkpoint=stage1,
        latency_estimator_path=controller_inputs["estimator"])) == 0
    # live rollouts: the committed base VLM answers every drawn config, timed
    assert train_joint_controller.main(_grpo_args(controller_inputs, tmp_path, "results_dir", num_epochs="1",
                                                  reward_source="live", group_size="2", budgets_per_sample="1",
                                                  load_stage1_checkpoint=stage1)) == 0
    client = MlflowClient()
    versions = client.search_model_versions("name = 'budget-controller'")
    assert sorted(v.tags["controller_kind"] for v in versions) == ["grpo", "joint", "two_stage", "two_stage"]
    grpo = next(r for r in _runs() if r.data.tags["entry_point"] == "train_grpo_controller")
    assert {"train_reward_mean", "train_clip_ratio", "train_kl", "train_entropy", "val_budget_violation_rate",
            "test_accuracy_at_70", "test_adherence_min"} <= set(grpo.data.metrics)
    assert grpo.data.params["reward_source"] == "replay" and float(grpo.data.params["replay_noise_p50"]) > 0
    assert len(client.get_metric_history(grpo.info.run_id, "val_reward_mean")) == 2
    artifacts = {a.path for a in client.list_artifacts(grpo.info.run_id)}
    assert {"training_history.csv", "validation_history.csv", "controller", "checkpoints"} <= artifacts
    joint = next(r for r in _runs() if r.data.tags["entry_point"] == "train_joint_controller")
    assert joint.data.params["reward_source"] == "live" and joint.data.metrics["train_latency_mean"] > 0
    out = capsys.readouterr().out
    assert "end-to-end controller (GRPO)" in out and "joint two-stage controller (GRPO)" in out

    joint_version = next(v.version for v in versions if v.tags["controller_kind"] == "joint")
    assert evaluate_controller.main(["--controller", f"models:/budget-controller/{joint_version}", "--measured_table",
                                     controller_inputs["measured"], "--model_path", BASE_VLM_DIR]) == 0


@pytest.mark.parametrize("extra, expected", [
    ({"reward_source": "imagined"}, "parameter reward_source must be one of"),
    ({"group_size": "1"}, "parameter group_size must be >= 2"),
    ({"reward": "bonus"}, "parameter reward must be one of"),
])
def test_bad_grpo_input_is_one_line_and_leaves_no_run(extra, expected, tracking_store, controller_inputs, tmp_path, capsys):
    from entry_points import train_grpo_controller

    code = train_grpo_controller.main(_grpo_args(controller_inputs, tmp_path, num_epochs="1", **extra))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not [r for r in _runs() if r.info.status == "RUNNING"]


def test_stage2_refuses_a_controller_that_is_not_a_stage_one(tracking_store, controller_inputs, tmp_path, capsys):
    from entry_points import train_grpo_controller, train_two_stage_controller

    assert train_grpo_controller.main(_grpo_args(controller_inputs, tmp_path, num_epochs="1")) == 0
    grpo_run = next(r for r in _runs() if r.data.tags["entry_point"] == "train_grpo_controller").info.run_id
    code = train_two_stage_controller.main(_grpo_args(controller_inputs, tmp_path, "results_dir", stage="stage2",
                                                      stage1_checkpoint=grpo_run))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "not a stage-1 (tier) controller" in errors[0], errors
