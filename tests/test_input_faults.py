"""Smaller input faults of issue 17: each is refused in one line naming the file or parameter, before
any work, or (evaluate_estimator -P split=all) now writes what was missing."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tracking.model_refs import ModelReferenceError, resolve_drop_order


def _runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("content", ["not json at all", "[1, 2, 3]", '{"drop_order": ["a"]}'])
def test_an_importance_file_that_is_not_the_json_names_the_file(tmp_path, content):
    # A non-JSON importance file was reported as a bare JSONDecodeError, without its path.
    path = tmp_path / "importance.txt"
    path.write_text(content)
    with pytest.raises(ModelReferenceError, match=f"importance file {path}: expected JSON"):
        resolve_drop_order(str(path), 8)


def test_profile_into_a_file_is_refused_before_sweeping(tracking_store, tmp_path, capsys):
    # It swept for 124 s and lost the timed rows at the first flush.
    from entry_points import profile

    target = tmp_path / "results.parquet"
    target.write_text("a file")
    code = profile.main(["--backend", "molmoe_arch", "--size", "tiny", "--results_dir", str(target)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == [f"error: results_dir {target} is a file, not a directory"]
    assert not _runs()


def test_evaluate_estimator_split_all_writes_the_predictions(tracking_store, synthetic_profile_dir, tmp_path):
    # split=all wrote no per-row predictions: scoring another tool on the same rows needed the checkpoint.
    from entry_points import evaluate_estimator, train_estimator

    assert train_estimator.main(["--results_dir", str(synthetic_profile_dir), "--num_epochs", "1", "--register", "false",
                                 "--heldout_config", "false", "--output_dir", str(tmp_path / "out")]) == 0
    (trained,) = _runs()
    assert evaluate_estimator.main(["--model", trained.info.run_id, "--results_dir", str(synthetic_profile_dir),
                                    "--split", "all"]) == 0
    (evaluation,) = [r for r in _runs() if r.data.tags["entry_point"] == "evaluate_estimator"]
    path = MlflowClient().download_artifacts(evaluation.info.run_id, "evaluation/predictions_test.csv", str(tmp_path))
    predictions = pd.read_csv(path)
    assert {"sample_id", "tier", "top_k", "num_active_blocks", "T_prefill_ms", "pred_T_prefill_ms"} <= set(predictions.columns)
    assert len(predictions) == evaluation.data.metrics["test_groups"]
