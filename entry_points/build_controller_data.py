"""Entry point `build_controller_data`: the accuracy of every knob config on the train and val samples
(the suite's, or with `data_root` the real benchmarks' train files), answered by the base VLM or a local
MolmoE-1B release (`backend=molmoe_arch -P model_path=DIR`), with the features a controller may read and the champion estimator's latency (the data every
controller trains on; layout in core/control/data.py). Resumable: a rerun skips finished chunks."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import pandas as pd
import torch

from core.control.data import (GRID_FILE, MANIFEST_FILE, SAMPLES_FILE, SPLITS, ControllerDataConfig, build_controller_data,
                               build_identity, check_estimator_space, check_output_dir)
from core.knobs import KNOBS
from core.latency.estimator import LatencyEstimator
from core.vlm.backend import VLMBackend
from core.vqa import sources
from core.vqa.suite import DATASETS
from tracking.artifacts import frame_digest, log_dataset_input
from tracking.cli import ParameterError, comma_list, config_from_params
from tracking.entry_point import EntryPoint
from tracking.estimator_refs import MODEL_NAME, EstimatorReferenceError, resolve_estimator
from tracking.model_refs import VLMReference
from tracking.run_context import set_data_digest
from tracking.store import ADAPTIVE_VLM_STUDY

_D = ControllerDataConfig()  # the defaults live in core


@dataclass
class Params:
    """Build the controller data: accuracy grid, features and estimator latency of the train/val samples."""

    base_model: str = "data/base_vlm"  # backend=base_vlm: a checkpoint directory or a registry URI (models:/base-vlm@champion)
    backend: str = "base_vlm"  # base_vlm | molmoe_arch (needs model_path)
    model_path: str = ""  # molmoe_arch: a local MolmoE-1B release directory (config.json, *.safetensors, tokenizer.json)
    engine: str = "eager"  # molmoe_arch: eager | graph | fused (the answers are the same; graph and fused need CUDA)
    data_root: str = ""  # a directory holding the real benchmarks in their published layouts; '' = the synthetic suite
    estimator: str = f"models:/{MODEL_NAME}@champion"  # a models:/ URI, a train_estimator run id or a checkpoint file
    dataset_names: str = ",".join(DATASETS)  # comma-separated data sets: the suite's, or with data_root text_vqa,coco_2014_vqa,okvqa
    train_samples: int = _D.train_samples  # per data set: the first N of its train split
    val_samples: int = _D.val_samples  # per data set: the first N of its val split (with data_root: the next N of its train file)
    output_dir: str = "outputs/controller_data"  # samples.parquet, grid.parquet, manifest.json, parts/ (a rerun resumes)
    batch_size: int = _D.batch_size  # prompts per decoder forward
    chunk_size: int = _D.chunk_size  # samples per part file
    num_threads: int = 1  # torch intra-op threads
    device: str = "cpu"  # cpu | cuda[:N]


@dataclass
class Prepared:
    config: ControllerDataConfig
    backend: VLMBackend
    estimator: LatencyEstimator


def prepare(params: Params) -> Prepared:
    """Every input checked before a run opens: parameters, base model, estimator, output_dir."""
    if params.num_threads < 1:
        raise ParameterError(f"num_threads must be >= 1, got {params.num_threads}")
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device={params.device!r}: CUDA is not available on this machine")
    names = params.dataset_names
    if params.data_root and names == Params.dataset_names:  # the suite's default names mean "all" here
        names = ",".join(sources.dataset_choices(params.data_root))
    datasets = comma_list(names, "dataset_names", sources.dataset_choices(params.data_root), allow_empty=False)
    config = config_from_params(ControllerDataConfig, params, dataset_names=tuple(datasets))
    torch.set_num_threads(params.num_threads)
    if params.model_path and params.backend != "molmoe_arch":
        raise ParameterError(f"model_path applies to backend=molmoe_arch (a MolmoE-1B release directory), "
                             f"not backend={params.backend}")
    backend = VLMReference(params.backend, params.base_model if params.backend == "base_vlm" else params.model_path,
                           params.engine, params.device).load()
    try:
        estimator = resolve_estimator(params.estimator).estimator
    except EstimatorReferenceError as exc:
        raise ParameterError(f"estimator: {exc}") from None
    check_estimator_space(estimator, backend.space)
    check_output_dir(params.output_dir, build_identity(backend, config))
    return Prepared(config, backend, estimator)


def execute(params: Params, prepared: Prepared, epoch_hook: None = None) -> dict[str, float]:
    """Build (or resume) the data; log its files, inputs, digest, row counts and full-config accuracy."""
    out = Path(params.output_dir)
    built = build_controller_data(prepared.backend, out, prepared.config, prepared.estimator,
                                  sources={"base_model": params.base_model if params.backend == "base_vlm" else params.model_path,
                                           "backend": params.backend, "data_root": params.data_root,
                                           "estimator": params.estimator})
    samples, grid = (pd.read_parquet(out / name) for name in (SAMPLES_FILE, GRID_FILE))
    set_data_digest(frame_digest(grid[["sample_id", *KNOBS, "accuracy"]]))
    for name in (SAMPLES_FILE, GRID_FILE, MANIFEST_FILE):
        mlflow.log_artifact(str(out / name), artifact_path="controller_data")
    log_dataset_input(grid, name="controller-data-grid", context="training", source=str((out / GRID_FILE).resolve()),
                      targets="accuracy")
    log_dataset_input(samples, name="controller-data-samples", context="training", source=str((out / SAMPLES_FILE).resolve()))
    full = prepared.backend.space.full()
    is_full = (grid["tier"] == full.tier) & (grid["top_k"] == full.top_k) & (grid["num_active_blocks"] == full.num_active_blocks)
    metrics = {"build_seconds": built.build_seconds, "samples_rows": float(built.samples), "grid_rows": float(built.grid_rows),
               "chunks_written": float(built.chunks_written), "chunks_skipped": float(built.chunks_skipped),
               "accuracy_mean": float(grid["accuracy"].mean())}
    for split in SPLITS:
        mine = grid[is_full & (grid["split"] == split)]
        metrics[f"{split}_accuracy_full"] = float(mine["accuracy"].mean())
        metrics.update({f"{split}_accuracy_full_{ds}": float(part["accuracy"].mean()) for ds, part in mine.groupby("dataset")})
    metrics["T_total_pred_ms_full_median"] = float(grid.loc[is_full, "T_total_pred_ms"].median())
    mlflow.log_metrics(metrics)
    return metrics


def summary(params: Params, m: Mapping[str, Any]) -> str:
    return (f"{int(m['samples_rows'])} samples x {int(m['grid_rows'] // m['samples_rows'])} configs in {params.output_dir} "
            f"({int(m['chunks_written'])} chunks built, {int(m['chunks_skipped'])} already there) in {m['build_seconds']:.0f} s; "
            f"full-config accuracy train {m['train_accuracy_full']:.3f}, val {m['val_accuracy_full']:.3f}")


ENTRY_POINT = EntryPoint("build_controller_data", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
