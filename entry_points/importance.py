"""Entry point `importance`: leave-one-block-out drop per block and data set (in the reference answer's
log-likelihood by default, or in VQA score) on a train and a val subset, their consistency (Spearman
train vs val, cross-data-set matrix), and the merged drop order that the profiler and the base VLM use."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import mlflow
import torch

from core.knobs import KnobConfig
from core.profiling import planning
from core.vlm import plots
from core.vlm.backend import VLMBackend
from core.vlm.importance import (
    ALL_TIERS, ANSWER_LOG_LIKELIHOOD, ScoreFn, base_configs, beam_search_removal, consistency_report,
    importance_by_split, importance_metrics, score_measure,
)
from core.vlm.registry import load_backend
from core.vqa import sources
from core.vqa.suite import DATASETS
from tracking.artifacts import log_csv, log_figure, log_json
from tracking.cli import ParameterError, comma_list
from tracking.entry_point import EntryPoint
from tracking.model_refs import resolve_base_model_dir
from tracking.store import ADAPTIVE_VLM_STUDY


@dataclass
class Params:
    """Measure block importance of the base VLM and check its consistency across splits."""

    base_model: str = "models:/base-vlm@champion"  # base_vlm: registry URI or checkpoint directory
    dataset_names: str = ",".join(DATASETS)  # comma-separated data sets: the suite's, or with data_root text_vqa,coco_2014_vqa,okvqa
    train_samples: int = 60  # per data set, from the train split
    val_samples: int = 60  # per data set, from the val split
    tier: str = ALL_TIERS  # tier held fixed while blocks are removed; 'all' = the drop averaged over every tier
    top_k: int = 0  # 0 = the backend's trained top_k
    score: str = ANSWER_LOG_LIKELIHOOD  # answer_log_likelihood (graded) or vqa_score (greedy answers: saturates)
    beam_width: int = 0  # > 0: also a beam search over removal sets (on the merged val subset)
    max_removed: int = 3  # largest removal set of the beam search
    min_spearman: float = -1.0  # data sets whose train/val Spearman falls below are left out of the merge
    seed: int = 0  # which samples of each split
    num_threads: int = 2  # torch intra-op threads
    backend: str = "base_vlm"  # base_vlm | molmoe_arch (needs model_path and score=vqa_score)
    model_path: str = ""  # molmoe_arch: a local MolmoE-1B release directory (config.json, *.safetensors, tokenizer.json)
    data_root: str = ""  # a directory holding the real benchmarks in their published layouts; '' = the synthetic suite
    device: str = "cpu"  # cpu | cuda[:N]
    engine: str = "eager"  # molmoe_arch: eager | graph


@dataclass
class Prepared:
    backend: VLMBackend
    datasets: list[str]
    configs: list[KnobConfig]  # every block running, one per tier measured (the richest last)
    measure: ScoreFn | str


def prepare(params: Params) -> Prepared:
    if params.model_path and params.backend != "molmoe_arch":
        raise ParameterError(f"model_path applies to backend=molmoe_arch (a MolmoE-1B release directory), "
                             f"not backend={params.backend}")
    sources.check_data_root(params.data_root)
    datasets = comma_list(params.dataset_names, "dataset_names", sources.dataset_choices(params.data_root), allow_empty=False)
    if params.train_samples < 1 or params.val_samples < 1:
        raise ParameterError("train_samples and val_samples must be >= 1")
    if params.backend == "molmoe_arch" and not params.model_path:
        raise ParameterError("backend=molmoe_arch needs model_path (a MolmoE-1B release directory): random weights answer nothing")
    planning.check_engine_and_device(params.backend, params.engine, params.device)
    measure = score_measure(params.score)
    if measure == ANSWER_LOG_LIKELIHOOD and params.backend != "base_vlm":
        raise ParameterError(f"score={ANSWER_LOG_LIKELIHOOD} needs backend=base_vlm (teacher forcing); use score=vqa_score")
    if measure != ANSWER_LOG_LIKELIHOOD:
        measure = sources.answer_score(params.data_root)  # the official VQA accuracy on the real benchmarks
    checkpoint = str(resolve_base_model_dir(params.base_model)) if params.backend == "base_vlm" else None
    backend = load_backend(params.backend, params.device, checkpoint_dir=checkpoint, engine=params.engine,
                           model_path=params.model_path)
    return Prepared(backend, datasets, base_configs(backend.space, params.tier, params.top_k), measure)


def execute(params: Params, prepared: Prepared, epoch_hook: None = None) -> dict[str, Any]:
    torch.set_num_threads(params.num_threads)
    backend, num_blocks = prepared.backend, prepared.backend.space.num_blocks
    scores = importance_by_split(backend, prepared.datasets, {"train": params.train_samples, "val": params.val_samples},
                                 prepared.measure, prepared.configs, params.seed,
                                 load_samples=lambda ds, split, n, seed: sources.load_samples(ds, split, n, seed, params.data_root))
    for split, by_dataset in scores.items():
        for ds, drops in by_dataset.items():
            log_json({str(b): s for b, s in drops.items()}, f"importance/{ds}_{split}.json")
    report = consistency_report(scores["train"], scores["val"], num_blocks=num_blocks,
                                min_spearman=None if params.min_spearman <= -1 else params.min_spearman)
    drop_order = list(report["drop_order"])
    log_json({str(b): s for b, s in report["merged_scores"].items()}, "importance/merged_scores.json")
    log_json({"drop_order": drop_order, "num_blocks": num_blocks, "source_run": mlflow.active_run().info.run_id},
             "importance/drop_order.json")
    log_json({"per_dataset_spearman": report["per_dataset_spearman"], "excluded": report["excluded"],
              "notes": report["notes"], "drop_order": drop_order}, "importance/consistency_report.json")
    log_csv(report["cross_dataset"].reset_index(names="dataset"), "importance/cross_dataset_spearman.csv")
    log_figure(plots.plot_importance_by_block(scores["train"], scores["val"], params.score), "plots/importance_by_block.png")
    log_figure(plots.plot_cross_dataset_spearman(report["cross_dataset"]), "plots/cross_dataset_spearman.png")
    mlflow.log_metrics(importance_metrics(report))
    mlflow.set_tag("drop_order", ",".join(map(str, drop_order)))
    if params.beam_width > 0:
        val = sources.load_mixed(prepared.datasets, "val", params.val_samples, params.seed, params.data_root)
        beam = beam_search_removal(backend, val, prepared.measure, prepared.configs[-1], max_removed=params.max_removed,
                                   beam_width=params.beam_width)
        log_json(asdict(beam), "importance/beam_search.json")
    return {"drop_order": drop_order, "per_dataset_spearman": report["per_dataset_spearman"]}


def summary(params: Params, outcome: Mapping[str, Any]) -> str:
    rhos = ", ".join(f"{ds}={rho:.2f}" for ds, rho in outcome["per_dataset_spearman"].items())
    return f"drop order {outcome['drop_order']}; Spearman train vs val {rhos}"


ENTRY_POINT = EntryPoint("importance", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary,
                         prepare=prepare)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
