"""Entry point `evaluate_base_model`: the base VLM's test-split accuracy at named configs, CPU latency
medians (full, minimal, and one knob at a time), and an accuracy/latency table over the whole grid."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow
import torch

from core.profiling import planning
from core.vlm import plots
from core.vlm.evaluation import (accuracy_by_config, evaluation_metrics, grid_table, knob_accuracy_curves, knob_costs,
                                 latency_by_config, one_knob_configs)
from core.vlm.backend import VLMBackend
from core.vlm.registry import load_backend
from core.vqa.sample import samples_frame
from core.vqa import sources
from core.vqa.suite import DATASETS
from tracking.artifacts import log_csv, log_dataset_input, log_figure, log_json
from tracking.cli import ParameterError, comma_list
from tracking.entry_point import EntryPoint
from tracking.model_refs import resolve_base_model_dir, resolve_drop_order
from tracking.store import ADAPTIVE_VLM_STUDY


@dataclass
class Params:
    """Score the base VLM on the test split (named configs, and each knob alone at every tier) and time it on the CPU."""

    base_model: str = "models:/base-vlm@champion"  # base_vlm: registry URI or checkpoint directory
    dataset_names: str = ",".join(DATASETS)  # comma-separated data sets: the suite's, or with data_root text_vqa,coco_2014_vqa,okvqa
    test_samples: int = 200  # per data set
    latency_samples: int = 6  # requests timed per config (batch 1)
    latency_repeats: int = 5  # timed answers per request (their median counts; at least 5)
    grid_samples: int = 4  # per data set, for the whole-grid table
    grid_repeats: int = 3  # timed answers per (sample, config) in the grid table
    importance: str = ""  # an importance run id or JSON file; '' = the checkpoint's default order
    seed: int = 0  # which test samples (the latency and grid subsets use seed + 1 and seed + 2)
    num_threads: int = 2  # torch intra-op threads
    backend: str = "base_vlm"  # base_vlm | molmoe_arch (needs model_path)
    model_path: str = ""  # molmoe_arch: a local MolmoE-1B release directory (config.json, *.safetensors, tokenizer.json)
    data_root: str = ""  # a directory holding the real benchmarks in their published layouts (test -> val split); '' = the synthetic suite
    device: str = "cpu"  # cpu | cuda[:N]
    engine: str = "eager"  # molmoe_arch: eager | graph


@dataclass
class Prepared:
    backend: VLMBackend  # with the measured drop order when `importance` names one
    datasets: list[str]


def prepare(params: Params) -> Prepared:
    for name in ("test_samples", "latency_samples", "grid_samples"):
        if getattr(params, name) < 1:
            raise ParameterError(f"{name} must be >= 1, got {getattr(params, name)}")
    if params.latency_repeats < 5:
        raise ParameterError(f"latency_repeats must be >= 5, got {params.latency_repeats}")
    if params.model_path and params.backend != "molmoe_arch":
        raise ParameterError(f"model_path applies to backend=molmoe_arch (a MolmoE-1B release directory), "
                             f"not backend={params.backend}")
    sources.check_data_root(params.data_root)
    datasets = comma_list(params.dataset_names, "dataset_names", sources.dataset_choices(params.data_root), allow_empty=False)
    if params.backend == "molmoe_arch" and not params.model_path:
        raise ParameterError("backend=molmoe_arch needs model_path (a MolmoE-1B release directory): random weights answer nothing")
    planning.check_engine_and_device(params.backend, params.engine, params.device)
    checkpoint = str(resolve_base_model_dir(params.base_model)) if params.backend == "base_vlm" else None
    backend = load_backend(params.backend, params.device, checkpoint_dir=checkpoint, engine=params.engine,
                           model_path=params.model_path)
    order = resolve_drop_order(params.importance, backend.space.num_blocks)
    if order is not None:
        backend.set_drop_order(order)
    return Prepared(backend, datasets)


def execute(params: Params, prepared: Prepared, epoch_hook: None = None) -> dict[str, float]:
    torch.set_num_threads(params.num_threads)
    backend = prepared.backend
    score_fn, root = sources.answer_score(params.data_root), params.data_root
    test = sources.load_mixed(prepared.datasets, "test", params.test_samples, params.seed, root)
    log_dataset_input(samples_frame(test), "real-vqa-val" if root else "synthetic-vqa-test", "test",
                      {"source": root, "reader": "core.vqa.real_data.load_real_split"} if root else
                      {"generator": "core.vqa.suite.load_split", "seed": str(params.seed)})
    accuracy, predictions = accuracy_by_config(backend, test, score_fn=score_fn)
    log_csv(predictions, "evaluation/test_predictions_full.csv")

    # CPU latency: batch 1, warm-up, medians; every knob alone from the full config.
    timed = sources.load_mixed(prepared.datasets, "test", params.latency_samples, params.seed + 1, root)[: params.latency_samples]
    latency = latency_by_config(backend, timed, one_knob_configs(backend.space), repeats=params.latency_repeats)
    device = backend.device.type
    log_csv(latency, f"evaluation/{device}_latency_by_knob.csv")
    metrics = evaluation_metrics(accuracy, latency, device=device)

    # One knob at a time from the full config, at every tier, on the same test samples.
    curves = knob_accuracy_curves(backend, test, score_fn=score_fn)
    log_csv(curves, "evaluation/knob_curves.csv")
    log_figure(plots.plot_knob_curves(curves), "plots/knob_curves.png")
    metrics.update({f"test_vqa_score_{name}": float(v) for name, v in zip(curves["name"], curves["vqa_score"])})
    metrics.update({f"test_{name}": v for name, v in knob_costs(curves).items()})

    grid_subset = sources.load_mixed(prepared.datasets, "test", params.grid_samples, params.seed + 2, root)
    table = grid_table(backend, grid_subset, backend.space, repeats=params.grid_repeats, score_fn=score_fn)
    log_csv(table, "evaluation/grid_accuracy_latency.csv")
    log_figure(plots.plot_grid_accuracy_latency(table), "plots/grid_accuracy_latency.png")
    mlflow.log_metrics(metrics)
    log_json(metrics, "evaluation/metrics.json")
    return metrics


def summary(params: Params, metrics: Mapping[str, Any]) -> str:
    device = params.device.split(":")[0]
    return (f"test VQA full {metrics['test_vqa_score_full']:.3f}, min {metrics['test_vqa_score_min']:.3f}; "
            f"top_k costs {metrics['test_knob_cost_top_k_high']:.3f}, blocks {metrics['test_knob_cost_blocks_high']:.3f} "
            f"at the high tier; {device.upper()} latency full {metrics[f'{device}_latency_ms_full']:.1f} ms, "
            f"min {metrics[f'{device}_latency_ms_min']:.1f} ms")


ENTRY_POINT = EntryPoint("evaluate_base_model", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
