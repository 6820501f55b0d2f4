"""The controller half of "bring your own MolmoE-1B": with `-P backend=molmoe_arch -P model_path=DIR -P
data_root=DIR`, the measured table, estimator, controller data, supervised controller, its evaluation and
adaptive inference all run on a local release (here a synthetic tiny one in the release's layout) and the
real benchmarks' files (fixture files in the VQA v2 layout), and the served model answers from that
release. Nothing here reads the synthetic suite or the base VLM."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from core.control.data import load_controller_data
from core.knobs import KnobConfig
from core.vlm.molmoe_checkpoint import load_molmoe_checkpoint
from core.vqa.real_data import load_real_split, official_vqa_accuracy
from entry_points import (adaptive_inference, build_controller_data, evaluate_controller, profile, train_estimator,
                          train_supervised_controller)
from tests.test_real_vqa_data import _coco_vqa
from tracking.cli import exit_on_input_error
from tracking.model_refs import VLM_REFERENCE_ARTIFACT


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    for split in ("train", "val"):
        _coco_vqa(root, "coco_2014_vqa", split)
    return root


def _runs(entry_point: str):
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.entry_point = '{entry_point}'", order_by=["attributes.start_time DESC"])


def _argv(**params: str) -> list[str]:
    return [item for key, value in params.items() for item in (f"--{key}", str(value))]


def test_controllers_and_adaptive_inference_run_on_the_release_and_the_real_files(tracking_store, tmp_path, release_dir,
                                                                                 data_root):
    torch.set_num_threads(1)
    vlm = {"backend": "molmoe_arch", "model_path": release_dir, "data_root": data_root}
    measured = tmp_path / "measured"
    assert profile.main(_argv(**vlm, dataset_names="coco_2014_vqa", split="test", num_samples=3, num_runs=2, warmup=0,
                              num_threads=1, force_output_tokens=2, results_dir=measured)) == 0
    assert train_estimator.main(_argv(results_dir=measured, num_epochs=3, heldout_config="false", register="false",
                                      output_dir=tmp_path / "estimator")) == 0
    estimator = _runs("train_estimator")[0].info.run_id

    # Controller data: both of its splits from the real train file (the val file is the measured test split).
    data = tmp_path / "controller_data"
    assert build_controller_data.main(_argv(**vlm, dataset_names="coco_2014_vqa", train_samples=2, val_samples=1,
                                            chunk_size=2, estimator=estimator, output_dir=data)) == 0
    samples, grid = load_controller_data(data)
    assert samples["sample_id"].tolist() == [f"coco_2014_vqa:train:{i}" for i in range(3)]
    assert samples["split"].tolist() == ["train", "train", "val"] and len(grid) == 3 * 75
    assert samples["question"].iloc[0] == "what color is the bus?"
    assert json.loads((data / "manifest.json").read_text())["build"]["backend"] == "molmoe_arch"
    # The grid's answers are the release's own answers, scored with the official VQA accuracy.
    backend = load_molmoe_checkpoint(release_dir, device="cpu")
    sample = load_real_split(data_root, "coco_2014_vqa", "train", indices=[1])[0]
    row = grid[(grid["sample_id"] == sample.sample_id) & (grid["tier"] == "medium") & (grid["top_k"] == 4)
               & (grid["num_active_blocks"] == 12)].iloc[0]
    answer = backend.answer(sample, KnobConfig("medium", 4, 12))
    assert row["prediction"] == answer.text and row["output_tokens"] == answer.output_tokens
    assert row["accuracy"] == pytest.approx(official_vqa_accuracy(answer.text, sample.answers))

    assert train_supervised_controller.main(_argv(**vlm, profiling_results=data, measured_table=measured,
                                                  estimator=estimator, num_epochs=2, output_dir=tmp_path / "ctl")) == 0
    trainer = _runs("train_supervised_controller")[0]
    assert "test_adherence_min" in trainer.data.metrics
    assert evaluate_controller.main(_argv(**vlm, controller=trainer.info.run_id, measured_table=measured)) == 0
    assert "oracle_test_accuracy_auc" in _runs("evaluate_controller")[0].data.metrics

    assert adaptive_inference.main(_argv(**vlm, controller_path="models:/budget-controller/1", estimator=estimator,
                                         measured_table=measured, num_samples=1, warmup=1,
                                         budget_fraction="0.8,1.0")) == 0
    run = _runs("adaptive_inference")[0]
    assert run.data.params["resolved_base_model_version"] == f"release:{release_dir.resolve()}"
    assert {"adaptive_accuracy_at_100", "replay_accuracy_at_100", "l_full_ms_measured"} <= set(run.data.metrics)
    requests = pd.read_csv(MlflowClient().download_artifacts(run.info.run_id, "adaptive/requests.csv"))
    assert set(requests["sample_id"].str.rsplit(":", n=1).str[0]) == {"coco_2014_vqa:val"}
    # The served model reads the release from its directory instead of bundling ~7 GB of weights.
    served = Path(MlflowClient().download_artifacts(run.info.run_id, "adaptive_model/artifacts"))
    assert json.loads((served / VLM_REFERENCE_ARTIFACT).read_text())["model_path"] == str(release_dir.resolve())
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/adaptive_model")
    from tracking.pyfunc_models import encode_image

    reply = model.predict(pd.DataFrame({"image": [encode_image(sample.image)], "question": [sample.question],
                                        "budget_ms": [1e6]}))
    full = backend.answer(sample, KnobConfig(reply["tier"].iloc[0], int(reply["top_k"].iloc[0]),
                                             int(reply["num_active_blocks"].iloc[0])))
    assert reply["answer"].iloc[0] == full.text


@pytest.mark.parametrize("argv, expected", [
    (["--backend", "molmoe_arch", "--model_path", ""], "parameter model_path is empty"),
    (["--backend", "molmoe_arch", "--model_path", "/no/such/release"], "model_path='/no/such/release'"),
    (["--backend", "gpt2"], "parameter backend='gpt2'"),
    (["--backend", "molmoe_arch", "--model_path", "{release}", "--data_root", "/no/root"], "data_root='/no/root'"),
    (["--model_path", "{release}"], "model_path applies to backend=molmoe_arch"),
])
def test_a_bad_vlm_reference_is_one_line(tracking_store, capsys, tmp_path, release_dir, argv, expected):
    argv = [a.format(release=release_dir) for a in argv] + ["--output_dir", str(tmp_path / "data")]
    code = exit_on_input_error(lambda: build_controller_data.main(argv + ["--estimator", str(tmp_path / "none.pt")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_live_rollouts_answer_the_real_files_and_score_them_officially(release_dir, data_root):
    import numpy as np

    from core.control.decision import grid_arrays
    from core.control.live import LiveRollouts
    from core.control.policies import knob_options

    backend = load_molmoe_checkpoint(release_dir, device="cpu")
    options = knob_options(backend.space)
    live = LiveRollouts(backend, ["coco_2014_vqa:train:2", "coco_2014_vqa:train:0"], options, str(data_root))
    accuracy, latency = live.score(np.array([1]), np.array([[0, 7]]), np.random.default_rng(0))
    sample = load_real_split(data_root, "coco_2014_vqa", "train", indices=[0])[0]
    grid = grid_arrays(options)
    for j, index in enumerate((0, 7)):
        config = KnobConfig(str(grid["tier"][index]), int(grid["top_k"][index]), int(grid["num_active_blocks"][index]))
        assert accuracy[0, j] == pytest.approx(official_vqa_accuracy(backend.answer(sample, config).text, sample.answers))
    assert (latency > 0).all() and live.answers == 2
