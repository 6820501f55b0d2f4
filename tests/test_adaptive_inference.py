"""Adaptive inference (Experiment 8): the online calibration, the guardrail, the split generation path
against the plain answer, and the entry point end to end on a real SQLite store (the committed base
VLM, a small controller trained on toy data, a tiny estimator, a synthetic measured table), with the
contention experiment's background load started and stopped."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from core.adaptive.calibration import CalibrationError, OnlineCalibration
from core.adaptive.contention import CPULoad
from core.adaptive.experiment import heldout_requests
from core.adaptive.guardrail import Guardrail
from core.adaptive.inference import AdaptiveInference
from core.control.decision import config_grid, fit_output_length
from core.control.measured import split_calibration
from core.control.policies import knob_options
from core.control.supervised import ControllerArrays, Rule, TrainingConfig, train_controller
from core.knobs import BASE_VLM_SPACE, KnobConfig
from core.latency.estimator import EstimatorConfig, LatencyEstimator, train_estimator
from core.profiling.store import ProfileStore
from core.vlm.base_vlm import BaseVLMBackend
from core.vqa.suite import make_sample, sample_from_id
from tests.conftest import REPO_ROOT
from tests.helpers import synthetic_profile

OPTIONS = knob_options(BASE_VLM_SPACE)
GRID = config_grid(OPTIONS)
BASE_VLM_DIR = str(REPO_ROOT / "data" / "base_vlm")
DATASETS = ("synth_textvqa", "synth_countvqa", "synth_attrvqa")


# --- online calibration ----------------------------------------------------------------------------
def test_calibration_keeps_the_static_factor_until_it_has_seen_enough_then_follows_the_machine():
    calibration = OnlineCalibration(1.5, window=10, quantile=0.9, min_count=3)
    for _ in range(2):
        calibration.update({"vision": 4.0, "prefill": 4.0, "decode": 4.0}, {"vision": 1.0, "prefill": 2.0, "decode": 1.0})
    assert calibration.factors() == {"vision": 1.5, "prefill": 1.5, "decode": 1.5}
    calibration.update({"vision": 4.0, "prefill": 4.0, "decode": 4.0}, {"vision": 1.0, "prefill": 2.0, "decode": 0.0})
    assert calibration.factor("vision") == pytest.approx(4.0) and calibration.factor("prefill") == pytest.approx(2.0)
    assert calibration.factor("decode") == 1.5  # a request without decode steps says nothing about decode
    for _ in range(10):  # the window forgets the old machine
        calibration.update({"vision": 1.0, "prefill": 1.0, "decode": 1.0}, {"vision": 1.0, "prefill": 1.0, "decode": 1.0})
    assert calibration.factor("vision") == pytest.approx(1.0)
    assert calibration.drift({"vision": 1.0, "prefill": 1.0, "decode": 1.0}) == pytest.approx(1.0 / 1.5)

    frozen = OnlineCalibration(1.5, window=10, min_count=1, enabled=False)
    frozen.update({"vision": 9.0, "prefill": 9.0, "decode": 9.0}, {"vision": 1.0, "prefill": 1.0, "decode": 1.0})
    assert frozen.factors() == {"vision": 1.5, "prefill": 1.5, "decode": 1.5}
    assert frozen.drift({"vision": 1.0, "prefill": 1.0, "decode": 1.0}) == 1.0

    rng = np.random.default_rng(0)  # the running quantile is numpy's (linear) quantile of the window
    for window, quantile in ((7, 0.95), (50, 0.9), (50, 0.5)):
        running = OnlineCalibration(1.0, window=window, quantile=quantile, min_count=1)
        ratios = rng.lognormal(0.0, 0.3, 3 * window)
        for i, ratio in enumerate(ratios, start=1):
            running.update({"vision": ratio}, {"vision": 1.0})
            assert running.factor("vision") == pytest.approx(np.quantile(ratios[max(0, i - window):i], quantile), rel=1e-12)

    ewma = OnlineCalibration(1.0, method="ewma", ewma_alpha=0.5, min_count=1)
    for ratio in (2.0, 4.0):
        ewma.update({"vision": ratio}, {"vision": 1.0})
    assert ewma.factor("vision") == pytest.approx(3.0)


@pytest.mark.parametrize("kwargs, name", [({"window": 0}, "calibration_window"), ({"quantile": 1.0}, "calibration_quantile"),
                                          ({"method": "mean"}, "calibration_method")])
def test_bad_calibration_parameters_are_named(kwargs, name):
    with pytest.raises(CalibrationError, match=name):
        OnlineCalibration(1.0, **kwargs)


# --- the guardrail ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def estimator() -> LatencyEstimator:
    torch.set_num_threads(1)
    table = synthetic_profile(num_samples=8, num_runs=2, space=BASE_VLM_SPACE, noise=0.02)
    train = table[table["sample_id"].str[-1].isin(list("012345"))]
    model, _ = train_estimator(train, table.drop(train.index), EstimatorConfig(num_epochs=15, hidden_width=32, depth=2,
                                                                                lr=3e-3))
    return model


def test_the_guardrail_keeps_a_fitting_config_and_steps_down_within_the_tier_otherwise(estimator):
    prior = GRID["top_k"].to_numpy() + GRID["num_active_blocks"].to_numpy() / 10.0  # bigger is more accurate
    guardrail = Guardrail(estimator, OPTIONS, prior)
    sizes = np.array([12, 1, 2, 8, 8, 12, 36], dtype=np.float64)
    p90 = guardrail.stage_p90(sizes)
    factors = {"vision": 1.0, "prefill": 1.0, "decode": 1.0}
    full = int(np.flatnonzero((GRID["tier"] == "medium") & (GRID["top_k"] == 6) & (GRID["num_active_blocks"] == 8))[0])
    remaining = p90[:, 1] + 3 * p90[:, 2]
    assert guardrail.check(full, p90, 3, factors, remaining[full] + 1e-6).intervened is False

    in_tier = np.flatnonzero(GRID["tier"] == "medium")
    budget = float(np.median(remaining[in_tier]))
    decision = guardrail.check(full, p90, 3, factors, budget)
    fitting = in_tier[remaining[in_tier] <= budget]
    assert decision.intervened and decision.fits and decision.index in set(fitting)
    assert prior[decision.index] == prior[fitting].max()
    slow = guardrail.check(full, p90, 3, {"vision": 1.0, "prefill": 2.0, "decode": 2.0}, budget)  # a slower machine
    assert prior[slow.index] <= prior[decision.index]

    nothing = guardrail.check(full, p90, 3, factors, 1e-6)
    assert not nothing.fits and nothing.index == in_tier[np.argmin(remaining[in_tier])]
    assert Guardrail(estimator, OPTIONS, prior, enabled=False).check(full, p90, 3, factors, 1e-6).index == full


# --- the request path ------------------------------------------------------------------------------
def _toy_controller(directory, estimator, options: dict[str, list], width: int = 96, space_name: str = BASE_VLM_SPACE.name) -> str:
    """A supervised controller trained on toy data with feature widths `width` + `width` (the base VLM's 96)."""
    grid = config_grid(options)
    rng = np.random.default_rng(0)
    n = 60
    latency = np.tile(10.0 + 4 * grid["tier_index"].to_numpy() + grid["top_k"].to_numpy() / 2, (n, 1))
    arrays = ControllerArrays([f"toy:train:{i}" for i in range(n)], rng.normal(size=(n, width)).astype(np.float32),
                              rng.normal(size=(n, width)).astype(np.float32), rng.uniform(size=(n, len(grid))), latency,
                              latency.copy())
    rule = Rule(fit_output_length(rng.normal(size=(8, width)), np.full(8, 2.0)), 1.0, 0.97, 0)
    trained = train_controller(arrays, rule, estimator, options, space_name, 26.0,
                               TrainingConfig(num_epochs=2, stage="supervised"))
    return str(trained.controller.save(directory / "controller"))


@pytest.fixture(scope="module")
def controller_dir(tmp_path_factory, estimator) -> str:
    return _toy_controller(tmp_path_factory.mktemp("controller"), estimator, OPTIONS)


def test_an_adaptive_answer_is_the_plain_answer_of_the_config_it_used(controller_dir, estimator):
    from core.control.decision import LearnedController

    torch.set_num_threads(1)
    backend = BaseVLMBackend.from_pretrained(BASE_VLM_DIR)
    controller = LearnedController.load(controller_dir)
    session = AdaptiveInference(backend, controller, Guardrail(estimator, OPTIONS, controller.prior_accuracy),
                                OnlineCalibration(controller.latency_factor, min_count=1))
    for dataset, budget in zip(DATASETS, (1e6, 5.0, 30.0)):
        sample = make_sample(dataset, "test", 0)
        answer = session.answer(sample, budget)
        config = KnobConfig(answer.tier, answer.top_k, answer.num_active_blocks)
        assert answer.text == backend.answer(sample, config).text, dataset
        parts = answer.T_features_ms + answer.T_decision_ms + answer.T_vision_ms + answer.T_guardrail_ms
        assert parts + answer.T_prefill_ms + answer.T_decode_ms <= answer.T_total_ms + 1e-6
        assert answer.overhead_ms == pytest.approx(answer.T_decision_ms + answer.T_guardrail_ms + answer.T_calibration_ms)
    assert session.calibration.factor("prefill") != controller.latency_factor  # it learned from the requests


def test_adaptive_inference_runs_on_the_molmoe_arch_backend_as_on_the_base_vlm(tmp_path):
    """The same request path on molmoe_arch (tiny, CPU): features, tier vision and generation come from
    the backend's stages, and the answer is the backend's own answer of the config used."""
    from core.control.decision import LearnedController
    from core.knobs import MOLMOE_SPACE
    from core.vlm.molmoe_arch import MolmoeArchBackend

    torch.set_num_threads(1)
    options = knob_options(MOLMOE_SPACE)
    table = synthetic_profile(num_samples=6, num_runs=2, space=MOLMOE_SPACE, noise=0.02)
    molmoe_estimator, _ = train_estimator(table, table, EstimatorConfig(num_epochs=5, hidden_width=16, depth=1))
    backend = MolmoeArchBackend(size="tiny", device="cpu", seed=2)
    controller = LearnedController.load(_toy_controller(tmp_path, molmoe_estimator, options, width=backend.dims.d_model,
                                                        space_name=MOLMOE_SPACE.name))
    session = AdaptiveInference(backend, controller, Guardrail(molmoe_estimator, options, controller.prior_accuracy),
                                OnlineCalibration(controller.latency_factor, min_count=1))
    for budget in (1e6, 1e-3):
        sample = make_sample("synth_countvqa", "test", 1)
        answer = session.answer(sample, budget)
        config = KnobConfig(answer.tier, answer.top_k, answer.num_active_blocks)
        assert answer.text == backend.answer(sample, config).text
        assert answer.output_tokens == backend.answer(sample, config).output_tokens
    assert not answer.fits  # no config fits 1 µs: answered with the fastest in the tier, flagged


def test_the_background_load_is_gone_after_the_block_whatever_the_exit():
    with pytest.raises(RuntimeError):
        with CPULoad(1) as load:
            load.start()
            pids = load.pids
            assert load.running
            raise RuntimeError("a failing request")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_duty_cycled_load_spins_for_its_share_of_the_time():
    import psutil

    with CPULoad(1, duty=0.25, period_ms=20) as load:
        load.start()
        worker = psutil.Process(load.pids[0])
        time.sleep(0.3)  # the interpreter's start-up is all CPU
        before, started = sum(worker.cpu_times()[:2]), time.perf_counter()
        time.sleep(1.0)
        share = (sum(worker.cpu_times()[:2]) - before) / (time.perf_counter() - started)
    assert 0.1 < share < 0.5, share  # 0.25 of one core, give or take the scheduler


# --- the entry point -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured_table(tmp_path_factory) -> str:
    store = ProfileStore(tmp_path_factory.mktemp("measured"))
    for seed, dataset in enumerate(DATASETS):
        table = synthetic_profile(num_samples=6, num_runs=2, space=BASE_VLM_SPACE, seed=seed, dataset=dataset, noise=0.03)
        # the suite's own questions: the replay rebuilds each sample from its id and checks them
        store.append(table.assign(question=[sample_from_id(i).question for i in table["sample_id"]]))
    return str(store.results_dir)


def test_heldout_requests_are_the_tables_heldout_samples_and_warm_up_on_calibration_ones(measured_table):
    table = ProfileStore(measured_table).load()
    heldout = heldout_requests(table, measured_table, BASE_VLM_SPACE, 0, ["synth_attrvqa", "synth_textvqa"], 5, 3, 0,
                               (0.6, 1.0))
    split = split_calibration(table, 0.7, 0)
    expected = set(split.heldout.loc[split.heldout["dataset"].isin(["synth_attrvqa", "synth_textvqa"]), "sample_id"])
    assert {s.sample_id for s in heldout.requests} == expected and len(heldout.requests) == 4  # 2 held out per data set
    assert {s.sample_id for s in heldout.warmup} <= set(split.calibration["sample_id"]) and len(heldout.warmup) == 3
    assert {s.dataset for s in heldout.warmup} == {"synth_attrvqa", "synth_textvqa"}  # data sets in turn
    with pytest.raises(ValueError, match="parameter dataset: synth_countvqa is not in the measured table"):
        heldout_requests(table[table["dataset"] != "synth_countvqa"], measured_table, BASE_VLM_SPACE, 0,
                         ["synth_countvqa"], 5, 3, 0, (0.6,))


def _args(controller_dir: str, estimator_file: str, measured: str, **extra: str) -> list[str]:
    args = {"model_path": BASE_VLM_DIR, "controller_path": controller_dir, "estimator": estimator_file,
            "measured_table": measured, "num_samples": "2", "warmup": "2", "budget_fraction": "0.6,1.0", **extra}
    return [item for key, value in args.items() for item in (f"--{key}", value)]


@pytest.fixture(scope="module")
def estimator_file(tmp_path_factory, estimator) -> str:
    return str(estimator.save(tmp_path_factory.mktemp("estimator") / "estimator.pt"))


def test_adaptive_inference_reports_every_method_and_the_contention_ablation(tracking_store, controller_dir,
                                                                           estimator_file, measured_table, tmp_path):
    from entry_points import adaptive_inference

    assert adaptive_inference.main(_args(controller_dir, estimator_file, measured_table, contention="on",
                                         contention_workers="1", dataset="synth_attrvqa,synth_countvqa")) == 0
    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run.data.metrics
    for method in ("adaptive", "static_full", "lookup"):
        for p in ("60", "100"):
            assert {f"{method}_accuracy_at_{p}", f"{method}_adherence_at_{p}", f"{method}_latency_p99_ms_at_{p}"} <= set(metrics)
    assert {"adaptive_interventions_at_60", "adaptive_overhead_ms_mean", "l_full_ms_measured"} <= set(metrics)
    # the replay of the same controller on the same held-out samples, beside the live figures
    for p in ("60", "100"):
        assert {f"replay_accuracy_at_{p}", f"adaptive_minus_replay_accuracy_at_{p}"} <= set(metrics)
        assert 0 <= metrics[f"adaptive_replay_agreement_at_{p}"] <= 1
        assert metrics[f"adaptive_minus_replay_accuracy_at_{p}"] == pytest.approx(
            metrics[f"adaptive_accuracy_at_{p}"] - metrics[f"replay_accuracy_at_{p}"])
    assert run.data.params["heldout_samples"] == "6" and run.data.params["requests_per_run"] == "4"
    for setting in ("on", "off"):
        assert {f"contention_{setting}_adherence_{phase}" for phase in ("before", "during", "after")} <= set(metrics)
    assert run.data.params["resolved_controller_version"] == "path" and run.data.params["guardrail"] == "True"
    started = [int(p) for p in run.data.tags["contention_start_pids"].split(",")]
    for pid in started:  # every background process was stopped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    rows = pd.read_csv(client.download_artifacts(run.info.run_id, "adaptive/requests.csv", str(tmp_path)))
    assert set(rows["method"]) == {"adaptive", "static_full", "lookup"}
    comparison = rows[rows["phase"] == "all"]
    assert (comparison.groupby("method").size() == 2 * 2 * 2).all()  # 2 budgets x 2 data sets x 2 samples
    assert set(rows.loc[rows["phase"] != "all", "calibration"]) == {"on", "off"}
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/latency_vs_budget_over_time.png", "plots/calibration_factor_over_time.png"} <= paths


def test_a_budget_below_every_config_is_answered_by_the_fastest_and_flagged(tracking_store, controller_dir,
                                                                          estimator_file, measured_table, tmp_path):
    from entry_points import adaptive_inference

    assert adaptive_inference.main(_args(controller_dir, estimator_file, measured_table, latency_budget="0.01",
                                         dataset="synth_attrvqa", compare="false")) == 0
    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["adaptive_unfit_at_fixed"] == 1.0 and run.data.metrics["adaptive_adherence_at_fixed"] == 0.0


def test_a_controller_of_another_knob_space_is_refused_in_one_line(tracking_store, estimator, estimator_file,
                                                                   measured_table, tmp_path, capsys):
    from entry_points import adaptive_inference

    other = {**OPTIONS, "top_k": [1, 2, 3, 5, 6]}
    controller = _toy_controller(tmp_path, estimator, other)
    capsys.readouterr()  # the training's progress bar
    assert adaptive_inference.main(_args(controller, estimator_file, measured_table)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "knob space" in err[0] and "controller_path" in err[0], err


@pytest.mark.parametrize("extra, expected", [
    ({"budget_fraction": "0.6,-1"}, "parameter budget_fraction"),
    ({"latency_budget": "-5"}, "parameter latency_budget"),
    ({"dataset": "synth_nope"}, "synth_nope"),
    ({"controller_path": "models:/budget-controller@champion"}, "budget-controller"),
    ({"calibration_quantile": "1.5"}, "parameter calibration_quantile"),
    ({"contention_duty": "0"}, "parameter contention_duty"),
    ({"request_source": "nope"}, "parameter request_source"),
    ({"split": "val"}, "request_source=heldout"),
])
def test_bad_input_is_one_line_and_no_run(extra, expected, tracking_store, controller_dir, estimator_file,
                                          measured_table, capsys):
    from entry_points import adaptive_inference

    assert adaptive_inference.main(_args(controller_dir, estimator_file, measured_table, **extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    client = MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


# --- the served endpoint ---------------------------------------------------------------------------
def test_the_served_adaptive_vlm_answers_json_requests_and_refuses_bad_ones_in_one_line(
        tracking_store, subprocess_env, controller_dir, estimator_file, tmp_path):
    import mlflow

    from tracking.adaptive_model import MODEL_NAME, log_adaptive_vlm
    from tracking.model_refs import VLMReference
    from tracking.pyfunc_models import encode_image
    from tracking.serving import ModelServer

    sample = make_sample("synth_textvqa", "test", 1)
    example = pd.DataFrame({"image": [encode_image(sample.image)], "question": [sample.question], "budget_ms": [1e4]})
    with mlflow.start_run():
        version = log_adaptive_vlm(VLMReference("base_vlm", BASE_VLM_DIR), controller_dir, estimator_file,
                                   {"base_model": "base-vlm/7", "controller": "budget-controller/3", "estimator": "path"},
                                   example, register=True)
    tags = MlflowClient().get_model_version(MODEL_NAME, str(version)).tags
    assert tags["base_model_version"] == "base-vlm/7" and tags["estimator_version"] == "path"

    with ModelServer(f"models:/{MODEL_NAME}@champion", tmp_path / "server.log", env=subprocess_env) as server:
        status, body = server.invoke(pd.concat([example, example.assign(budget_ms=1e-3)], ignore_index=True))
        assert status == 200, body
        answers = pd.DataFrame(body["predictions"])
        backend = BaseVLMBackend.from_pretrained(BASE_VLM_DIR)
        first = answers.iloc[0]
        assert first["answer"] == backend.answer(sample, KnobConfig(first["tier"], int(first["top_k"]),
                                                                    int(first["num_active_blocks"]))).text
        assert answers["fits"].tolist() == [True, False] and (answers["T_total_ms"] > 0).all()
        assert {"T_vision_ms", "T_prefill_ms", "T_decode_ms", "guardrail_intervened"} <= set(answers.columns)
        for bad, field in ((example.assign(image=""), "field image missing"), (example.assign(budget_ms=0.0), "field budget_ms"),
                           (example.assign(image="bm90IGFuIGltYWdl"), "field image is not a base64 PNG")):
            status, body = server.invoke(bad)
            # MLflow's server puts the request's repr first; the model's one line comes last after "Error: "
            last = body["message"].splitlines()[-1]
            assert status == 400 and last.startswith("Error: request row 0: ") and field in last, body
