"""Base-VLM entry points through a real SQLite MLflow store: register -> evaluate -> importance ->
profile, the champion loading in a fresh process and answering a test question, bad input. The chain
runs on the committed trained checkpoint (`data/base_vlm`), or on a freshly initialised model where a
checkout has none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from entry_points import evaluate_base_model, importance, profile, promote, train_base_model
from tracking.cli import exit_on_input_error

REPO_ROOT = Path(__file__).resolve().parents[1]


COMMITTED_CHECKPOINT = REPO_ROOT / "data" / "base_vlm"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if (COMMITTED_CHECKPOINT / "base_vlm_config.json").is_file():
        return COMMITTED_CHECKPOINT
    from core.vlm.base_vlm import build_base_vlm

    directory = tmp_path_factory.mktemp("base_vlm")
    build_base_vlm(seed=0).save_pretrained(directory)
    return directory


def _finished(entry_point: str):
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.entry_point = '{entry_point}' and attributes.status = 'FINISHED'")
    assert runs, f"no finished {entry_point} run"
    return runs[0]


@pytest.mark.slow
def test_register_evaluate_importance_profile_chain(tracking_store, subprocess_env, tmp_path, checkpoint):
    assert train_base_model.main(["--from_checkpoint", str(checkpoint), "--epochs", "0",
                                  "--val_samples_per_dataset", "4", "--checkpoint_dir", str(tmp_path / "ckpt")]) == 0
    registered = _finished("train_base_model")
    recorded = json.loads((checkpoint / "history.json").read_text()) if (checkpoint / "history.json").is_file() else []
    final = registered.data.metrics[train_base_model.PROMOTION.metric]  # the checkpoint's last epoch, when recorded
    assert final == (recorded[-1]["val_vqa_score_full"] if recorded else registered.data.metrics["val_vqa_score_full"])
    assert MlflowClient().get_model_version_by_alias("base-vlm", "champion").run_id == registered.info.run_id
    assert promote.main(["--model_name", "base-vlm"]) == 0  # the declared metric and direction: nothing else to pass

    assert evaluate_base_model.main(["--dataset_names", "synth_attrvqa", "--test_samples", "2", "--latency_samples", "1", "--grid_samples", "1",
                                     "--grid_repeats", "1"]) == 0
    metrics = _finished("evaluate_base_model").data.metrics
    for key in ("test_vqa_score_full", "test_vqa_score_min", "cpu_latency_ms_full", "cpu_latency_ms_min",
                "test_vqa_score_synth_attrvqa_low", "test_vqa_score_synth_attrvqa_high", "cpu_latency_ms_blocks_4",
                "test_vqa_score_top_k_1", "test_vqa_score_blocks_4", "test_vqa_score_medium_top_k_1",
                "test_knob_cost_top_k_high", "test_knob_min_step_blocks_medium"):
        assert key in metrics, key

    assert importance.main(["--train_samples", "1", "--val_samples", "1",
                            "--dataset_names", "synth_attrvqa,synth_countvqa"]) == 0
    importance_run = _finished("importance")
    order_file = Path(__import__("mlflow").artifacts.download_artifacts(
        run_id=importance_run.info.run_id, artifact_path="importance/drop_order.json"))
    drop_order = json.loads(order_file.read_text())["drop_order"]
    merged = {b: importance_run.data.metrics[f"importance_block_{b}"] for b in range(1, 7)}
    assert drop_order == sorted(merged, key=lambda b: (merged[b], b))  # least important block first

    results = tmp_path / "profiles"
    argv = ["--num_samples", "1", "--num_runs", "1", "--results_dir", str(results),
            "--importance", importance_run.info.run_id, "--dataset_names", "synth_attrvqa"]
    assert profile.main(argv) == 0
    table = pd.concat(pd.read_parquet(p) for p in results.rglob("*.parquet"))
    assert len(table) == 75 and table["accuracy"].notna().all()
    # The profiler used the measured order: with 7 of 8 blocks, the least important block is the one dropped.
    seven = json.loads(table.loc[table["num_active_blocks"] == 7, "active_blocks"].iloc[0])
    assert drop_order[0] not in seven
    assert profile.main(argv) == 0  # resumed: nothing new to do
    assert len(pd.concat(pd.read_parquet(p) for p in results.rglob("*.parquet"))) == 75

    # The champion loads in a fresh process and answers a test question.
    script = (
        "import mlflow, pandas as pd\n"
        "from core.vqa.suite import load_split\n"
        "from tracking.pyfunc_models import encode_image\n"
        "s = load_split('synth_attrvqa', 'test', 1)[0]\n"
        "m = mlflow.pyfunc.load_model('models:/base-vlm@champion')\n"
        "out = m.predict(pd.DataFrame([{'image': encode_image(s.image), 'question': s.question}]))\n"
        "print('ANSWER', out['answer'][0], s.answers[0], out['T_total_ms'][0] > 0, sep='|')\n"
    )
    answered = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env,
                              capture_output=True, text=True, timeout=300)
    assert answered.returncode == 0, answered.stderr[-3000:]
    line = next(l for l in answered.stdout.splitlines() if l.startswith("ANSWER"))
    _, predicted, truth, timed = line.split("|")
    assert timed == "True"
    if checkpoint == COMMITTED_CHECKPOINT:  # the trained model answers it right
        assert predicted == truth, line


@pytest.mark.slow
def test_a_micro_training_run_logs_per_epoch_metrics_and_registers(tracking_store, tmp_path):
    argv = ["--epochs", "3", "--batch_size", "8", "--train_samples_per_dataset", "16", "--val_samples_per_dataset", "2",
            "--reader_word_steps", "2", "--reader_steps", "2", "--qa_pairs_per_image", "2",
            "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "out")]
    assert train_base_model.main(argv) == 0
    run = _finished("train_base_model")
    client = MlflowClient()
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_vqa_score_full")] == [1, 2, 3]
    assert client.get_model_version_by_alias("base-vlm", "champion").run_id == run.info.run_id
    assert run.data.metrics[train_base_model.PROMOTION.metric] == run.data.metrics["val_vqa_score_full"]  # epoch 3's
    # The output copy is what `from_checkpoint` registers elsewhere, with its recorded history.
    assert len(json.loads((tmp_path / "out" / "history.json").read_text())) == 3


@pytest.mark.parametrize("module, argv, expected", [
    (profile, ["--dataset_names", "synth_nothing"], "synth_nothing"),
    (profile, ["--backend", "gpt5"], "backend='gpt5'"),
    (profile, ["--engine", "graph"], "engine='graph' applies to backend=molmoe_arch only"),
    (profile, ["--backend", "molmoe_arch", "--engine", "compiled"], "engine='compiled' is unknown"),
    (profile, ["--timing_repeats", "0"], "timing_repeats (0)"),
    (profile, ["--backend", "molmoe_arch", "--prompt_lengths", "16,x"], "prompt_lengths: 'x'"),
    (profile, ["--base_model", "models:/base-vlm@nope", "--dataset_names", "synth_attrvqa"], "base-vlm"),
    (importance, ["--dataset_names", "synth_nothing"], "synth_nothing"),
    (evaluate_base_model, ["--latency_repeats", "2"], "latency_repeats"),
    (train_base_model, ["--from_checkpoint", "/nonexistent"], "/nonexistent"),
    (train_base_model, ["--epochs", "0"], "epochs must be >= 1"),
])
def test_bad_input_is_one_line(tracking_store, capsys, module, argv, expected):
    code = exit_on_input_error(lambda: module.main(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_profile_runs_the_graph_engine_with_the_drift_reference(tracking_store, tmp_path):
    results = tmp_path / "graph"
    argv = ["--backend", "molmoe_arch", "--size", "tiny", "--engine", "graph", "--num_samples", "1", "--num_runs", "1",
            "--timing_repeats", "2", "--drift_reference", "true", "--force_output_tokens", "2", "--warmup", "0",
            "--num_threads", "1", "--results_dir", str(results)]
    assert profile.main(argv) == 0
    run = _finished("profile")
    assert run.data.params["engine"] == "graph" and run.data.params["drift_reference"] == "True"
    protocol = json.loads((results / "timing_protocol.json").read_text())
    assert protocol["timing_repeats"] == 2 and protocol["drift_reference"] and protocol["backend"] == "molmoe_arch"
    logged = MlflowClient().download_artifacts(run.info.run_id, "timing_protocol.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == protocol
    assert run.data.metrics["rows_written"] == 75
