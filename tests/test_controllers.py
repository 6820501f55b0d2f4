"""The learned budget controllers: the decision rule, supervised training on a toy grid, and the three
controller entry points end to end on a real SQLite store (tiny controller data built from the
committed base VLM, a synthetic measured table of suite test samples, a tiny latency estimator)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from core.control.decision import (
    ControllerError,
    LearnedController,
    calibrate_factor,
    choose,
    choose_tier_then_prior,
    choose_two_stage,
    config_grid,
    fit_output_length,
    joint_log_prob,
)
from core.control.policies import (ControllerConfig, ControllerNet, StackedNumpyForward, TierControllerNet, knob_options,
                                   stage2_config)
from core.control.supervised import (ControllerArrays, Rule, TrainingConfig, best_configs, label_accuracy,
                                     train_controller)
from core.knobs import BASE_VLM_SPACE, KNOBS, TIERS
from core.latency.estimator import EstimatorConfig, LatencyEstimator, train_estimator
from tests.conftest import REPO_ROOT
from tests.helpers import synthetic_profile

OPTIONS = knob_options(BASE_VLM_SPACE)
GRID = config_grid(OPTIONS)
DATASETS = ("synth_textvqa", "synth_countvqa", "synth_attrvqa")
BASE_VLM_DIR = str(REPO_ROOT / "data" / "base_vlm")  # the tracking store's fixture moves the cwd


@pytest.fixture(scope="module")
def estimator_file(tmp_path_factory) -> str:
    """A small estimator trained on a synthetic base_vlm profile (latency law of tests.helpers.moe_law)."""
    torch.set_num_threads(1)
    table = synthetic_profile(num_samples=8, num_runs=2, space=BASE_VLM_SPACE, noise=0.02)
    train = table[table["sample_id"].str[-1].isin(list("012345"))]
    model, _ = train_estimator(train, table.drop(train.index), EstimatorConfig(num_epochs=15, hidden_width=32, depth=2,
                                                                                lr=3e-3))
    return str(model.save(tmp_path_factory.mktemp("estimator") / "estimator.pt"))


# --- the decision rule ---------------------------------------------------------------------------
def test_the_rule_picks_the_most_likely_config_that_fits_and_the_fastest_when_none_does():
    rng = np.random.default_rng(0)
    score, upper = rng.normal(size=(500, 75)), rng.uniform(5, 30, size=(500, 75))
    budget = rng.uniform(3, 30, size=500)
    index, fits = choose(score, upper, budget)
    at = np.arange(500)
    fitting = upper <= budget[:, None]
    assert (fits == fitting.any(axis=1)).all() and 0 < fits.sum() < 500
    assert (upper[at, index][fits] <= budget[fits]).all()  # never a config over B when one fits
    assert (score[at, index][fits] == np.where(fitting, score, -np.inf).max(axis=1)[fits]).all()
    assert (index[~fits] == upper[~fits].argmin(axis=1)).all()


def test_stage_one_keeps_the_most_likely_tier_that_fits_then_the_most_accurate_config_in_it():
    tier_index = GRID["tier_index"].to_numpy()
    prior = np.linspace(0, 1, 75)  # the slowest configs are the most accurate
    upper = np.tile(np.arange(75, dtype=float), (2, 1))
    tier_log_prob = np.log(np.array([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]]))
    index, fits = choose_tier_then_prior(tier_log_prob, prior, tier_index, upper, np.array([74.0, 40.0]))
    assert fits.all()
    assert index[0] == 74  # high fits: its most accurate config
    assert tier_index[index[1]] == 1 and index[1] == 40  # high does not fit: medium, and its best that fits


def test_joint_log_prob_sums_the_heads_in_grid_order():
    log_probs = {"tier": np.log([[0.2, 0.3, 0.5]]), "top_k": np.log([[0.1, 0.1, 0.1, 0.2, 0.5]]),
                 "num_active_blocks": np.log([[0.5, 0.2, 0.1, 0.1, 0.1]])}
    joint = joint_log_prob(log_probs)[0]
    row = GRID[(GRID["tier"] == "medium") & (GRID["top_k"] == 6) & (GRID["num_active_blocks"] == 4)].index[0]
    assert np.isclose(joint[row], np.log(0.3 * 0.5 * 0.5)) and np.isclose(np.exp(joint).sum(), 1.0)


def test_the_calibration_factor_is_the_quantile_of_measured_over_predicted():
    ratios = np.arange(1, 101) / 100
    assert calibrate_factor(ratios, 0.97) == pytest.approx(np.quantile(ratios, 0.97))


def test_the_output_length_model_reads_the_answer_length_from_the_question():
    rng = np.random.default_rng(0)
    kind = rng.integers(0, 2, 200)
    question = np.column_stack([kind + rng.normal(0, 0.05, 200), rng.normal(size=200)])
    model = fit_output_length(question, 2 + 3 * kind)
    assert (model.predict(question) == 2 + 3 * kind).all()


# --- training on a toy grid -----------------------------------------------------------------------
def toy_arrays(n: int = 300, seed: int = 0) -> ControllerArrays:
    """Two kinds of question. Kind A is answered only at the high tier; kind B only with top_k 6 and 8
    blocks (any tier). Latency per config = 10 + 4 tier + top_k step + block step (ms; full = 26 ms):
    both needs cost 18 ms, so from f = 0.7 a controller that reads the question answers every sample,
    while a static config must pay 26 ms for both."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    tier = GRID["tier_index"].to_numpy()
    k = GRID["top_k"].map({v: i for i, v in enumerate(OPTIONS["top_k"])}).to_numpy()
    b = GRID["num_active_blocks"].map({v: i for i, v in enumerate(OPTIONS["num_active_blocks"])}).to_numpy()
    latency = np.tile(10.0 + 4 * tier + k + b, (n, 1))
    accuracy = np.where(kind[:, None] == 0, np.where(tier == 2, 1.0, 0.2), np.where((k == 4) & (b == 4), 1.0, 0.3))
    question = np.column_stack([kind + rng.normal(0, 0.1, n), rng.normal(size=(n, 3))]).astype(np.float32)
    return ControllerArrays([f"toy:train:{i}" for i in range(n)], question, rng.normal(size=(n, 2)).astype(np.float32),
                            accuracy, latency, latency.copy())


