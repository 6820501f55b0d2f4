"""The tracking layer against a real SQLite MLflow store."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tracking.artifacts import log_dataset_input
from tracking.cli import exit_on_input_error, parse_params
from tracking.epoch_logging import EpochLogger
from tracking.registry import RegistryError, newest_data_digest, promote, version_by_alias
from tracking.run_context import entry_point_run

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_run_lands_in_the_study_experiment_with_tags_and_params(tracking_store):
    with entry_point_run("train_predictor", {"lr": 0.01, "trace": "synthetic"}, study="workload-forecasting") as run:
        pass
    stored = MlflowClient().get_run(run.info.run_id)
    assert mlflow.get_experiment(stored.info.experiment_id).name == "workload-forecasting"
    assert stored.info.status == "FINISHED"
    assert stored.data.tags["entry_point"] == "train_predictor"
    assert len(stored.data.tags["git_commit"]) >= 7
    assert stored.data.params == {"lr": "0.01", "trace": "synthetic"}


def test_exception_marks_run_failed_with_error_tag_and_reraises(tracking_store):
    with pytest.raises(ZeroDivisionError):
        with entry_point_run("train_predictor", {}, study="workload-forecasting") as run:
            1 / 0
    stored = MlflowClient().get_run(run.info.run_id)
    assert stored.info.status == "FAILED"
    assert "ZeroDivisionError" in stored.data.tags["error"]
    assert mlflow.active_run() is None


def test_epoch_metrics_use_epoch_as_step_and_history_csvs_are_artifacts(tracking_store, tmp_path):
    with entry_point_run("train_predictor", {}, study="workload-forecasting") as run:
        logger = EpochLogger(["train_loss"], ["val_loss"], flush_every=2)
        for epoch in range(1, 6):
            logger.log(epoch, {"train_loss": 1.0 / epoch, "val_loss": 2.0 / epoch})
        logger.close()
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert history[-1].value == pytest.approx(0.4)
    out = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a")))
    assert list(pd.read_csv(out / "training_history.csv").columns) == ["epoch", "train_loss"]
    assert list(pd.read_csv(out / "validation_history.csv").columns) == ["epoch", "val_loss"]


def test_dataset_inputs_carry_their_context(tracking_store):
    frame = pd.DataFrame({"x": range(10)})
    with entry_point_run("train_predictor", {}, study="workload-forecasting") as run:
        for context in ("training", "validation", "test"):
            log_dataset_input(frame.iloc[:3], f"part-{context}", context, {"generator": "test", "seed": "0"})
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    contexts = {i.dataset.name: [t.value for t in i.tags if t.key == "mlflow.data.context"][0] for i in inputs}
    assert contexts == {"part-training": "training", "part-validation": "validation", "part-test": "test"}
    with pytest.raises(ValueError, match="context"):
        with entry_point_run("train_predictor", {}, study="workload-forecasting"):
            log_dataset_input(frame, "x", "train", "whatever")


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def _register_version(name: str, metric_value: float, data_digest: str | None = None) -> str:
    with mlflow.start_run() as run:
        mlflow.log_metric("test_mae", metric_value)
        if data_digest is not None:
            mlflow.set_tag("data_digest", data_digest)
        mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=["mlflow"])
    return mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version


def test_promote_picks_the_best_version_tags_it_and_refuses_a_worse_one(tracking_store):
    mlflow.set_experiment("registry-test")
    _register_version("toy", 3.0)
    best = _register_version("toy", 1.0)
    worse = _register_version("toy", 2.0)
    result = promote("toy", "test_mae", "min")
    assert result.version == str(best) and result.changed and result.previous_champion is None
    tags = MlflowClient().get_model_version("toy", best).tags
    assert tags["metric"] == "test_mae" and float(tags["value"]) == 1.0 and tags["previous_champion"] == "none"
    assert "promoted_at" in tags
    with pytest.raises(RegistryError, match="refusing"):
        promote("toy", "test_mae", "min", version=str(worse))
    assert version_by_alias("toy", "champion") == str(best)
    forced = promote("toy", "test_mae", "min", version=str(worse), force=True)
    assert forced.previous_champion == str(best)
    assert version_by_alias("toy", "champion") == str(worse)


def test_promote_compares_only_versions_trained_on_one_table(tracking_store):
    mlflow.set_experiment("registry-test")
    other_table = _register_version("per-table", 0.5, data_digest="cpu-table")  # easier table, better figure
    promote("per-table", "test_mae", "min", data_digest="cpu-table")
    _register_version("per-table", 3.0, data_digest="gpu-table")
    best_gpu = _register_version("per-table", 2.0, data_digest="gpu-table")
    assert newest_data_digest("per-table", "test_mae") == "gpu-table"
    # The champion trained on the CPU table is no rival: the alias moves to the best GPU-table version.
    result = promote("per-table", "test_mae", "min", data_digest="gpu-table")
    assert result.version == str(best_gpu) and result.changed and result.previous_champion == str(other_table)
    assert result.previous_value is None
    # Compared across tables, the CPU-table version would win and the GPU one would be refused.
    assert promote("per-table", "test_mae", "min", force=True).version == str(other_table)
    with pytest.raises(RegistryError, match=r"version 1 of 'per-table' does not exist or lacks metric 'test_mae' \(among versions trained on table gpu-table\)"):
        promote("per-table", "test_mae", "min", version=str(other_table), data_digest="gpu-table")


def test_promote_unknown_model_is_a_clear_error(tracking_store):
    with pytest.raises(RegistryError, match="'nope' does not exist"):
        promote("nope", "test_mae")


def test_parse_params_types_from_the_dataclass():
    @dataclasses.dataclass
    class P:
        n: int = 3
        lr: float = 0.1
        flag: bool = False
        name: str = "x"

    p = parse_params(P, ["--n", "5", "--lr", "1e-3", "--flag", "true"])
    assert (p.n, p.lr, p.flag, p.name) == (5, 0.001, True, "x")


def test_input_errors_become_one_line_and_exit_code_2(capsys):
    def bad() -> int:
        raise ValueError("horizon must be > 0, got 0")

    assert exit_on_input_error(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: horizon must be > 0, got 0"]


def test_mlproject_matches_the_entry_points_params():
    result = subprocess.run([sys.executable, "-m", "mlflow_projects.mlproject_spec", "--check"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _quadratic_target():
    """A tiny trainable target: per-epoch val_loss converges to (x - 0.3)^2."""
    from tracking.entry_point import EntryPoint
    from tracking.tuning import FloatParam, Objective, Tuning

    @dataclasses.dataclass
    class Params:
        x: float = 0.0
        num_epochs: int = 10
        register: bool = False

    def execute(params, prepared, epoch_hook=None):
        for epoch in range(1, params.num_epochs + 1):
            val_loss = (params.x - 0.3) ** 2 + 1.0 / epoch
            mlflow.log_metric("val_loss", val_loss, step=epoch)
            if epoch_hook:
                epoch_hook(epoch, {"val_loss": val_loss})
        return {"val_loss": val_loss}

    return EntryPoint("quadratic", Params, study="tune-test", execute=execute, summary=lambda p, m: "",
                      tuning=Tuning([FloatParam("x", -3.0, 3.0)], Objective("val_loss", "minimize")))


def test_study_trials_are_nested_runs_and_pruned_ones_are_tagged(tracking_store, tmp_path):
    from tracking.tuning import make_study, run_study

    target = _quadratic_target()
    study = make_study("quad", f"sqlite:///{tmp_path / 'optuna.db'}", "minimize", sampler="random", pruner="median")
    with entry_point_run("tune", {}, study="tune-test") as parent:
        run_study(target, study, n_trials=8, timeout_s=None)
    client = MlflowClient()
    trials = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 8
    states = {t.data.tags["state"] for t in trials}
    pruned = [t for t in trials if t.data.tags["state"] == "PRUNED"]
    assert "COMPLETE" in states and pruned, states
    assert all(t.data.tags.get("pruned") == "true" for t in pruned)
    # A pruned trial keeps the epochs it ran, fewer than the full 10.
    assert all(1 <= len(client.get_metric_history(t.info.run_id, "val_loss")) < 10 for t in pruned)
    # A second worker joining the same study (load_if_exists) adds to it instead of starting over.
    again = make_study("quad", f"sqlite:///{tmp_path / 'optuna.db'}", "minimize", sampler="random", pruner="median")
    assert len(again.trials) == 8


def test_the_data_digest_covers_the_split_not_only_the_rows(tracking_store):
    """Held-out figures of two splits of one table do not compare: promote groups versions by this tag."""
    from tracking.artifacts import log_split_inputs

    frame = pd.DataFrame({"x": range(100)})
    digests = []
    for test_start in (80, 90, 90):
        with entry_point_run("train_predictor", {}, study="workload-forecasting"):
            log_split_inputs(frame, {"training": slice(0, 70), "validation": slice(70, test_start),
                                     "test": slice(test_start, None)}, "toy", "generated", kind="chronological")
            digests.append(mlflow.get_run(mlflow.active_run().info.run_id).data.tags["data_digest"])
    assert digests[0] != digests[1] and digests[1] == digests[2]
