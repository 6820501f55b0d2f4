"""Block importance: how much accuracy a decoder block is worth, and whether that is stable.

Importance of middle block b = accuracy with every block - accuracy with every block but b
(leave-one-block-out, LOO). Higher = more important; the first and last block always run, so they
get no score (they are excluded from the returned dicts rather than reported as +inf, which keeps the
dicts directly usable by `core.knobs.drop_order_from_importance`, which wants exactly the middle blocks).
"Accuracy" is a score function of greedy answers (VQA score) or `ANSWER_LOG_LIKELIHOOD`, the
teacher-forced log-probability of the reference answer: on a model trained to survive block removal
the greedy answers rarely change when one block goes, while their likelihood still does.

Running "every block but b" needs an arbitrary set of active blocks, which the knob alone cannot
express (num_blocks - 1 is usually not a block option). Backends therefore accept
`answer(..., active_blocks_override=tuple_of_block_indices)`; `answer_with_blocks` uses it, and for a
backend without it falls back to a temporary drop order when the set's size is a block option.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from core.knobs import TIERS, KnobConfig, KnobSpace, drop_order_from_importance
from core.vlm.backend import GenerationResult, VLMBackend
from core.vqa.metrics import vqa_score
from core.vqa.sample import VQASample
from core.vqa.suite import load_split

ScoreFn = Callable[[str, Sequence[str]], float]
T = TypeVar("T")
ANSWER_LOG_LIKELIHOOD = "answer_log_likelihood"  # score kind: teacher-forced log-probability of the reference answer
# What a block's removal costs: the reference answer's log-likelihood (graded), or the VQA score of the
# greedy answers (coarse: it saturates on a model trained to survive block removal).
SCORES = (ANSWER_LOG_LIKELIHOOD, "vqa_score")
ALL_TIERS = "all"  # measure at every tier and average the drops


class ImportanceError(ValueError):
    """Block importance cannot be measured with this backend or these inputs."""


def score_measure(score: str) -> ScoreFn | str:
    """The `score_fn` of `mean_accuracy` for a score kind of SCORES."""
    if score not in SCORES:
        raise ImportanceError(f"score: {score!r} is not one of {', '.join(SCORES)}")
    return vqa_score if score == "vqa_score" else ANSWER_LOG_LIKELIHOOD


def base_configs(space: KnobSpace, tier: str, top_k: int = 0) -> list[KnobConfig]:
    """Every block running at `top_k` (0: the trained top_k), at `tier` or, for ALL_TIERS, at each tier
    (the richest last)."""
    if tier != ALL_TIERS and tier not in TIERS:
        raise ImportanceError(f"tier: {tier!r} is not {ALL_TIERS!r} or one of {', '.join(TIERS)}")
    tiers = TIERS if tier == ALL_TIERS else (tier,)
    return [space.make(t, top_k or space.default_top_k, space.num_blocks) for t in tiers]


# --- running a chosen set of blocks ------------------------------------------------------------


def supports_block_override(backend: VLMBackend) -> bool:
    """True when `backend.answer` takes `active_blocks_override`."""
    try:
        return "active_blocks_override" in inspect.signature(backend.answer).parameters
    except (TypeError, ValueError):
        return False


def _with_blocks(backend: VLMBackend, config: KnobConfig, blocks: Sequence[int], call: Callable[[KnobConfig, dict], T]) -> T:
    """call(config, extra_kwargs) with tier/top_k from `config` and exactly the decoder `blocks` running."""
    blocks = tuple(sorted(int(b) for b in blocks))
    n = backend.space.num_blocks
    if not blocks or blocks[0] != 0 or blocks[-1] != n - 1:
        raise ImportanceError(f"block set {blocks} must keep the first (0) and last ({n - 1}) block")
    if supports_block_override(backend):
        return call(config, {"active_blocks_override": blocks})
    # Fallback: put the removed blocks first in the drop order and ask for len(blocks) via the knob.
    if len(blocks) not in backend.space.block_options:
        raise ImportanceError(
            f"backend {backend.name!r} has no answer(..., active_blocks_override=...) and {len(blocks)} active "
            f"blocks is not a block option {list(backend.space.block_options)}"
        )
    previous = getattr(backend, "drop_order", None)
    if previous is None:
        raise ImportanceError(f"backend {backend.name!r} exposes neither active_blocks_override nor drop_order to restore")
    removed = [b for b in range(1, n - 1) if b not in blocks]
    backend.set_drop_order(removed + [b for b in previous if b not in removed])
    try:
        return call(replace(config, num_active_blocks=len(blocks)), {})
    finally:
        backend.set_drop_order(previous)


def answer_with_blocks(
    backend: VLMBackend,
    sample: VQASample,
    config: KnobConfig,
    blocks: Sequence[int],
    max_new_tokens: int | None = None,
) -> GenerationResult:
    """Answer `sample` with tier/top_k from `config` and exactly the decoder `blocks` running."""
    return _with_blocks(backend, config, blocks,
                        lambda cfg, extra: backend.answer(sample, cfg, max_new_tokens=max_new_tokens, **extra))


def mean_accuracy(
    backend: VLMBackend,
    samples: Sequence[VQASample],
    score_fn: ScoreFn | str,
    config: KnobConfig,
    blocks: Sequence[int],
) -> float:
    """Mean score over `samples` with exactly `blocks` running.

    score_fn(prediction, answers) scores greedy answers; `ANSWER_LOG_LIKELIHOOD` instead takes the
    backend's mean log-probability per token of the first reference answer (teacher-forced): a graded
    measure that still moves when a removed block leaves the greedy answer unchanged.
    """
    if not samples:
        raise ImportanceError("no samples to measure accuracy on")
    if isinstance(score_fn, str):
        if score_fn != ANSWER_LOG_LIKELIHOOD:
            raise ImportanceError(f"unknown score {score_fn!r} (known: a score function or {ANSWER_LOG_LIKELIHOOD!r})")
        if not hasattr(backend, "answer_log_likelihood"):
            raise ImportanceError(f"backend {backend.name!r} cannot score answer log-likelihood")
        scores = [_with_blocks(backend, config, blocks, lambda cfg, extra, s=s: backend.answer_log_likelihood(s, cfg, **extra))
                  for s in samples]
    else:
        scores = [
            float(score_fn(answer_with_blocks(backend, s, config, blocks, s.max_new_tokens).text, s.answers)) for s in samples
        ]
    return float(np.mean(scores))


# --- leave one block out, beam search ------------------------------------------------------------


def leave_one_block_out(
    backend: VLMBackend,
    samples: Sequence[VQASample],
    score_fn: ScoreFn | str,
    base_config: KnobConfig,
    progress: bool = True,
) -> dict[int, float]:
    """{middle block: accuracy(all blocks) - accuracy(all blocks but that one)}.

    tier and top_k come from `base_config`; its num_active_blocks is ignored (the reference runs
    every block). First and last blocks are never removed and are not in the result.
    """
    n = backend.space.num_blocks
    every = tuple(range(n))
    base = mean_accuracy(backend, samples, score_fn, base_config, every)
    drops: dict[int, float] = {}
    for b in tqdm(range(1, n - 1), desc="leave-one-block-out", disable=not progress):
        drops[b] = base - mean_accuracy(backend, samples, score_fn, base_config, tuple(i for i in every if i != b))
    return drops


def leave_one_block_out_across(
    backend: VLMBackend,
    samples: Sequence[VQASample],
    score_fn: ScoreFn | str,
    base_configs: Sequence[KnobConfig],
    progress: bool = True,
) -> dict[int, float]:
    """Leave-one-block-out drops averaged over several base configs (e.g. one per tier).

    At the richest config an easy data set can be saturated (every single-block removal still scores
    1.0, so all drops are 0 and carry no order); the lower tiers are where a block's loss shows.
    """
    if not base_configs:
        raise ImportanceError("no base configs to measure block importance at")
    per_config = [leave_one_block_out(backend, samples, score_fn, c, progress) for c in base_configs]
    return {b: float(np.mean([drops[b] for drops in per_config])) for b in per_config[0]}


def importance_by_split(
    backend: VLMBackend,
    datasets: Sequence[str],
    samples_per_split: Mapping[str, int],
    score_fn: ScoreFn | str,
    configs: Sequence[KnobConfig],
    seed: int = 0,
    load_samples: Callable[[str, str, int, int], Sequence[VQASample]] = load_split,
) -> dict[str, dict[str, dict[int, float]]]:
    """{split: {dataset: leave-one-block-out drops}} on the first `samples_per_split[split]` samples of
    each data set's split, averaged over `configs` (`leave_one_block_out_across`). `load_samples(dataset,
    split, n, seed)` reads them (the synthetic suite unless told)."""
    return {split: {ds: leave_one_block_out_across(backend, load_samples(ds, split, n, seed), score_fn, configs)
                    for ds in datasets}
            for split, n in samples_per_split.items()}


@dataclass
class BeamSearchResult:
    """Best removal set per size found by beam search (accuracy drops vs every block running)."""

    base_accuracy: float
    best_by_size: dict[int, tuple[tuple[int, ...], float]]  # size -> (removed blocks, accuracy drop)
    beams_by_size: dict[int, list[tuple[tuple[int, ...], float]]] = field(default_factory=dict)
    evaluations: int = 0


def beam_search_removal(
    backend: VLMBackend,
    samples: Sequence[VQASample],
    score_fn: ScoreFn | str,
    base_config: KnobConfig,
    max_removed: int,
    beam_width: int = 3,
    progress: bool = True,
) -> BeamSearchResult:
    """Removal sets of 1..max_removed middle blocks that cost the least accuracy.

    Each level extends every set in the beam by one more middle block, evaluates the new sets and
    keeps the `beam_width` with the highest accuracy (ties: lexicographically smaller set).
    """
    n = backend.space.num_blocks
    middle = list(range(1, n - 1))
    if not 1 <= max_removed <= len(middle):
        raise ImportanceError(f"max_removed={max_removed} must lie in [1, {len(middle)}]")
    if beam_width < 1:
        raise ImportanceError(f"beam_width={beam_width} must be >= 1")
    every = tuple(range(n))
    base = mean_accuracy(backend, samples, score_fn, base_config, every)
    cache: dict[tuple[int, ...], float] = {}
    beam: list[tuple[int, ...]] = [()]
    result = BeamSearchResult(base_accuracy=base, best_by_size={})
    for size in tqdm(range(1, max_removed + 1), desc="beam search", disable=not progress):
        candidates = sorted({tuple(sorted(s + (b,))) for s in beam for b in middle if b not in s})
        for cand in candidates:
            if cand not in cache:
                cache[cand] = mean_accuracy(backend, samples, score_fn, base_config, tuple(i for i in every if i not in cand))
        ranked = sorted(candidates, key=lambda c: (-cache[c], c))[:beam_width]
        result.beams_by_size[size] = [(c, base - cache[c]) for c in ranked]
        result.best_by_size[size] = result.beams_by_size[size][0]
        beam = ranked
    result.evaluations = len(cache) + 1
    return result


# --- stability of the scores ---------------------------------------------------------------------


def spearman(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    """Spearman rank correlation of two score dicts over their common keys (ties get average ranks).

    Returns NaN, with a RuntimeWarning saying why, when fewer than two keys are shared or either
    side is constant (rank correlation is undefined there).
    """
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        warnings.warn(f"spearman: {len(keys)} common key(s); need >= 2, returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    x = np.array([a[k] for k in keys], dtype=float)
    y = np.array([b[k] for k in keys], dtype=float)
    if np.isnan(x).any() or np.isnan(y).any():
        warnings.warn("spearman: NaN scores, returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    if np.all(x == x[0]) or np.all(y == y[0]):
        warnings.warn("spearman: constant scores on one side, rank correlation undefined, returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def drop_order_from_scores(scores: Mapping[int, float], num_blocks: int) -> list[int]:
    """Middle blocks, least important first (the order they are dropped in)."""
    return drop_order_from_importance(dict(scores), num_blocks)


def consistency_report(
    train_scores_by_ds: Mapping[str, Mapping[int, float]],
    val_scores_by_ds: Mapping[str, Mapping[int, float]],
    min_spearman: float | None = None,
    num_blocks: int | None = None,
) -> dict[str, object]:
    """How stable importance is across splits and data sets, and the merged scores to act on.

    Returns a dict with
      per_dataset_spearman  {dataset: Spearman(train, val)}
      cross_dataset         DataFrame (dataset x dataset) of Spearman between the per-data-set
                            scores, each the mean of its train and val scores
      merged_scores         {block: mean over the kept data sets of those per-data-set scores}
      excluded              data sets left out of the merge because train/val Spearman < min_spearman
                            or NaN (only when min_spearman is given; the original study dropped MMMU so)
      drop_order            middle blocks by ascending merged importance
      notes                 one line per NaN correlation or exclusion
    """
    if set(train_scores_by_ds) != set(val_scores_by_ds):
        raise ImportanceError(
            f"train and val score data sets differ: {sorted(train_scores_by_ds)} vs {sorted(val_scores_by_ds)}"
        )
    datasets = sorted(train_scores_by_ds)
    if not datasets:
        raise ImportanceError("no data sets to compare")
    notes: list[str] = []

    def quiet_spearman(a: Mapping[int, float], b: Mapping[int, float], what: str) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rho = spearman(a, b)
        if math.isnan(rho):
            notes.append(f"{what}: " + (str(caught[0].message) if caught else "NaN"))
        return rho

    per_ds = {ds: quiet_spearman(train_scores_by_ds[ds], val_scores_by_ds[ds], f"{ds} train vs val") for ds in datasets}
    averaged: dict[str, dict[int, float]] = {}
    for ds in datasets:
        tr, va = train_scores_by_ds[ds], val_scores_by_ds[ds]
        if set(tr) != set(va):
            raise ImportanceError(f"data set {ds}: train and val score different blocks")
        averaged[ds] = {b: (float(tr[b]) + float(va[b])) / 2.0 for b in tr}

    cross = pd.DataFrame(index=datasets, columns=datasets, dtype=float)
    for a, i in enumerate(datasets):
        for j in datasets[a:]:
            if i == j:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rho = spearman(averaged[i], averaged[i])  # 1, or NaN for constant scores
            else:
                rho = quiet_spearman(averaged[i], averaged[j], f"{i} vs {j}")
            cross.loc[i, j] = cross.loc[j, i] = rho

    excluded: list[str] = []
    if min_spearman is not None:
        for ds in datasets:
            if math.isnan(per_ds[ds]) or per_ds[ds] < min_spearman:
                excluded.append(ds)
                notes.append(f"{ds} excluded from merge: train/val Spearman {per_ds[ds]:.3f} < {min_spearman}")
    kept = [ds for ds in datasets if ds not in excluded]
    if not kept:
        raise ImportanceError(f"every data set was excluded by min_spearman={min_spearman}")
    blocks = sorted(set.intersection(*(set(averaged[ds]) for ds in kept)))
    merged = {b: float(np.mean([averaged[ds][b] for ds in kept])) for b in blocks}
    n = num_blocks if num_blocks is not None else max(blocks) + 2  # middle blocks are 1..n-2
    return {
        "per_dataset_spearman": per_ds,
        "cross_dataset": cross,
        "merged_scores": merged,
        "excluded": excluded,
        "drop_order": drop_order_from_scores(merged, n),
        "notes": notes,
    }


def importance_metrics(report: Mapping[str, object]) -> dict[str, float]:
    """A `consistency_report` as run metrics: spearman_<dataset> (train vs val; undefined ones left out)
    and importance_block_<block> (the merged score)."""
    per_dataset: Mapping[str, float] = report["per_dataset_spearman"]  # type: ignore[assignment]
    merged: Mapping[int, float] = report["merged_scores"]  # type: ignore[assignment]
    return {**{f"spearman_{ds}": rho for ds, rho in per_dataset.items() if not math.isnan(rho)},
            **{f"importance_block_{b}": score for b, score in merged.items()}}