def toy_rule(dim: int) -> Rule:
    return Rule(fit_output_length(np.zeros((4, dim)), np.full(4, 2.0)), 1.0, 0.97, 0)


def test_labels_are_the_most_accurate_config_under_the_budget_ties_to_the_faster():
    arrays = toy_arrays(4)
    labels = best_configs(arrays.accuracy, arrays.upper_ms, np.full(4, 18.0))
    assert (arrays.upper_ms[np.arange(4), labels] == 18.0).all() and (arrays.accuracy[np.arange(4), labels] == 1.0).all()
    assert (best_configs(arrays.accuracy, arrays.upper_ms, np.full(4, 1.0)) == 0).all()  # none fits: the fastest


def test_labels_weigh_in_the_data_sets_mean_accuracy_so_luck_does_not_pick_the_cheap_config():
    # Two configs of one data set, the cheap one right on a third of the samples, the dear one on all but
    # one: the sample's own accuracy labels the cheap config for the samples it happened to get right.
    accuracy = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    upper = np.tile([10.0, 20.0], (6, 1))
    arrays = ControllerArrays([f"synth_countvqa:train:{i}" for i in range(6)], np.zeros((6, 1), np.float32),
                              np.zeros((6, 0), np.float32), accuracy, upper, upper)
    budget = np.full(6, 25.0)
    assert list(best_configs(label_accuracy(arrays, arrays, 0.0), upper, budget)) == [0, 1, 1, 0, 1, 0]
    smoothed = label_accuracy(arrays, arrays, 0.5)
    assert np.allclose(smoothed[0], [0.5 + 0.5 / 2, 0.5 + 0.5 * 5 / 6])
    assert list(best_configs(smoothed, upper, budget)) == [1, 1, 1, 0, 1, 1]  # only a sample the dear one misses
    assert list(best_configs(label_accuracy(arrays, arrays, 1.0), upper, budget)) == [1] * 6
    with pytest.raises(ControllerError, match="label_prior_weight"):
        TrainingConfig(label_prior_weight=1.5).validate()


