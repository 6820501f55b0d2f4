"""Entry point `profile`: every knob config x samples x runs of a backend, timed per stage, into a
resumable, shardable Parquet table (the latency estimator's training data)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import mlflow
import torch

from core.profiling import planning, plots, summaries
from core.profiling.profiler import ProfileSweepConfig, ScoreFn, load_protocol, run_sweep
from core.profiling.schema import ROW_KEY_FIELDS
from core.profiling.store import ProfileStore
from core.vlm.backend import VLMBackend
from core.vlm.registry import load_backend
from core.vqa import sources
from core.vqa.sample import VQASample
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_figures, log_json
from tracking.cli import comma_list, config_from_params, params_as_dict
from tracking.entry_point import EntryPoint, EpochHook
from tracking.model_refs import resolve_base_model_dir, resolve_drop_order
from tracking.run_context import set_data_digest
from tracking.store import ADAPTIVE_VLM_STUDY

_D = ProfileSweepConfig()  # the sweep defaults live in core


@dataclass
class Params:
    """Profile a backend over the whole knob grid."""

    backend: str = _D.backend  # base_vlm | molmoe_arch (random weights: latency only, unless model_path)
    dataset_names: str = ",".join(_D.dataset_names)  # comma-separated data sets: the suite's, or with data_root text_vqa,coco_2014_vqa,okvqa
    split: str = "test"  # base_vlm: the split the samples come from
    num_samples: int = _D.num_samples  # per data set
    num_runs: int = _D.num_runs  # timed rows per (sample, config)
    results_dir: str = "results/profiles/cpu-base-vlm"  # the table (a ProfileStore); a rerun resumes it
    shard: int = _D.shard  # this worker's share of the grid, in [0, num_shards)
    num_shards: int = _D.num_shards  # workers splitting the grid between them
    merge: bool = False  # compact all shards into one Parquet per data set after this sweep
    device: str = "cpu"  # cpu | cuda[:N]
    seed: int = _D.seed  # sample choice and work order
    warmup: int = _D.warmup  # untimed answers before the first timed one
    flush_every: int = _D.flush_every  # rows per Parquet part written (what a killed worker can lose)
    base_model: str = "models:/base-vlm@champion"  # base_vlm: a registry URI or a checkpoint directory
    importance: str = ""  # an importance run id or JSON file; '' = the backend's default order
    size: str = "reference"  # molmoe_arch size preset (tiny for CPU smoke runs)
    prompt_lengths: str = "16,64"  # molmoe_arch: comma-separated probe prompt lengths (text tokens)
    force_output_tokens: int = 0  # > 0: answers of exactly this length (0: each sample's own; molmoe_arch probes: 8)
    num_threads: int = 2  # torch CPU threads
    timing_repeats: int = _D.timing_repeats  # answers per row; the row holds their per-component medians
    drift_reference: bool = _D.drift_reference  # rescale each repeat by a reference request timed just before it (noisy CPUs)
    engine: str = "eager"  # molmoe_arch: eager | graph (StaticCache + CUDA-graph replay) | fused (graph + Triton decode, tiling on the GPU)
    model_path: str = ""  # molmoe_arch: a local MolmoE-1B release directory (config.json, *.safetensors, tokenizer.json): real weights, scored answers
    data_root: str = ""  # a directory holding the real benchmarks in their published layouts; '' = the synthetic suite


@dataclass
class Prepared:
    config: ProfileSweepConfig
    backend: VLMBackend
    samples: dict[str, list[VQASample]]
    score_fn: ScoreFn | None  # None: a latency-only backend (accuracy NaN)


def prepare(params: Params) -> Prepared:
    """Check every parameter, build the backend (with its drop order) and the samples, check the results_dir."""
    planning.check_engine_and_device(params.backend, params.engine, params.device)
    ProfileStore(params.results_dir).check_writable()  # before any sweep: a file there loses the first flush
    choices = sources.dataset_choices(params.data_root)  # checks data_root
    names = [] if planning.is_latency_only(params.backend, params.model_path) else comma_list(
        params.dataset_names, "dataset_names", choices, allow_empty=False)
    prompt_lengths = planning.parse_prompt_lengths(comma_list(params.prompt_lengths, "prompt_lengths"))
    dataset_names, forced = planning.sweep_datasets(params.backend, names, params.force_output_tokens, params.model_path)
    config = config_from_params(ProfileSweepConfig, params, dataset_names=dataset_names, force_output_tokens=forced)
    torch.set_num_threads(params.num_threads)
    checkpoint = str(resolve_base_model_dir(params.base_model)) if params.backend == "base_vlm" and not params.model_path else None
    backend = load_backend(params.backend, params.device, checkpoint_dir=checkpoint, size=params.size, engine=params.engine,
                           model_path=params.model_path)
    if (order := resolve_drop_order(params.importance, backend.space.num_blocks)) is not None:
        backend.set_drop_order(order)
    planning.check_block_order(ProfileStore(params.results_dir), dataset_names, backend.space.num_blocks, backend.drop_order)
    samples = planning.sweep_samples(config, params.split, prompt_lengths, params.model_path, params.data_root)
    return Prepared(config, backend, samples, planning.score_function(params.backend, params.model_path, params.data_root))


def execute(params: Params, prepared: Prepared, epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    """Run the sweep; log the table (artifacts, data set input, digest), its summaries, figures and metrics."""
    config, store, names = prepared.config, ProfileStore(params.results_dir), list(prepared.config.dataset_names)
    drop_order = list(prepared.backend.drop_order)
    mlflow.set_tags({"drop_order": ",".join(map(str, drop_order)), "drop_order_source": params.importance or "default"})
    sweep = run_sweep(prepared.backend, prepared.samples, config, store, prepared.score_fn)
    if params.merge:
        store.merge()
    table = store.load(names)
    set_data_digest(frame_digest(table[list(ROW_KEY_FIELDS)]))
    log_dataset_input(table, name=f"profile-{params.backend}", context="profile", source=str(store.results_dir.resolve()))
    for path in store.part_files(names):
        mlflow.log_artifact(str(path), artifact_path=f"profiles/{path.parent.name}")
    median_cv = summaries.median_run_to_run_cv(table)
    log_csv(median_cv.rename("median_cv").rename_axis("component").reset_index(), "summaries/run_to_run_cv.csv")
    log_csv(summaries.knob_step_effects(table), "summaries/knob_step_effects.csv")
    log_csv(summaries.config_summary(table), "summaries/config_summary.csv")
    full = prepared.backend.space.full()
    log_csv(summaries.static_lookup_choices(table, (full.tier, full.top_k, full.num_active_blocks)), "summaries/lookup_choices.csv")
    log_figures(plots.profile_figures(table))
    metrics = summaries.sweep_metrics(sweep, table, median_cv)
    mlflow.log_metrics(metrics)
    protocol = load_protocol(store)
    if protocol is not None:
        mlflow.log_dict(asdict(protocol), "timing_protocol.json")
    log_json({"sweep": params_as_dict(params), "drop_order": drop_order, "datasets": names, "rows": len(table),
              "median_cv_T_total_ms": metrics["median_cv_T_total_ms"]}, "profile_summary.json")
    return metrics


def summary(params: Params, m: Mapping[str, Any]) -> str:
    return (f"{m['rows_written']} {params.backend} rows written, {m['rows_skipped']} already there, {m['rows_total']} "
            f"in {params.results_dir}; median run-to-run CV of T_total {m['median_cv_T_total_ms']:.3f}")


ENTRY_POINT = EntryPoint("profile", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary, prepare=prepare)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
