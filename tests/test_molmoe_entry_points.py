"""`-P backend=molmoe_arch -P model_path=DIR -P data_root=DIR`: entry points answer the real benchmarks'
files with a local MolmoE release (here a synthetic tiny one in the release's layout) and score them with
the official VQA accuracy; bad paths and names are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from entry_points import importance, profile
from tests.test_real_vqa_data import _coco_vqa
from tracking.cli import exit_on_input_error


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    _coco_vqa(root, "coco_2014_vqa", "val")
    return root


def _last_run(name: str):
    client = MlflowClient()
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], f"tags.mlflow.runName LIKE '{name}%'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def test_profile_answers_the_real_files_with_the_loaded_release(tracking_store, tmp_path, release_dir, data_root):
    results = tmp_path / "profiles"
    argv = ["--backend", "molmoe_arch", "--model_path", str(release_dir), "--data_root", str(data_root),
            "--dataset_names", "coco_2014_vqa", "--num_samples", "1", "--num_runs", "1", "--warmup", "0",
            "--num_threads", "1", "--force_output_tokens", "2", "--results_dir", str(results)]
    assert profile.main(argv) == 0
    table = pd.concat(pd.read_parquet(p) for p in results.rglob("*.parquet"))
    assert len(table) == 75 and set(table["dataset"]) == {"coco_2014_vqa"}
    assert table["sample_id"].str.startswith("coco_2014_vqa:val:").all()
    assert table["accuracy"].notna().all() and table["question"].iloc[0] == "what color is the bus?"
    assert (table["text_tokens"] == 10).all()  # User : what color is the bus ? Assistant : (tokenizer.json)


@pytest.mark.slow
def test_importance_scores_block_removal_on_the_real_files(tracking_store, release_dir, data_root):
    argv = ["--backend", "molmoe_arch", "--model_path", str(release_dir), "--data_root", str(data_root),
            "--dataset_names", "coco_2014_vqa", "--score", "vqa_score", "--tier", "low", "--train_samples", "1",
            "--val_samples", "1", "--num_threads", "1"]
    _coco_vqa(data_root, "coco_2014_vqa", "train")
    assert importance.main(argv) == 0
    run = _last_run("importance")
    order = json.loads(Path(MlflowClient().download_artifacts(run.info.run_id, "importance/drop_order.json")).read_text())
    assert sorted(order["drop_order"]) == list(range(1, 15))


@pytest.mark.parametrize("argv, expected", [
    (["--backend", "molmoe_arch", "--model_path", "{other}"], "model_type"),
    (["--backend", "base_vlm", "--model_path", "{release}", "--dataset_names", "synth_attrvqa"],
     "model_path applies to backend=molmoe_arch"),
    (["--backend", "molmoe_arch", "--model_path", "{release}", "--data_root", "/no/such/root"], "data_root='/no/such/root'"),
    (["--backend", "molmoe_arch", "--model_path", "{release}", "--data_root", "{data}", "--dataset_names", "synth_attrvqa"],
     "synth_attrvqa"),
])
def test_bad_paths_and_names_are_one_line(tracking_store, capsys, tmp_path, release_dir, data_root, argv, expected):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    argv = [a.format(other=other, release=release_dir, data=data_root) for a in argv]
    code = exit_on_input_error(lambda: profile.main(argv + ["--results_dir", str(tmp_path / "p")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and expected in err[0], err
