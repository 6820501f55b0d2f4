"""`promote -P model_name=<name>` with nothing else works for every model the platform registers:
each trainer declares its held-out metric and direction once, and promote reads it from the registry."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from entry_points import promote, train_base_model, train_estimator, train_predictor

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_promote_with_only_the_model_name(tracking_store, synthetic_profile_dir, tmp_path, capsys):
    assert train_predictor.main(["--num_days", "4", "--num_epochs", "2", "--seq_len", "60",
                                 "--moving_average_window", "30"]) == 0
    assert train_estimator.main(["--results_dir", str(synthetic_profile_dir), "--num_epochs", "1",
                                 "--heldout_config", "false", "--output_dir", str(tmp_path / "estimator")]) == 0
    assert train_base_model.main(["--from_checkpoint", str(REPO_ROOT / "data" / "base_vlm"), "--epochs", "0",
                                  "--val_samples_per_dataset", "2", "--checkpoint_dir", str(tmp_path / "ckpt")]) == 0

    client = MlflowClient()
    declared = {"workload-predictor": ("test_wape_mean", "min"), "latency-estimator": ("test_mape_mean", "min")}
    for name in ("workload-predictor", "latency-estimator", "base-vlm"):
        capsys.readouterr()
        assert promote.main(["--model_name", name]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        champion = client.get_model_version_by_alias(name, "champion")
        assert f"{name}@champion -> version {champion.version}" in out
        tags = client.get_registered_model(name).tags
        metric, mode = tags["promotion_metric"], tags["promotion_mode"]
        if name in declared:
            assert (metric, mode) == declared[name]
        else:  # the base VLM is compared by a held-out accuracy, higher is better
            assert mode == "max" and "vqa_score" in metric
        assert metric in client.get_run(champion.run_id).data.metrics


def test_promote_refuses_a_model_that_declares_no_metric(tracking_store, capsys):
    """A model registered by hand (no trainer's declaration) needs -P metric; the error says so."""
    import mlflow

    client = MlflowClient()
    client.create_registered_model("hand-made")
    with mlflow.start_run():
        mlflow.log_metric("score", 1.0)
    assert promote.main(["--model_name", "hand-made"]) == 2
    assert "pass -P metric" in capsys.readouterr().err
