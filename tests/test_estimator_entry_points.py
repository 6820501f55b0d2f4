"""The latency estimator through MLflow: train_estimator, evaluate_estimator, visualize_estimator,
promote and tune on a real SQLite store, the registered pyfunc, bad input, and the pipeline's steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from core.latency.estimator import EstimatorConfig, LatencyEstimator
from core.profiling.store import ProfileStore
from entry_points import evaluate_estimator, train_estimator, tune, visualize_estimator
from entry_points import promote as promote_ep
from mlflow_projects import pipeline
from tests.helpers import synthetic_profile
from tracking.cli import exit_on_input_error

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ("loss", "mae_prefill", "mae_decode", "rel_error_prefill", "rel_error_decode")
HEADLINE = ("mape_prefill", "mape_decode", "r2_prefill", "r2_decode", "within10_prefill", "within10_decode")


def _runs(entry_point: str | None = None, status: str | None = None) -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    return [r for r in runs if (status is None or r.info.status == status)
            and (entry_point is None or r.data.tags.get("entry_point") == entry_point)]


def _artifacts(run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in MlflowClient().list_artifacts(run_id, path):
        out |= _artifacts(run_id, item.path) if item.is_dir else {item.path}
    return out


def _ok(main, argv: list[str]) -> None:
    assert exit_on_input_error(lambda: main(argv)) == 0


# --- the experiment end to end --------------------------------------------------------------------

def test_train_evaluate_visualize_promote_and_load_the_champion(tracking_store, synthetic_profile_dir, tmp_path, capsys):
    _ok(train_estimator.main, ["--results_dir", str(synthetic_profile_dir), "--num_epochs", "10",
                               "--output_dir", str(tmp_path / "outputs")])
    (run,) = _runs("train_estimator", "FINISHED")
    run_id, metrics, client = run.info.run_id, run.data.metrics, MlflowClient()
    assert run.data.params["batch_size"] == "64" and run.data.params["train_split"] == "0.8"

    # Per-epoch curves under the names the README documents, one point per epoch, for train and val.
    for split in ("train", "val"):
        for name in EPOCH_METRICS:
            history = client.get_metric_history(run_id, f"{split}_{name}")
            assert [m.step for m in history] == list(range(1, 11)), f"{split}_{name}"
    # Best and every-10-epoch checkpoints, the held-out-config model, the split, the history.
    artifacts = _artifacts(run_id)
    assert {"checkpoints/best.pt", "checkpoints/epoch_010.pt", "heldout_config/checkpoints/best.pt",
            "split/split.json", "training/history.json", "evaluation/per_config_test.csv", "report.md"} <= artifacts
    # No sample in two splits; the splits are MLflow dataset inputs with their contexts.
    split = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="split/split.json")).read_text())
    train_ids, val_ids, test_ids = (set(split["by_sample"][k]) for k in ("train", "val", "test"))
    assert train_ids and val_ids and test_ids
    assert not (train_ids & val_ids or train_ids & test_ids or val_ids & test_ids)
    assert split["heldout_config"] == {**split["heldout_config"], "knob": "top_k", "value": 8}
    contexts = {tag.value for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"}
    assert contexts == {"training", "validation", "test"}
    # Held-out samples, held-out config and both baselines, under the documented metric names.
    for prefix in ("test_", "heldout_config_", "baseline_linear_test_", "baseline_analytic_test_",
                   "baseline_linear_heldout_config_", "baseline_analytic_heldout_config_"):
        for name in HEADLINE:
            assert np.isfinite(metrics[f"{prefix}{name}"]), prefix + name
    # The known law of the synthetic table has an interaction (blocks x tokens x top_k) a linear
    # model in these features cannot express; the MLP learns it.
    assert metrics["test_mape_prefill"] < metrics["baseline_linear_test_mape_prefill"]
    # the promotion metric: the mean MAPE over the three predicted components
    assert metrics["test_mape_mean"] == pytest.approx(np.mean([metrics[f"test_mape_{c}"] for c in ("vision", "prefill", "decode")]))
    assert "run " + run_id in capsys.readouterr().out

    # The registered pyfunc: configs + token counts in, ms out, total = vision + prefill + (L-1) x decode.
    model = mlflow.pyfunc.load_model("models:/latency-estimator/1")
    configs = pd.DataFrame({"tier": ["low", "medium", "high"], "top_k": [4, 8, 12], "num_active_blocks": [8, 12, 16],
                            "vision_tokens": [432, 1008, 1872], "text_tokens": [20, 40, 80], "crops": [2, 6, 12],
                            "output_tokens": [1, 5, 9]})
    out = model.predict(configs)
    assert len(out) == 3 and (out["T_prefill_ms_p90"] >= out["T_prefill_ms"]).all()
    expected = out["T_vision_ms"] + out["T_prefill_ms"] + np.array([0, 4, 8]) * out["T_decode_per_token_ms"]
    np.testing.assert_allclose(out["T_total_ms"], expected, rtol=1e-9)
    by_param = model.predict(configs.drop(columns="output_tokens"), params={"output_tokens": 3})
    np.testing.assert_allclose(by_param["T_total_ms"] - by_param["T_vision_ms"] - by_param["T_prefill_ms"],
                               2 * by_param["T_decode_per_token_ms"], rtol=1e-9)

    # evaluate_estimator on the run: the same held-out rows give the same figures.
    _ok(evaluate_estimator.main, ["--model", run_id, "--results_dir", str(synthetic_profile_dir)])
    (evaluation,) = _runs("evaluate_estimator", "FINISHED")
    for prefix in ("test_", "heldout_config_"):
        for name in HEADLINE:
            assert evaluation.data.metrics[f"{prefix}{name}"] == pytest.approx(metrics[f"{prefix}{name}"], rel=1e-6)
    assert {"evaluation/estimator_evaluation.json", "evaluation/per_config_test.csv",
            "evaluation/per_config_heldout_config.csv"} <= _artifacts(evaluation.info.run_id)

    # visualize_estimator: its figures and summary.json.
    _ok(visualize_estimator.main, ["--model", "models:/latency-estimator/1", "--results_dir", str(synthetic_profile_dir)])
    (figures,) = _runs("visualize_estimator", "FINISHED")
    assert {"plots/pred_vs_true_test.png", "plots/error_distribution_test.png", "plots/errors_by_knob_test.png",
            "plots/pred_vs_true_heldout_config.png", "plots/training_curves.png", "summary.json"} <= _artifacts(figures.info.run_id)

    # promote by held-out MAPE, then the champion loads and predicts.
    _ok(promote_ep.main, ["--model_name", "latency-estimator"])  # by test_mape_mean, lower is better
    champion = mlflow.pyfunc.load_model("models:/latency-estimator@champion")
    np.testing.assert_allclose(champion.predict(configs)["T_total_ms"], out["T_total_ms"])


def test_tune_runs_estimator_trials_as_nested_runs(tracking_store, synthetic_profile_dir, tmp_path):
    _ok(tune.main, ["--target", "train_estimator", "--n_trials", "2", "--num_epochs", "2", "--sampler", "random",
                    "--pruner", "none", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                    "--target_params", f"results_dir={synthetic_profile_dir};heldout_config=false"])
    (parent,) = _runs("tune", "FINISHED")
    trials = [r for r in _runs() if r.data.tags.get("parent_tune_run") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trials) == [0, 1]
    assert all(r.data.params["results_dir"] == str(synthetic_profile_dir) for r in trials)
    assert {r.data.params["hidden_width"] for r in trials} <= {"32", "64", "128", "256"}
    assert np.isfinite(parent.data.metrics["best_val_rel_error_mean"])
    assert MlflowClient().search_registered_models() == []  # trials never register


def test_unknown_target_param_is_named(tracking_store, capsys):
    code = exit_on_input_error(lambda: tune.main(["--target", "train_estimator", "--target_params", "width=3"]))
    assert code == 2 and "'width=3'" in capsys.readouterr().err
    assert _runs() == []


# --- bad input: one clear line, exit code 2, nothing left RUNNING ---------------------------------

def _store_with(tmp_path: Path, mutate) -> Path:
    """A results directory whose one part file holds `mutate(table)` (written around the store's checks)."""
    results_dir = tmp_path / "bad"
    (results_dir / "synthetic").mkdir(parents=True)
    mutate(synthetic_profile(num_samples=3, num_runs=1)).to_parquet(results_dir / "synthetic" / "part-0-0.parquet", index=False)
    return results_dir


def _nan_prefill(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(T_prefill_ms=df["T_prefill_ms"].where(df.index != 5))


def _negative_vision(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(T_vision_ms=np.where(df.index == 7, -1.0, df["T_vision_ms"]))


@pytest.mark.parametrize("case, argv, expected", [
    ("unknown data set", lambda d, t: ["--results_dir", str(d), "--dataset_names", "synthetic_a,vqa_nope"], "vqa_nope"),
    ("missing results_dir", lambda d, t: ["--results_dir", str(t / "nowhere")], "nowhere"),
    ("empty results_dir", lambda d, t: ["--results_dir", str(t)], "holds no part files"),
    ("NaN latency", lambda d, t: ["--results_dir", str(_store_with(t, _nan_prefill))], "T_prefill_ms"),
    ("negative latency", lambda d, t: ["--results_dir", str(_store_with(t, _negative_vision))], "T_vision_ms"),
    ("bad loss kind", lambda d, t: ["--results_dir", str(d), "--loss", "huber"], "loss"),
])
def test_bad_training_input_is_one_line(tracking_store, synthetic_profile_dir, tmp_path, capsys, case, argv, expected):
    code = exit_on_input_error(lambda: train_estimator.main([*argv(synthetic_profile_dir, tmp_path), "--num_epochs", "1"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, case
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert _runs() == []  # failed before a run was opened


def test_checkpoint_of_the_wrong_shape_is_one_line(tracking_store, synthetic_profile_dir, tmp_path, capsys):
    path = LatencyEstimator(EstimatorConfig(hidden_width=8, depth=1)).save(tmp_path / "estimator.pt")
    saved = torch.load(path, weights_only=True)
    saved["config"]["hidden_width"] = 16  # the weights say 8
    torch.save(saved, path)
    for main in (evaluate_estimator.main, visualize_estimator.main):
        code = exit_on_input_error(lambda: main(["--model", str(path), "--results_dir", str(synthetic_profile_dir),
                                                 "--split", "all"]))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and str(path) in err[0] and "shape" in err[0], err
    assert _runs() == []


def test_unknown_model_reference_is_one_line(tracking_store, synthetic_profile_dir, capsys):
    code = exit_on_input_error(lambda: evaluate_estimator.main(["--model", "models:/latency-estimator@champion",
                                                                "--results_dir", str(synthetic_profile_dir)]))
    # (MLflow logs its own lines while creating the empty store; ours is the one error line.)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "latency-estimator@champion" in err[0] and "not found" in err[0], err


# --- MLproject and pipeline ----------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_run_with_the_documented_parameter_names(subprocess_env, synthetic_profile_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "train_estimator", "--env-manager", "local",
         "-P", f"results_dir={synthetic_profile_dir}", "-P", "dataset_names=synthetic_a,synthetic_b",
         "-P", f"output_dir={tmp_path / 'out'}", "-P", "batch_size=64", "-P", "num_epochs=2", "-P", "lr=0.001",
         "-P", "train_split=0.8", "-P", "device=cpu", "-P", "seed=1"],
        cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _runs("train_estimator", "FINISHED")
    assert run.data.params["seed"] == "1" and np.isfinite(run.data.metrics["test_mape_decode"])


def test_pipeline_trains_the_estimator_on_the_committed_table_without_a_base_vlm(tmp_path):
    steps = pipeline.steps_for(pipeline.Params(base_checkpoint=str(tmp_path / "no_checkpoint")))
    names = [s.name for s in steps]
    assert names[:4] == ["train_estimator", "evaluate_estimator", "visualize_estimator", "promote_estimator"]
    done = {"train_estimator": "f" * 32}
    train, evaluate = steps[0].parameters({}), steps[1].parameters(done)
    assert train["results_dir"] == "data/profiles/h200-molmoe-arch-graph" and ProfileStore(REPO_ROOT / train["results_dir"]).datasets()
    assert evaluate["model"] == "f" * 32
    assert steps[3].parameters(done)["model_name"] == "latency-estimator"


def test_pipeline_estimator_follows_the_profile_step(tmp_path):
    checkpoint = tmp_path / "base"
    checkpoint.mkdir()
    (checkpoint / "base_vlm_config.json").write_text("{}")
    params = pipeline.Params(base_checkpoint=str(checkpoint), profile_results_dir="results/profiles/x")
    steps = {s.name: s for s in pipeline.steps_for(params)}
    names = list(steps)
    assert names.index("profile") < names.index("train_estimator") < names.index("promote_estimator")
    train = steps["train_estimator"].parameters({"profile": "a" * 32})
    assert train["results_dir"] == "results/profiles/x" and train["profile_run_id"] == "a" * 32


def test_pipeline_controllers_follow_the_estimator_and_promote_under_the_adherence_constraint(tmp_path):
    checkpoint = tmp_path / "base"
    checkpoint.mkdir()
    (checkpoint / "base_vlm_config.json").write_text("{}")
    steps = {s.name: s for s in pipeline.steps_for(pipeline.Params(base_checkpoint=str(checkpoint)))}
    names = list(steps)
    assert (names.index("promote_estimator") < names.index("controller_data") < names.index("supervised_controller")
            < names.index("two_stage_controller") < names.index("grpo_controller") < names.index("promote_controller")
            < names.index("evaluate_controller"))
    done = {"base_model": "b" * 32, "train_estimator": "e" * 32, "controller_data": "c" * 32}
    data = steps["controller_data"].parameters(done)
    assert data["estimator"] == "e" * 32 and data["base_model"] == f"runs:/{'b' * 32}/model"
    # A retrained estimator gets a new data directory (the old one's build identity would refuse it).
    assert data["output_dir"] != steps["controller_data"].parameters({**done, "train_estimator": "f" * 32})["output_dir"]
    for name, key in (("supervised_controller", "profiling_results"), ("two_stage_controller", "results_dir"),
                      ("grpo_controller", "profiling_results")):
        trainer = steps[name].parameters(done)
        assert trainer[key] == data["output_dir"] and trainer["estimator"] == "e" * 32
        # scored on the profile step's table unless another measured table is named
        assert trainer["measured_table"] == pipeline.Params().profile_results_dir
    named = {s.name: s for s in pipeline.steps_for(pipeline.Params(base_checkpoint=str(checkpoint),
                                                                   controller_table="data/profiles/other"))}
    for name in ("supervised_controller", "two_stage_controller", "grpo_controller", "evaluate_controller"):
        assert named[name].parameters(done)["measured_table"] == "data/profiles/other"
    promote = steps["promote_controller"]
    assert not promote.reusable and promote.parameters(done) == {"model_name": "budget-controller",
                                                                 "require": pipeline.Params().controller_require}
    # the default leaves out the budgets no config can keep (50 / 60%), which would exclude every version
    assert not any(k in pipeline.Params().controller_require for k in ("_min", "_at_50", "_at_60"))
    assert steps["evaluate_controller"].parameters(done)["controller"] == "models:/budget-controller@champion"
    # The pipeline ends the base-VLM branch with live adaptive inference on the three champions.
    adaptive = steps["adaptive_inference"]
    assert names.index("evaluate_controller") < names.index("adaptive_inference") and not adaptive.reusable
    assert adaptive.parameters(done)["measured_table"] == pipeline.Params().profile_results_dir
    from entry_points.adaptive_inference import Params as AdaptiveParams

    assert AdaptiveParams().controller_path == "models:/budget-controller@champion"