@pytest.mark.parametrize("stage", ["supervised", "stage1"])
def test_training_learns_a_budget_dependent_best_config_above_the_lookup(stage, estimator_file):
    arrays = toy_arrays()
    records = []
    trained = train_controller(arrays, toy_rule(4), LatencyEstimator.load(estimator_file), OPTIONS, BASE_VLM_SPACE.name,
                               26.0, TrainingConfig(num_epochs=25, lr=3e-3, stage=stage, hidden_width=64, dropout=0.0),
                               lambda epoch, record: records.append(record))
    assert len(records) == 25 and {"train_loss", "val_accuracy_mean", "val_budget_violation_rate",
                                   "val_label_accuracy_tier"} <= set(records[-1])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    controller, val = trained.controller, arrays.take(np.array([int(s.split(":")[-1]) for s in trained.val_ids]))
    for fraction in (0.75, 0.85, 0.95):
        budget = np.full(len(val.sample_ids), fraction * 26.0)
        index, fits = controller.choose(controller.log_probs(_requests(val), budget), val.upper_ms, budget)
        learned = val.accuracy[np.arange(len(index)), index].mean()
        fitting = val.upper_ms[0] <= budget[0]  # a lookup: one static config, most accurate on average that fits
        lookup = val.accuracy[:, fitting].mean(axis=0).max()
        assert fits.all() and (val.upper_ms[np.arange(len(index)), index] <= budget).all()
        if stage == "supervised":
            assert learned > lookup + 0.2, (fraction, learned, lookup)
        else:  # the tier alone: kind A's tier is learned, kind B keeps the prior's best config in its tier
            assert learned >= lookup, (fraction, learned, lookup)


def _requests(arrays: ControllerArrays) -> pd.DataFrame:
    frame = pd.DataFrame(arrays.question, columns=[f"q_emb_{j}" for j in range(arrays.question.shape[1])])
    return frame.join(pd.DataFrame(arrays.global_view, columns=[f"gv_{j}" for j in range(arrays.global_view.shape[1])]))


def test_the_nets_heads_follow_the_knob_space():
    config = ControllerConfig(question_dim=4, global_view_dim=2, options=OPTIONS)
    out = ControllerNet(config)(torch.rand(3), torch.rand(3, 6))
    assert {k: v.shape for k, v in out.items()} == {"tier": (3, 3), "top_k": (3, 5), "num_active_blocks": (3, 5)}
    stage1 = TierControllerNet(ControllerConfig(question_dim=4, global_view_dim=2, use_global_view=False, options=OPTIONS))
    assert set(stage1(torch.rand(3), torch.rand(3, 4))) == {"tier"}


