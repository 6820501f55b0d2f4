"""Entry point `profile` (Exp 7): every knob config x samples x runs, timed per stage, into a
resumable, shardable Parquet table (the estimator's and controllers' training data)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch

from core.profiling import plots as profile_plots
from core.knobs import active_blocks
from core.profiling.schema import decode_list
from core.profiling.store import ProfileStore
from core.profiling.profiler import ProfileSweepConfig, load_protocol, run_sweep
from core.vlm.backend import BACKENDS, ENGINES
from core.vlm.registry import load_backend
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_figure, log_json
from tracking.cli import exit_on_input_error, parse_params, params_as_dict
from tracking.model_refs import resolve_base_model_dir, resolve_drop_order
from tracking.run_context import entry_point_run, set_data_digest
from tracking.store import configure_tracking


@dataclass
class Params:
    """Profile a backend over the whole knob grid."""

    backend: str = "base_vlm"  # base_vlm | molmoe_arch
    dataset_names: str = "synth_textvqa,synth_countvqa,synth_attrvqa"
    split: str = "test"
    num_samples: int = 100  # per data set
    num_runs: int = 3
    results_dir: str = "results/profiles/cpu-base-vlm"
    shard: int = 0
    num_shards: int = 1
    merge: bool = False  # compact all shards into one Parquet per data set after this sweep
    device: str = "cpu"
    seed: int = 0
    warmup: int = 2
    flush_every: int = 50
    base_model: str = "models:/base-vlm@champion"  # base_vlm: a registry URI or a checkpoint directory
    importance: str = ""  # an importance run id or JSON file; '' = the backend's default order
    size: str = "reference"  # molmoe_arch size preset (tiny for CPU smoke runs)
    model_path: str = ""  # molmoe_arch: a local MolmoE checkpoint directory (trust_remote_code, no hub)
    prompt_lengths: str = "16,64"  # molmoe_arch probe prompts (text tokens)
    force_output_tokens: int = 0  # > 0: answers of exactly this length (molmoe_arch default 8)
    num_threads: int = 2
    timing_repeats: int = 1  # answers per row; the row holds their per-component medians
    drift_reference: bool = False  # rescale each repeat by a reference request timed just before it (noisy CPUs)
    engine: str = "eager"  # molmoe_arch: eager | graph (StaticCache + CUDA-graph replay)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def validate(params: Params) -> None:
    if params.backend not in BACKENDS:
        raise ValueError(f"backend={params.backend!r} is unknown (choose from: {', '.join(BACKENDS)})")
    if params.backend == "base_vlm":
        from core.vqa.suite import DATASETS

        unknown = [d for d in _names(params.dataset_names) if d not in DATASETS]
        if unknown or not _names(params.dataset_names):
            raise ValueError(f"dataset_names: unknown data set(s) {unknown} (known: {', '.join(DATASETS)})")
    if params.timing_repeats < 1:
        raise ValueError(f"timing_repeats={params.timing_repeats} must be >= 1")
    if params.engine not in ENGINES:
        raise ValueError(f"engine={params.engine!r} is unknown (choose from: {', '.join(ENGINES)})")
    if params.engine != "eager" and params.backend != "molmoe_arch":
        raise ValueError(f"engine={params.engine!r} applies to backend=molmoe_arch only")
    if params.num_samples < 1 or params.num_runs < 1:
        raise ValueError(f"num_samples ({params.num_samples}) and num_runs ({params.num_runs}) must be >= 1")
    if not 0 <= params.shard < params.num_shards:
        raise ValueError(f"shard={params.shard} must lie in [0, num_shards={params.num_shards})")
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={params.device!r} but no CUDA device is available")
    if params.model_path:
        if params.backend != "molmoe_arch":
            raise ValueError("model_path applies to backend=molmoe_arch only")
        from core.vlm.molmoe_arch import load_local_checkpoint

        load_local_checkpoint(params.model_path)  # one clear line for a directory without a checkpoint
        # Molmo's remote code has its own decoder classes: the knob hooks of molmoe_arch do not reach them yet.
        raise ValueError(f"model_path={params.model_path}: checkpoint loads, but knob control of Molmo's remote-code "
                         "model is not implemented; profile the molmoe_arch architecture (random weights) instead")


def _check_block_order(store: ProfileStore, names: list[str], backend) -> None:
    """Resuming into rows measured under another drop order would mix two different grids."""
    if not store.part_files(names):
        return
    existing = store.load(names)[["num_active_blocks", "active_blocks"]].drop_duplicates()
    for n, blocks in existing.itertuples(index=False):
        expected = list(active_blocks(backend.space.num_blocks, int(n), backend.drop_order))
        if decode_list(blocks) != expected:
            raise ValueError(
                f"results_dir {store.results_dir} holds rows with {n} active blocks = {decode_list(blocks)}, but the "
                f"current drop order gives {expected}: profile into a new results_dir"
            )


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="profile")
    validate(params)
    torch.set_num_threads(params.num_threads)
    configure_tracking()
    # References resolve before a run opens, so a typo leaves nothing behind.
    checkpoint = resolve_base_model_dir(params.base_model) if params.backend == "base_vlm" else None
    with entry_point_run("profile", params_as_dict(params)) as run:
        if params.backend == "base_vlm":
            from core.vqa.metrics import vqa_score
            from core.vqa.suite import load_split

            backend = load_backend("base_vlm", params.device, checkpoint_dir=str(checkpoint))
            names = _names(params.dataset_names)
            samples = {d: load_split(d, params.split, params.num_samples, seed=params.seed) for d in names}
            score_fn, forced = vqa_score, (params.force_output_tokens or None)
        else:
            from core.vlm.molmoe_arch import synthetic_latency_samples

            backend = load_backend("molmoe_arch", params.device, size=params.size, engine=params.engine)
            forced = params.force_output_tokens or 8
            name = f"latency_probe_out{forced}"
            lengths = [int(x) for x in _names(params.prompt_lengths)]
            samples = {name: synthetic_latency_samples(lengths, [(640, 480)], params.num_samples, max_new_tokens=forced,
                                                       seed=params.seed, dataset=name)}
            names, score_fn = [name], None
        order = resolve_drop_order(params.importance, backend.space.num_blocks)
        if order is not None:
            backend.set_drop_order(order)
        drop_order = list(getattr(backend, "drop_order", []))
        mlflow.set_tags({"drop_order": ",".join(map(str, drop_order)),
                         "drop_order_source": params.importance or "default"})

        store = ProfileStore(params.results_dir)
        _check_block_order(store, names, backend)
        config = ProfileSweepConfig(
            backend=params.backend, dataset_names=tuple(names), num_samples=params.num_samples,
            num_runs=params.num_runs, shard=params.shard, num_shards=params.num_shards, seed=params.seed,
            warmup=params.warmup, flush_every=params.flush_every, force_output_tokens=forced,
            timing_repeats=params.timing_repeats, drift_reference=params.drift_reference,
        )
        start = time.perf_counter()
        summary = run_sweep(backend, samples, config, store, score_fn)
        if params.merge:
            store.merge()
        table = store.load(names)
        set_data_digest(frame_digest(table[["sample_id", "tier", "top_k", "num_active_blocks", "run_index"]]))
        log_dataset_input(table, name=f"profile-{params.backend}", context="profile",
                          source=str(Path(params.results_dir).resolve()))
        for path in sorted(Path(params.results_dir).rglob("*.parquet")):
            if path.parent.name in names:
                mlflow.log_artifact(str(path), artifact_path=f"profiles/{path.parent.name}")

        cv = profile_plots.run_to_run_cv(table)
        steps = profile_plots.knob_step_effects(table)
        cv_medians = cv.drop(columns=["sample_id", "tier", "top_k", "num_active_blocks"]).median()
        log_csv(cv_medians.rename("median_cv").rename_axis("component").reset_index(), "summaries/run_to_run_cv.csv")
        log_csv(steps, "summaries/knob_step_effects.csv")
        log_csv(profile_plots.config_summary(table), "summaries/config_summary.csv")
        for ds in names:
            part = table[table["dataset"] == ds]
            if part["accuracy"].notna().any():
                log_figure(profile_plots.plot_accuracy_latency_pareto(part), f"plots/pareto_{ds}.png")
        log_figure(profile_plots.plot_latency_by_knob(table), "plots/latency_by_knob.png")
        log_figure(profile_plots.plot_repeatability(table), "plots/repeatability.png")
        median_cv = float(cv_medians.get("T_total_ms", float("nan")))
        metrics = {
            "rows_written": summary.rows_written, "rows_skipped": summary.rows_skipped,
            "rows_planned": summary.rows_planned, "rows_total": len(table),
            "sweep_wall_time_s": time.perf_counter() - start, "median_cv_T_total_ms": median_cv,
            "median_T_total_ms": float(table["T_total_ms"].median()),
        }
        mlflow.log_metrics(metrics)
        protocol = load_protocol(store)
        if protocol is not None:
            mlflow.log_dict(asdict(protocol), "timing_protocol.json")
        log_json({"sweep": params_as_dict(params), "drop_order": drop_order, "datasets": names,
                  "rows": len(table), "median_cv_T_total_ms": median_cv}, "profile_summary.json")
    print(
        f"profile {params.backend}: {summary.rows_written} rows written, {summary.rows_skipped} already there, "
        f"{len(table)} in {params.results_dir}; median run-to-run CV of T_total {median_cv:.3f}; run {run.info.run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
