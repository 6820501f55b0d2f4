"""Entry point `evaluate_base_model`: the base VLM's test-split accuracy at named configs, CPU latency
medians (full, minimal, and one knob at a time), and an accuracy/latency table over the whole grid."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from core.knobs import TIERS  # noqa: E402
from core.vlm.registry import load_backend  # noqa: E402
from core.vlm.evaluation import grid_table, latency_medians, score_split  # noqa: E402
from core.vqa.suite import DATASETS, load_split  # noqa: E402
from tracking.artifacts import log_csv, log_dataset_input, log_figure, log_json  # noqa: E402
from tracking.cli import exit_on_input_error, parse_params, params_as_dict  # noqa: E402
from tracking.model_refs import resolve_base_model_dir, resolve_drop_order  # noqa: E402
from tracking.run_context import entry_point_run
from tracking.store import configure_tracking  # noqa: E402


@dataclass
class Params:
    """Score the base VLM on the test split and time it on the CPU."""

    base_model: str = "models:/base-vlm@champion"
    dataset_names: str = "synth_textvqa,synth_countvqa,synth_attrvqa"
    test_samples: int = 200  # per data set
    latency_samples: int = 6  # requests timed per config (batch 1)
    latency_repeats: int = 5
    grid_samples: int = 4  # per data set, for the whole-grid table
    grid_repeats: int = 3  # timed answers per (sample, config) in the grid table
    importance: str = ""  # an importance run id or JSON file; '' = the checkpoint's default order
    seed: int = 0
    num_threads: int = 2


def _plot_grid(table: pd.DataFrame) -> "plt.Figure":
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for tier, marker in zip(TIERS, "o^s"):
        part = table[table["tier"] == tier]
        points = ax.scatter(part["T_total_ms"], part["vqa_score"], c=part["num_active_blocks"], marker=marker,
                            cmap="viridis", label=f"tier {tier}", edgecolors="k", linewidths=0.3)
    fig.colorbar(points, ax=ax, label="active blocks")
    ax.set_xlabel("median T_total (ms, CPU, batch 1)")
    ax.set_ylabel("VQA score (grid subset)")
    ax.set_title("base VLM: accuracy vs latency over the knob grid")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="evaluate_base_model")
    for name in ("test_samples", "latency_samples", "grid_samples"):
        if getattr(params, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(params, name)}")
    if params.latency_repeats < 5:
        raise ValueError(f"latency_repeats must be >= 5, got {params.latency_repeats}")
    datasets = [d.strip() for d in params.dataset_names.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise ValueError(f"dataset_names: unknown data set(s) {unknown} (known: {', '.join(DATASETS)})")
    torch.set_num_threads(params.num_threads)
    configure_tracking()
    checkpoint = resolve_base_model_dir(params.base_model)  # before a run opens
    with entry_point_run("evaluate_base_model", params_as_dict(params)) as run:
        backend = load_backend("base_vlm", "cpu", checkpoint_dir=str(checkpoint))
        order = resolve_drop_order(params.importance, backend.space.num_blocks)
        if order is not None:
            backend.set_drop_order(order)
        space = backend.space
        full, minimal = space.full(), space.minimal()
        test = [s for d in datasets for s in load_split(d, "test", params.test_samples, seed=params.seed)]
        log_dataset_input(pd.DataFrame([{"sample_id": s.sample_id, "question": s.question} for s in test]),
                          "synthetic-vqa-test", "test", {"generator": "core.vqa.suite.load_split", "seed": str(params.seed)})

        metrics: dict[str, float] = {}
        scored = {"full": score_split(backend, test, full), "min": score_split(backend, test, minimal)}
        for name, result in scored.items():
            metrics[f"test_vqa_score_{name}"] = result["vqa_score_mean_over_datasets"]
            metrics[f"test_exact_match_{name}"] = result["exact_match"]
            for ds, r in result["per_dataset"].items():
                metrics[f"test_vqa_score_{ds}_{name}"] = r["vqa_score"]
        for tier in TIERS:
            result = scored["full"] if tier == full.tier else score_split(backend, test, replace(full, tier=tier))
            for ds, r in result["per_dataset"].items():
                metrics[f"test_vqa_score_{ds}_{tier}"] = r["vqa_score"]
        log_csv(pd.DataFrame(scored["full"]["predictions"]), "evaluation/test_predictions_full.csv")

        # CPU latency: batch 1, warm-up, medians; every knob alone from the full config.
        timed = [s for d in datasets for s in load_split(d, "test", params.latency_samples, seed=params.seed + 1)][
            : params.latency_samples]
        configs = {"full": full, "min": minimal}
        configs.update({f"tier_{t}": replace(full, tier=t) for t in TIERS})
        configs.update({f"top_k_{k}": replace(full, top_k=k) for k in space.top_k_options})
        configs.update({f"blocks_{b}": replace(full, num_active_blocks=b) for b in space.block_options})
        latency_rows = []
        for name, config in configs.items():
            timing = latency_medians(backend, timed, config, repeats=params.latency_repeats)
            metrics[f"cpu_latency_ms_{name}"] = timing.median_ms
            latency_rows.append({"name": name, **config.as_dict(), "median_ms": timing.median_ms,
                                 "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms})
        metrics["cpu_latency_ratio_min_over_full"] = metrics["cpu_latency_ms_min"] / metrics["cpu_latency_ms_full"]
        metrics["vqa_ratio_min_over_full"] = metrics["test_vqa_score_min"] / max(metrics["test_vqa_score_full"], 1e-9)
        log_csv(pd.DataFrame(latency_rows), "evaluation/cpu_latency_by_knob.csv")

        grid_subset = [s for d in datasets for s in load_split(d, "test", params.grid_samples, seed=params.seed + 2)]
        table = grid_table(backend, grid_subset, space, repeats=params.grid_repeats)
        log_csv(table, "evaluation/grid_accuracy_latency.csv")
        log_figure(_plot_grid(table), "plots/grid_accuracy_latency.png")
        mlflow.log_metrics(metrics)
        log_json(metrics, "evaluation/metrics.json")
    print(
        f"evaluate_base_model: test VQA full {metrics['test_vqa_score_full']:.3f}, min {metrics['test_vqa_score_min']:.3f}; "
        f"CPU latency full {metrics['cpu_latency_ms_full']:.1f} ms, min {metrics['cpu_latency_ms_min']:.1f} ms; "
        f"run {run.info.run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
