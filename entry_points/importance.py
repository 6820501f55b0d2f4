"""Entry point `importance` (Exp 6): leave-one-block-out drop per block and data set (in the reference
answer's log-likelihood by default, or in VQA score) on a train and a val subset, their consistency
(Spearman train vs val, cross-data-set matrix), and the merged drop order that the profiler and the
base VLM use."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.vlm.importance import ANSWER_LOG_LIKELIHOOD, beam_search_removal, consistency_report, leave_one_block_out_across  # noqa: E402
from core.knobs import TIERS  # noqa: E402
from core.vlm.registry import load_backend  # noqa: E402
from tracking.artifacts import log_csv, log_figure, log_json  # noqa: E402
from tracking.cli import exit_on_input_error, parse_params, params_as_dict  # noqa: E402
from tracking.model_refs import resolve_base_model_dir  # noqa: E402
from tracking.run_context import entry_point_run
from tracking.store import configure_tracking  # noqa: E402


SCORES = ("answer_log_likelihood", "vqa_score")
YLABELS = {"answer_log_likelihood": "drop in answer log-likelihood per token", "vqa_score": "accuracy drop (VQA score)"}


@dataclass
class Params:
    """Measure block importance of the base VLM and check its consistency across splits."""

    base_model: str = "models:/base-vlm@champion"  # registry URI or checkpoint directory
    dataset_names: str = "synth_textvqa,synth_countvqa,synth_attrvqa"
    train_samples: int = 60  # per data set, from the train split
    val_samples: int = 60  # per data set, from the val split
    tier: str = "all"  # tier held fixed while blocks are removed; 'all' = the drop averaged over every tier
    top_k: int = 0  # 0 = the backend's trained top_k
    score: str = "answer_log_likelihood"  # or vqa_score: the accuracy drop of greedy answers (coarse: saturates)
    beam_width: int = 0  # > 0: also a beam search over removal sets (on the merged val subset)
    max_removed: int = 3
    min_spearman: float = -1.0  # data sets whose train/val Spearman falls below are left out of the merge
    seed: int = 0
    num_threads: int = 2


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _plot_scores(train: dict, val: dict, ylabel: str) -> "plt.Figure":
    datasets = sorted(train)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        blocks = sorted(train[ds])
        x = np.arange(len(blocks))
        ax.bar(x - 0.2, [train[ds][b] for b in blocks], 0.4, label="train")
        ax.bar(x + 0.2, [val[ds][b] for b in blocks], 0.4, label="val")
        ax.set_xticks(x, [str(b) for b in blocks])
        ax.set_xlabel("block removed")
        ax.set_title(ds)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend()
    fig.tight_layout()
    return fig


def _plot_matrix(matrix) -> "plt.Figure":
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(matrix.to_numpy(dtype=float), vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), matrix.index)
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            ax.text(j, i, f"{matrix.iloc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="Spearman rho")
    ax.set_title("cross-data-set importance correlation")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="importance")
    from core.vqa.metrics import vqa_score
    from core.vqa.suite import DATASETS, load_split

    names = _names(params.dataset_names)
    unknown = [d for d in names if d not in DATASETS]
    if unknown or not names:
        raise ValueError(f"dataset_names: unknown data set(s) {unknown} (known: {', '.join(DATASETS)})")
    if params.tier != "all" and params.tier not in TIERS:
        raise ValueError(f"tier: {params.tier!r} is not 'all' or one of {', '.join(TIERS)}")
    if params.score not in SCORES:
        raise ValueError(f"score: {params.score!r} is not one of {', '.join(SCORES)}")
    if params.train_samples < 1 or params.val_samples < 1:
        raise ValueError("train_samples and val_samples must be >= 1")
    torch.set_num_threads(params.num_threads)
    configure_tracking()
    checkpoint = resolve_base_model_dir(params.base_model)  # before a run opens
    with entry_point_run("importance", params_as_dict(params)) as run:
        backend = load_backend("base_vlm", "cpu", checkpoint_dir=str(checkpoint))
        space = backend.space
        tiers = list(TIERS) if params.tier == "all" else [params.tier]
        configs = [space.make(t, params.top_k or space.default_top_k, space.num_blocks) for t in tiers]
        config = configs[-1]  # the beam search runs at the richest of them
        measure = vqa_score if params.score == "vqa_score" else ANSWER_LOG_LIKELIHOOD
        train_scores, val_scores = {}, {}
        for ds in names:
            for split, n, out in (("train", params.train_samples, train_scores), ("val", params.val_samples, val_scores)):
                samples = load_split(ds, split, n, seed=params.seed)
                out[ds] = leave_one_block_out_across(backend, samples, measure, configs)
                log_json({str(b): s for b, s in out[ds].items()}, f"importance/{ds}_{split}.json")
        report = consistency_report(train_scores, val_scores,
                                    min_spearman=None if params.min_spearman <= -1 else params.min_spearman,
                                    num_blocks=space.num_blocks)
        merged = report["merged_scores"]
        drop_order = list(report["drop_order"])
        log_json({str(b): s for b, s in merged.items()}, "importance/merged_scores.json")
        log_json({"drop_order": drop_order, "num_blocks": space.num_blocks, "source_run": run.info.run_id},
                 "importance/drop_order.json")
        per_ds = report["per_dataset_spearman"]
        log_json({"per_dataset_spearman": per_ds, "excluded": report["excluded"], "notes": report["notes"],
                  "drop_order": drop_order}, "importance/consistency_report.json")
        log_csv(report["cross_dataset"].reset_index(names="dataset"), "importance/cross_dataset_spearman.csv")
        log_figure(_plot_scores(train_scores, val_scores, YLABELS[params.score]), "plots/importance_by_block.png")
        log_figure(_plot_matrix(report["cross_dataset"]), "plots/cross_dataset_spearman.png")
        mlflow.log_metrics({f"spearman_{ds}": rho for ds, rho in per_ds.items() if not math.isnan(rho)})
        mlflow.log_metrics({f"importance_block_{b}": s for b, s in merged.items()})
        mlflow.set_tag("drop_order", ",".join(map(str, drop_order)))
        if params.beam_width > 0:
            val_all = [s for ds in names for s in load_split(ds, "val", params.val_samples, seed=params.seed)]
            beam = beam_search_removal(backend, val_all, measure, config, max_removed=params.max_removed,
                                       beam_width=params.beam_width)
            log_json(beam.__dict__ if hasattr(beam, "__dict__") else str(beam), "importance/beam_search.json")
    rhos = ", ".join(f"{ds}={rho:.2f}" for ds, rho in per_ds.items())
    print(f"importance: drop order {drop_order}; Spearman train vs val {rhos}; run {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