def test_the_numpy_forward_of_small_batches_is_the_torch_forward():
    net = ControllerNet(ControllerConfig(question_dim=4, global_view_dim=2, options=OPTIONS)).eval()
    net.fit_scalers(torch.randn(50, 6) * 3 + 1)
    fraction, features = torch.rand(7), torch.randn(7, 6)
    with torch.no_grad():
        expected = net(fraction, features)
    for knob, logits in net.forward_numpy(fraction.numpy(), features.numpy()).items():
        np.testing.assert_allclose(logits, expected[knob].numpy(), rtol=1e-4, atol=1e-5)
    # one request at a time: the budget's term is computed once per fraction and kept; a repeat is the same
    for _ in range(2):
        for i in range(len(fraction)):
            one = net.forward_numpy(fraction.numpy()[i:i + 1], features.numpy()[i:i + 1])
            for knob, logits in one.items():
                np.testing.assert_allclose(logits[0], expected[knob].numpy()[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_global_view", [True, False])
def test_stage_1_and_2_stacked_in_one_numpy_chain_give_each_nets_own_logits(use_global_view):
    first = TierControllerNet(ControllerConfig(question_dim=4, global_view_dim=3, use_global_view=use_global_view,
                                               options=OPTIONS)).eval()
    second = ControllerNet(stage2_config(first.config, hidden_width=48)).eval()  # another width: block-diagonal
    for net in (first, second):
        net.fit_scalers(torch.randn(40, net.feature_mean.numel()) * 2 + 1)
    stacked = StackedNumpyForward([first, second])
    rng = np.random.default_rng(0)
    for _ in range(3):
        fraction, q, gv = rng.uniform(0.3, 1.2, size=1), rng.normal(size=(1, 4)), rng.normal(size=(1, 3))
        got = stacked(fraction, q, gv)
        for net, out in zip((first, second), got):
            features = np.hstack([q, gv]) if net.uses_global_view else q
            for knob, logits in net.forward_numpy(fraction, features).items():
                np.testing.assert_allclose(out[knob], logits, rtol=1e-4, atol=1e-5)
    assert stacked.current()
    second.load_state_dict(second.state_dict())  # new weights: the stack is stale
    assert not stacked.current()


def test_the_single_request_rule_and_length_are_the_batch_ones():
    rng = np.random.default_rng(3)
    score, upper = rng.normal(size=(40, 75)), rng.uniform(10, 40, size=(40, 75))
    budget = rng.uniform(5, 45, size=40)  # some rows fit nothing: the fastest config, flagged
    index, fits = choose(score, upper, budget)
    assert (~fits).any() and fits.any()
    for i in range(40):
        one, one_fits = choose(score[i:i + 1], upper[i:i + 1], budget[i:i + 1])
        assert (one[0], one_fits[0]) == (index[i], fits[i])
    tier_lp, top_k_lp, blocks_lp = rng.normal(size=(40, 3)), rng.normal(size=(40, 3, 5)), rng.normal(size=(40, 3, 5))
    index, fits = choose_two_stage(tier_lp, top_k_lp, blocks_lp, upper, budget)
    assert (~fits).any() and fits.any()
    for i in range(40):
        one, one_fits = choose_two_stage(tier_lp[i:i + 1], top_k_lp[i:i + 1], blocks_lp[i:i + 1], upper[i:i + 1],
                                         budget[i:i + 1])
        assert (one[0], one_fits[0]) == (index[i], fits[i])
    model = fit_output_length(rng.normal(size=(30, 6)), rng.integers(1, 12, size=30))
    question = rng.normal(size=(25, 6)) * 3
    assert [model.predict_one(q[None]) for q in question] == model.predict(question).tolist()


def test_a_saved_controller_decides_as_before(tmp_path, estimator_file):
    arrays = toy_arrays(60)
    trained = train_controller(arrays, toy_rule(4), LatencyEstimator.load(estimator_file), OPTIONS, BASE_VLM_SPACE.name,
                               26.0, TrainingConfig(num_epochs=2, stage="supervised"))
    requests = _requests(arrays).assign(text_tokens=8, **{f"crops_{t}": c for t, c in zip(TIERS, (1, 2, 8))},
                                        **{f"vision_tokens_{t}": (c + 1) * 4 for t, c in zip(TIERS, (1, 2, 8))})
    before = trained.controller.decide(requests, 20.0)
    after = LearnedController.load(trained.controller.save(tmp_path / "c")).decide(requests, 20.0)
    pd.testing.assert_frame_equal(before, after)
    one_by_one = pd.concat([trained.controller.decide(requests.iloc[i:i + 1], 20.0) for i in range(len(requests))],
                           ignore_index=True)  # the numpy net and the latency cache of single requests
    pd.testing.assert_frame_equal(before, one_by_one, check_exact=False)
    assert (before.loc[before["fits"], "T_total_upper_ms"] <= 20.0).all() and list(before.columns[:3]) == list(KNOBS)
    # the request path ranks by logits: each head's normaliser shifts every candidate alike
    c, budget = trained.controller, np.linspace(8.0, 30.0, len(arrays.sample_ids))
    for rows in (slice(0, 5), slice(0, None)):  # the numpy net, and the torch net of a large batch
        normalised = c.choose(c.head_log_probs(arrays.question[rows], arrays.global_view[rows], budget[rows]),
                              arrays.upper_ms[rows], budget[rows])[0]
        raw = c.choose(c.head_log_probs(arrays.question[rows], arrays.global_view[rows], budget[rows], normalise=False),
                       arrays.upper_ms[rows], budget[rows])[0]
        assert (normalised == raw).all()


# --- the entry points, end to end -------------------------------------------------------------------
def _runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def controller_inputs(tmp_path_factory, estimator_file) -> dict[str, str]:
    """Paths: tiny controller data (3 train + 1 val samples per data set, committed base VLM), a measured
    table of 4 test samples per data set (questions from the suite, synthetic latency and accuracy),
    the same table without accuracy, and the estimator."""
    from core.control.data import ControllerDataConfig, build_controller_data
    from core.profiling.store import ProfileStore
    from core.vlm.base_vlm import BaseVLMBackend
    from core.vqa.suite import make_sample

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("controllers")
    backend = BaseVLMBackend.from_pretrained(BASE_VLM_DIR)
    build_controller_data(backend, root / "data", ControllerDataConfig(train_samples=3, val_samples=1, chunk_size=4),
                          LatencyEstimator.load(estimator_file), progress=False)
    measured, without_accuracy = ProfileStore(root / "measured"), ProfileStore(root / "no_accuracy")
    for seed, dataset in enumerate(DATASETS):
        table = synthetic_profile(num_samples=4, num_runs=3, space=BASE_VLM_SPACE, seed=seed, dataset=dataset, noise=0.03)
        questions = {f"{dataset}:test:{i}": make_sample(dataset, "test", i).question for i in range(4)}
        table = table.assign(question=table["sample_id"].map(questions))
        measured.append(table)
    # A latency-only table (the MolmoE-sized backend answers with random weights): no accuracy to score.
    without_accuracy.append(synthetic_profile(num_samples=4, num_runs=1).assign(accuracy=float("nan")))
    return {"data": str(root / "data"), "measured": str(root / "measured"), "no_accuracy": str(root / "no_accuracy"),
            "estimator": estimator_file, "root": str(root)}


def _train_args(inputs: dict[str, str], tmp_path, **extra: str) -> list[str]:
    args = {"profiling_results": inputs["data"], "measured_table": inputs["measured"], "estimator": inputs["estimator"],
            "output_dir": str(tmp_path / "out"), "num_epochs": "2", "lr": "0.001", "model_path": BASE_VLM_DIR, **extra}
    return [item for key, value in args.items() for item in (f"--{key}", value)]


def test_trainers_register_controllers_that_evaluate_controller_scores_with_every_yardstick(
        tracking_store, controller_inputs, tmp_path):
    from entry_points import evaluate_controller, train_supervised_controller, train_two_stage_controller

    assert train_supervised_controller.main(_train_args(controller_inputs, tmp_path, tensorboard="true")) == 0
    two_stage = ["--results_dir", controller_inputs["data"], "--measured_table", controller_inputs["measured"],
                 "--estimator", controller_inputs["estimator"], "--output_dir", str(tmp_path / "out"),
                 "--num_epochs_stage1", "2", "--stage", "stage1", "--model_path", BASE_VLM_DIR]
    assert train_two_stage_controller.main(two_stage) == 0
    client = MlflowClient()
    versions = {v.version: v for v in client.search_model_versions("name = 'budget-controller'")}
    assert {v.tags["controller_kind"] for v in versions.values()} == {"supervised", "two_stage"}
    supervised = next(r for r in _runs() if r.data.tags["entry_point"] == "train_supervised_controller")
    assert {"train_loss", "val_budget_violation_rate", "test_accuracy_at_70", "test_adherence_min",
            "test_accuracy_auc_synth_textvqa"} <= set(supervised.data.metrics)
    assert len(client.get_metric_history(supervised.info.run_id, "val_accuracy_mean")) == 2
    artifacts = {a.path for a in client.list_artifacts(supervised.info.run_id)}
    assert {"training_history.csv", "validation_history.csv", "controller"} <= artifacts
    events = list((tmp_path / "out" / supervised.info.run_id / "tensorboard").glob("events.out.tfevents.*"))
    assert events

    assert evaluate_controller.main(["--controller", "models:/budget-controller/1", "--measured_table",
                                     controller_inputs["measured"], "--budget_fractions", "0.75",
                                     "--model_path", BASE_VLM_DIR]) == 0
    (evaluation,) = [r for r in _runs() if r.data.tags["entry_point"] == "evaluate_controller"]
    metrics = evaluation.data.metrics
    for prefix in ("", "static_full_", "lookup_", "lookup_dataset_", "oracle_"):
        assert {f"{prefix}test_accuracy_at_50", f"{prefix}test_adherence_at_75", f"{prefix}test_accuracy_auc",
                f"{prefix}test_oracle_share_at_100_synth_attrvqa"} <= set(metrics), prefix
    assert "test_knob_accuracy_all" in metrics and float(evaluation.data.params["l_full_ms"]) > 0
    assert "calibration_split_seed" in evaluation.data.params
    paths = {a.path for folder in ("evaluation", "plots") for a in client.list_artifacts(evaluation.info.run_id, folder)}
    assert {"evaluation/knob_distribution.csv", "evaluation/decisions.csv", "plots/accuracy_vs_budget.png",
            "plots/adherence_vs_budget.png"} <= paths
    rows = pd.read_csv(client.download_artifacts(evaluation.info.run_id, "evaluation/decisions.csv", str(tmp_path)))
    assert set(rows["method"]) == {"controller", "static_full", "lookup", "lookup_dataset", "oracle"}

    import mlflow

    model = mlflow.pyfunc.load_model("models:/budget-controller/1")
    knobs = model.predict(pd.DataFrame({"sample_id": ["synth_attrvqa:test:0", "synth_countvqa:test:1"],
                                        "question": ["", ""], "image": ["", ""], "budget_ms": [1e6, 1e-3]}))
    assert list(knobs.columns[:3]) == list(KNOBS) and knobs["fits"].tolist() == [True, False]


@pytest.mark.parametrize("case, expected", [
    ("no_accuracy", "field accuracy must lie in [0, 1]"),
    ("fraction", "parameter budget_fractions: budget fraction -0.2 must be a finite number > 0"),
    ("alias", "cannot be resolved"),
    ("stage2", "parameter stage1_checkpoint: stage2 needs the trained stage-1 controller"),
])
def test_bad_trainer_input_is_one_line_and_leaves_no_run(case, expected, tracking_store, controller_inputs, tmp_path, capsys):
    from entry_points import train_supervised_controller, train_two_stage_controller

    if case == "stage2":
        code = train_two_stage_controller.main(["--stage", "stage2"])
    else:
        extra = {"no_accuracy": {"measured_table": controller_inputs["no_accuracy"]},
                 "fraction": {"budget_fractions": "0.7,-0.2"},
                 "alias": {"estimator": "models:/latency-estimator@nonexistent"}}[case]
        code = train_supervised_controller.main(_train_args(controller_inputs, tmp_path, **extra))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not [r for r in _runs() if r.info.status == "RUNNING"]


def test_a_controller_of_another_knob_space_than_the_table_is_refused(tracking_store, controller_inputs, tmp_path, capsys):
    # A controller saved as a directory (a trainer's output_dir/<run id>/controller) is a valid reference.
    from core.profiling.store import ProfileStore
    from entry_points import evaluate_controller

    trained = train_controller(toy_arrays(20), toy_rule(4), LatencyEstimator.load(controller_inputs["estimator"]), OPTIONS,
                               BASE_VLM_SPACE.name, 26.0, TrainingConfig(num_epochs=1))
    directory = trained.controller.save(tmp_path / "controller")
    # The MolmoE-sized backend's grid: the same tiers, other top_k and block options.
    ProfileStore(tmp_path / "other").append(synthetic_profile(num_samples=4, num_runs=2, dataset="synth_attrvqa"))
    code = evaluate_controller.main(["--controller", str(directory), "--measured_table", str(tmp_path / "other"),
                                     "--model_path", BASE_VLM_DIR])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "field top_k has options [4, 6, 8, 10, 12], the controller was trained" in errors[0], errors
    assert not _runs()
