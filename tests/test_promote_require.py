"""`promote -P require="test_adherence_min>=0.97"`: versions whose run fails a requirement never become
champion, and the run and the summary line say which were excluded and why."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from entry_points import promote
from tracking.registry import Promotion, RegistryError, parse_requirement, record_promotion

NAME = "budget-controller"


def _register(metrics: dict[str, float]) -> str:
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics)
    return client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id).version


@pytest.fixture
def three_versions(tracking_store) -> list[str]:
    """v1: the most accurate, adherence 0.91; v2: adherence 0.98; v3: no adherence figure."""
    MlflowClient().create_registered_model(NAME)
    record_promotion(Promotion(NAME, "test_accuracy_auc", "max"))
    return [_register({"test_accuracy_auc": 0.90, "test_adherence_min": 0.91}),
            _register({"test_accuracy_auc": 0.80, "test_adherence_min": 0.98}),
            _register({"test_accuracy_auc": 0.85})]


def _promote_runs() -> list:
    client = MlflowClient()
    return [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.data.tags.get("entry_point") == "promote"]


def test_a_version_failing_the_requirement_never_becomes_champion(three_versions, capsys):
    assert promote.main(["--model_name", NAME, "--require", "test_adherence_min>=0.97", "--table", "all"]) == 0
    out = capsys.readouterr().out
    assert MlflowClient().get_model_version_by_alias(NAME, "champion").version == three_versions[1]
    assert "version 1 (test_adherence_min=0.91 fails test_adherence_min>=0.97)" in out
    assert "version 3 (no test_adherence_min)" in out
    (run,) = _promote_runs()
    assert run.data.tags["promotion_require"] == "test_adherence_min>=0.97"
    assert run.data.tags["excluded_versions"].startswith("version 1 (")
    # Without the requirement the most accurate version wins.
    assert promote.main(["--model_name", NAME, "--table", "all"]) == 0
    assert MlflowClient().get_model_version_by_alias(NAME, "champion").version == three_versions[0]


def test_a_malformed_requirement_is_one_line_and_leaves_no_run(three_versions, capsys):
    for text in ("test_adherence_min=>0.97", "test_adherence_min>=high", ">=0.97"):
        assert promote.main(["--model_name", NAME, "--require", text, "--table", "all"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is not <metric><op><number>" in errors[0], text
    assert not _promote_runs()


def test_no_version_meeting_the_requirement_is_refused_naming_each(three_versions, capsys):
    assert promote.main(["--model_name", NAME, "--require", "test_adherence_min>0.99", "--table", "all"]) == 2
    error = capsys.readouterr().err
    assert "no version of 'budget-controller' meets test_adherence_min>0.99" in error and "version 2 (" in error


def test_requirements_parse_every_operator():
    assert [str(parse_requirement(t)) for t in ("a>=1", "a<=1e-3", "a > .5", "a<2", "a==0")] == [
        "a>=1", "a<=0.001", "a>0.5", "a<2", "a==0"]
    with pytest.raises(RegistryError):
        parse_requirement("a>=")
