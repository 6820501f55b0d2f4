"""Block importance: leave-one-block-out, beam search over removal sets, and the Spearman-based
consistency report."""

import math
from dataclasses import replace

import pandas as pd
import pytest

from core.vlm.importance import (
    ANSWER_LOG_LIKELIHOOD,
    ImportanceError,
    answer_with_blocks,
    base_configs,
    beam_search_removal,
    consistency_report,
    importance_metrics,
    leave_one_block_out,
    mean_accuracy,
    score_measure,
    spearman,
)
from core.knobs import BASE_VLM_SPACE, TIERS, KnobConfig
from tests.helpers import TINY_BASE_VLM, probe_samples, tiny_backend

BASE = KnobConfig("low", 8, 16)


def labelled_samples(n: int):
    """Probe samples whose reference answer is the full model's own greedy answer (accuracy 1.0 at full)."""
    backend = tiny_backend()
    out = []
    for s in probe_samples()[:n]:
        full = backend.answer(s, BASE, max_new_tokens=s.max_new_tokens, active_blocks_override=tuple(range(16)))
        out.append(replace(s, answers=(full.text,)))
    return out


def exact_match(prediction: str, answers) -> float:
    return float(prediction in answers)


class KnobOnlyBackend:
    """The tiny backend seen through the bare VLMBackend protocol (no active_blocks_override)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.space, self.device = inner, inner.name, inner.space, inner.device

    @property
    def drop_order(self):
        return self.inner.drop_order

    def set_drop_order(self, order) -> None:
        self.inner.set_drop_order(order)

    def answer(self, sample, config, max_new_tokens=None, force_output_tokens=None):
        return self.inner.answer(sample, config, max_new_tokens=max_new_tokens, force_output_tokens=force_output_tokens)


def test_spearman_of_known_ranks():
    a = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}
    assert spearman(a, {1: 1.0, 2: 3.0, 3: 2.0, 4: 4.0}) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) -> Pearson of the ranks
    assert spearman({1: 5.0, 2: 5.0, 3: 9.0}, {1: 1.0, 2: 2.0, 3: 3.0}) == pytest.approx(math.sqrt(3) / 2)
    assert spearman(a, {2: 0.0, 3: 1.0, 9: 2.0}) == pytest.approx(1.0)  # common keys only


def test_spearman_of_constant_input_is_nan_with_a_note():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(spearman({1: 0.0, 2: 0.0, 3: 0.0}, {1: 1.0, 2: 2.0, 3: 3.0}))
    with pytest.warns(RuntimeWarning, match="common key"):
        assert math.isnan(spearman({1: 0.0}, {1: 1.0}))


def test_consistency_report():
    train = {"vqa": {1: 0.1, 2: 0.5, 3: 0.3}, "doc": {1: 0.2, 2: 0.4, 3: 0.8}, "mmmu": {1: 0.0, 2: 0.0, 3: 0.0}}
    val = {"vqa": {1: 0.1, 2: 0.4, 3: 0.2}, "doc": {1: 0.1, 2: 0.5, 3: 0.7}, "mmmu": {1: 0.3, 2: 0.1, 3: 0.2}}
    report = consistency_report(train, val, min_spearman=0.5, num_blocks=5)
    assert report["per_dataset_spearman"]["vqa"] == pytest.approx(1.0)
    assert math.isnan(report["per_dataset_spearman"]["mmmu"])
    cross = report["cross_dataset"]
    assert isinstance(cross, pd.DataFrame) and cross.loc["vqa", "doc"] == cross.loc["doc", "vqa"]
    assert cross.loc["vqa", "vqa"] == 1.0
    assert report["excluded"] == ["mmmu"]
    assert report["merged_scores"][2] == pytest.approx((0.45 + 0.45) / 2)
    assert report["merged_scores"][3] == pytest.approx((0.25 + 0.75) / 2)
    assert report["drop_order"] == [1, 2, 3]  # merged: 1 -> 0.125, 2 -> 0.45, 3 -> 0.5
    assert any("mmmu" in note for note in report["notes"])
    metrics = importance_metrics(report)  # the undefined mmmu correlation is left out
    assert set(metrics) == {"spearman_vqa", "spearman_doc", "importance_block_1", "importance_block_2", "importance_block_3"}
    assert metrics["importance_block_3"] == pytest.approx(0.5)


def test_leave_one_block_out_scores_every_middle_block():
    backend, samples = tiny_backend(), labelled_samples(2)
    drops = leave_one_block_out(backend, samples, exact_match, BASE, progress=False)
    assert sorted(drops) == list(range(1, 15))  # first and last never dropped, so not scored
    costly = max(drops, key=drops.get)
    assert drops[costly] > 0  # removing some block changes some answer
    without = tuple(b for b in range(16) if b != costly)
    changed = [answer_with_blocks(backend, s, BASE, without, s.max_new_tokens).text != s.answers[0] for s in samples]
    assert drops[costly] == pytest.approx(sum(changed) / len(samples))  # the share of answers that removal changes


def test_beam_search_finds_removal_sets_of_each_size():
    samples = labelled_samples(1)
    result = beam_search_removal(tiny_backend(), samples, exact_match, BASE, max_removed=2, beam_width=2, progress=False)
    assert result.base_accuracy == 1.0
    assert sorted(result.best_by_size) == [1, 2]
    removed, drop = result.best_by_size[2]
    assert len(removed) == 2 and all(1 <= b <= 14 for b in removed)
    kept = tuple(b for b in range(16) if b not in removed)
    assert drop == pytest.approx(1.0 - mean_accuracy(tiny_backend(), samples, exact_match, BASE, kept))
    assert len(result.beams_by_size[1]) == 2
    assert result.evaluations <= 1 + 14 + 2 * 13


def test_backend_without_override_falls_back_to_the_knob_and_restores_the_drop_order():
    inner = tiny_backend()
    backend, sample = KnobOnlyBackend(inner), probe_samples()[0]
    before = inner.drop_order
    blocks = tuple(b for b in range(16) if b not in (3, 7))  # 14 blocks: a block option
    result = answer_with_blocks(backend, sample, BASE, blocks, max_new_tokens=1)
    assert result.active_blocks == blocks
    assert inner.drop_order == before
    with pytest.raises(ImportanceError, match="active_blocks_override"):
        leave_one_block_out(backend, [sample], exact_match, BASE, progress=False)  # 15 blocks: not an option


def test_answer_log_likelihood_importance_is_graded_and_restores_the_base_vlm():
    from core.vlm.base_vlm import BaseVLMBackend, build_base_vlm
    from core.vqa.suite import load_split

    backend = BaseVLMBackend(build_base_vlm(TINY_BASE_VLM, seed=0))
    samples = load_split("synth_countvqa", "val", 3)
    full = backend.space.full()
    before_order = list(backend.drop_order)
    ll = backend.answer_log_likelihood(samples[0], full)
    assert math.isfinite(ll) and ll < 0
    # Greedy answers of an untrained model are all wrong (every accuracy drop is 0); the
    # log-likelihood still tells each block's removal apart.
    drops = leave_one_block_out(backend, samples, ANSWER_LOG_LIKELIHOOD, full, progress=False)
    assert sorted(drops) == list(range(1, TINY_BASE_VLM.num_blocks - 1))
    assert all(d != 0.0 for d in drops.values()) and len(set(drops.values())) == len(drops)
    assert backend.drop_order == before_order
    assert backend.answer_log_likelihood(samples[0], full) == ll  # the model is restored after every removal
    assert mean_accuracy(backend, samples, ANSWER_LOG_LIKELIHOOD, full, tuple(range(TINY_BASE_VLM.num_blocks))) == pytest.approx(
        sum(backend.answer_log_likelihood(s, full) for s in samples) / 3)
    with pytest.raises(ImportanceError, match="unknown score"):
        mean_accuracy(backend, samples, "perplexity", full, tuple(range(TINY_BASE_VLM.num_blocks)))


def test_base_configs_and_score_kinds_name_a_bad_value():
    assert [c.tier for c in base_configs(BASE_VLM_SPACE, "all")] == list(TIERS)  # the richest last
    assert base_configs(BASE_VLM_SPACE, "low", top_k=2) == [KnobConfig("low", 2, BASE_VLM_SPACE.num_blocks)]
    with pytest.raises(ImportanceError, match="tier: 'ultra'"):
        base_configs(BASE_VLM_SPACE, "ultra")
    assert score_measure(ANSWER_LOG_LIKELIHOOD) == ANSWER_LOG_LIKELIHOOD
    with pytest.raises(ImportanceError, match="score: 'perplexity'"):
        score_measure("perplexity")
