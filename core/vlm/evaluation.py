"""Accuracy and latency of a VLM backend on VQA samples, at one knob config or over the whole grid.

Everything goes through `VLMBackend.answer` (greedy, batch 1, knobs applied and restored per
request), the same path the profiler and adaptive inference take, so the figures are comparable.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Callable, Sequence

import pandas as pd
from tqdm import tqdm

from core.knobs import TIERS, KnobConfig, KnobSpace
from core.timing import STAGE_COLUMNS, RepeatedTiming, summarize_ms
from core.vlm.backend import VLMBackend
from core.vqa.sample import VQASample
from core.vqa.metrics import exact_match, vqa_score

ScoreFn = Callable[[str, Sequence[str]], float]  # (prediction, answers) -> score; vqa_score unless told


def score_split(backend: VLMBackend, samples: Sequence[VQASample], config: KnobConfig, progress: bool = True,
                score_fn: ScoreFn = vqa_score) -> dict:
    """Greedy answers under `config` and their scores.

    Returns {"vqa_score": mean over samples, "exact_match": ..., "vqa_score_mean_over_datasets": mean of
    the per-data-set means, "per_dataset": {dataset: {"vqa_score", "exact_match", "n"}},
    "predictions": [{"sample_id", "dataset", "prediction", "answer", "vqa_score", "exact_match",
    "output_tokens", "T_total_ms"}]}.
    """
    if not samples:
        raise ValueError("score_split needs at least one sample")
    rows = []
    for s in tqdm(samples, desc=f"score {config.key}", leave=False, disable=not progress):
        r = backend.answer(s, config)
        rows.append(
            {
                "sample_id": s.sample_id,
                "dataset": s.dataset,
                "prediction": r.text,
                "answer": s.answers[0],
                "vqa_score": score_fn(r.text, s.answers),
                "exact_match": exact_match(r.text, s.answers),
                "output_tokens": r.output_tokens,
                "T_total_ms": r.T_total_ms,
            }
        )
    per_dataset: dict[str, dict[str, float]] = {}
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == ds]
        per_dataset[ds] = {
            "vqa_score": statistics.fmean(r["vqa_score"] for r in mine),
            "exact_match": statistics.fmean(r["exact_match"] for r in mine),
            "n": len(mine),
        }
    return {
        "vqa_score": statistics.fmean(r["vqa_score"] for r in rows),
        "exact_match": statistics.fmean(r["exact_match"] for r in rows),
        "vqa_score_mean_over_datasets": statistics.fmean(d["vqa_score"] for d in per_dataset.values()),
        "per_dataset": per_dataset,
        "predictions": rows,
    }


def answers_under(backend: VLMBackend, samples: Sequence[VQASample], config: KnobConfig) -> list[str]:
    """Greedy answers under `config`: batched where the backend can (`answer_batch`), else one by one."""
    batched = getattr(backend, "answer_batch", None)
    if batched is not None:
        return list(batched(samples, config))
    return [backend.answer(s, config).text for s in samples]


def knob_curve_configs(space: KnobSpace) -> dict[str, KnobConfig]:
    """Every option of one knob (top_k or blocks) with the other at its full value, at each tier.

    Named top_k_<k> / blocks_<n> at the highest tier (the metric names `evaluate_base_model` logs as
    test_vqa_score_<name>) and <tier>_top_k_<k> / <tier>_blocks_<n> at the tiers below.
    """
    full = space.full()
    configs: dict[str, KnobConfig] = {}
    for tier in TIERS:
        prefix = "" if tier == full.tier else f"{tier}_"
        at_tier = replace(full, tier=tier)
        configs.update({f"{prefix}top_k_{k}": replace(at_tier, top_k=k) for k in space.top_k_options})
        configs.update({f"{prefix}blocks_{b}": replace(at_tier, num_active_blocks=b) for b in space.block_options})
    return configs


def knob_accuracy_curves(backend: VLMBackend, samples: Sequence[VQASample], progress: bool = True,
                         score_fn: ScoreFn = vqa_score) -> pd.DataFrame:
    """Accuracy of every `knob_curve_configs` config on `samples`: one row per config with name, knob
    ("top_k" or "blocks"), the three knob values, vqa_score (mean over data sets, as reported) and
    vqa_score_<dataset>. Configs shared by both curves are answered once."""
    answered: dict[KnobConfig, dict[str, float]] = {}
    rows = []
    for name, config in tqdm(knob_curve_configs(backend.space).items(), desc="knob curves", disable=not progress):
        if config not in answered:
            by_ds: dict[str, list[float]] = {}
            for s, text in zip(samples, answers_under(backend, samples, config)):
                by_ds.setdefault(s.dataset, []).append(score_fn(text, s.answers))
            scores = {f"vqa_score_{ds}": statistics.fmean(v) for ds, v in by_ds.items()}
            answered[config] = {"vqa_score": statistics.fmean(scores.values()), **scores}
        knob = "top_k" if "top_k_" in name else "blocks"
        rows.append({"name": name, "knob": knob, **config.as_dict(), **answered[config]})
    return pd.DataFrame(rows)


def knob_costs(curves: pd.DataFrame) -> dict[str, float]:
    """What each knob costs at each tier, from `knob_accuracy_curves`' table (mean VQA score):
    knob_cost_<knob>_<tier> = accuracy at the knob's largest option - at its smallest, and
    knob_min_step_<knob>_<tier> = the smallest drop of one step down (negative where a step gains)."""
    out: dict[str, float] = {}
    for (knob, tier), part in curves.groupby(["knob", "tier"], sort=False):
        column = "top_k" if knob == "top_k" else "num_active_blocks"
        scores = part.sort_values(column)["vqa_score"].to_numpy()
        out[f"knob_cost_{knob}_{tier}"] = float(scores[-1] - scores[0])
        out[f"knob_min_step_{knob}_{tier}"] = float(min(scores[1:] - scores[:-1]))
    return out


def latency_medians(
    backend: VLMBackend,
    samples: Sequence[VQASample],
    config: KnobConfig,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = False,
) -> RepeatedTiming:
    """T_total (ms) at batch 1 under `config`: per sample the median of `repeats` timed answers after
    `warmup` untimed ones; the returned figure summarises those per-sample medians (its median_ms is
    the median over samples, samples_ms holds one median per sample)."""
    if repeats < 5:
        raise ValueError(f"latency needs at least 5 repeats, got {repeats}")
    if not samples:
        raise ValueError("latency_medians needs at least one sample")
    per_sample = []
    for s in tqdm(samples, desc=f"latency {config.key}", leave=False, disable=not progress):
        for _ in range(warmup):
            backend.answer(s, config)
        per_sample.append(statistics.median(backend.answer(s, config).T_total_ms for _ in range(repeats)))
    return summarize_ms(per_sample)


def accuracy_by_config(backend: VLMBackend, samples: Sequence[VQASample],
                       score_fn: ScoreFn = vqa_score) -> tuple[dict[str, float], pd.DataFrame]:
    """Test-split accuracy at the full and the minimal config and at the full config with each tier.

    Metrics: test_vqa_score_full / _min (means over data sets), test_exact_match_full / _min,
    test_vqa_score_<dataset>_<full|min|tier>; and the full config's predictions as a table.
    """
    full, minimal = backend.space.full(), backend.space.minimal()
    scored = {"full": score_split(backend, samples, full, score_fn=score_fn),
              "min": score_split(backend, samples, minimal, score_fn=score_fn)}
    metrics: dict[str, float] = {}
    for name, result in scored.items():
        metrics[f"test_vqa_score_{name}"] = result["vqa_score_mean_over_datasets"]
        metrics[f"test_exact_match_{name}"] = result["exact_match"]
        metrics.update({f"test_vqa_score_{ds}_{name}": r["vqa_score"] for ds, r in result["per_dataset"].items()})
    for tier in TIERS:
        result = (scored["full"] if tier == full.tier
                  else score_split(backend, samples, replace(full, tier=tier), score_fn=score_fn))
        metrics.update({f"test_vqa_score_{ds}_{tier}": r["vqa_score"] for ds, r in result["per_dataset"].items()})
    return metrics, pd.DataFrame(scored["full"]["predictions"])


def one_knob_configs(space: KnobSpace) -> dict[str, KnobConfig]:
    """The configs whose latency `evaluate_base_model` reports: full, min, and every option of one knob
    with the others at the full config (tier_<tier>, top_k_<k>, blocks_<n>)."""
    full = space.full()
    return {"full": full, "min": space.minimal(),
            **{f"tier_{t}": replace(full, tier=t) for t in TIERS},
            **{f"top_k_{k}": replace(full, top_k=k) for k in space.top_k_options},
            **{f"blocks_{b}": replace(full, num_active_blocks=b) for b in space.block_options}}


def latency_by_config(
    backend: VLMBackend, samples: Sequence[VQASample], configs: dict[str, KnobConfig], repeats: int = 5
) -> pd.DataFrame:
    """`latency_medians` of each named config: one row per config with name, the knobs, median_ms,
    p10_ms and p90_ms (over the per-sample medians)."""
    rows = []
    for name, config in configs.items():
        timing = latency_medians(backend, samples, config, repeats=repeats)
        rows.append({"name": name, **config.as_dict(), "median_ms": timing.median_ms,
                     "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms})
    return pd.DataFrame(rows)


def evaluation_metrics(accuracy: dict[str, float], latency: pd.DataFrame, device: str = "cpu") -> dict[str, float]:
    """`accuracy_by_config`'s metrics plus `<device>_latency_ms_<name>` per row of `latency_by_config`
    (which must hold "full" and "min") and what the minimal config keeps of the full one:
    <device>_latency_ratio_min_over_full and vqa_ratio_min_over_full."""
    metrics = dict(accuracy)
    metrics.update({f"{device}_latency_ms_{name}": float(ms) for name, ms in zip(latency["name"], latency["median_ms"])})
    metrics[f"{device}_latency_ratio_min_over_full"] = metrics[f"{device}_latency_ms_min"] / metrics[f"{device}_latency_ms_full"]
    metrics["vqa_ratio_min_over_full"] = metrics["test_vqa_score_min"] / max(metrics["test_vqa_score_full"], 1e-9)
    return metrics


def grid_table(
    backend: VLMBackend,
    samples: Sequence[VQASample],
    space: KnobSpace | None = None,
    repeats: int = 3,
    warmup: int = 1,
    score_fn: ScoreFn = vqa_score,
) -> pd.DataFrame:
    """Accuracy and median latency of every config of the grid on `samples` (keep it a small subset).

    One row per config: tier, top_k, num_active_blocks, config, vqa_score, exact_match,
    vqa_score_<dataset>, and medians over samples x repeats of each STAGE_COLUMNS figure (each after
    `warmup` untimed answers per sample).
    """
    space = space or backend.space
    if not samples:
        raise ValueError("grid_table needs at least one sample")
    rows = []
    for config in tqdm(space.grid(), desc="knob grid"):
        scores, exact, by_ds = [], [], {}
        timings: dict[str, list[float]] = {column: [] for column in STAGE_COLUMNS}
        for s in samples:
            for _ in range(warmup):
                backend.answer(s, config)
            results = [backend.answer(s, config) for _ in range(repeats)]
            score = score_fn(results[0].text, s.answers)
            scores.append(score)
            exact.append(exact_match(results[0].text, s.answers))
            by_ds.setdefault(s.dataset, []).append(score)
            for column, values in timings.items():
                values.extend(getattr(r, column) for r in results)
        row: dict[str, object] = {**config.as_dict(), "config": config.key}
        row["vqa_score"] = statistics.fmean(scores)
        row["exact_match"] = statistics.fmean(exact)
        row.update({f"vqa_score_{ds}": statistics.fmean(v) for ds, v in by_ds.items()})
        row.update({k: statistics.median(v) for k, v in timings.items()})
        rows.append(row)
    return pd.DataFrame(rows)
