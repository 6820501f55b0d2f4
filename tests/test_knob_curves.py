"""Per-knob accuracy curves (`evaluate_base_model`'s test_vqa_score_top_k_<k> / _blocks_<n>): the batched
answers are the backend's own, every knob option appears at every tier, and the cost figures are read
off the curves the way the acceptance reads them."""

import pandas as pd
import pytest

from core.knobs import TIERS
from core.vlm.base_vlm import BaseVLMBackend, build_base_vlm
from core.vlm.evaluation import answers_under, knob_accuracy_curves, knob_costs, knob_curve_configs
from core.vqa.suite import load_mixed_split
from tests.helpers import TINY_BASE_VLM as TINY


@pytest.fixture(scope="module")
def backend() -> BaseVLMBackend:
    return BaseVLMBackend(build_base_vlm(TINY, seed=0))


@pytest.fixture(scope="module")
def samples():
    return load_mixed_split(("synth_textvqa", "synth_attrvqa"), "test", 3, seed=0)


def test_batched_answers_are_the_ones_answer_gives(backend, samples):
    for config in (backend.space.full(), backend.space.minimal()):
        assert answers_under(backend, samples, config) == [backend.answer(s, config).text for s in samples]


def test_curves_cover_every_option_of_each_knob_at_every_tier(backend, samples):
    space = backend.space
    configs = knob_curve_configs(space)
    assert configs["top_k_1"] == space.full().__class__("high", 1, space.num_blocks)
    assert configs["medium_blocks_4"].tier == "medium" and configs["medium_blocks_4"].top_k == space.default_top_k
    curves = knob_accuracy_curves(backend, samples, progress=False)
    assert len(curves) == len(TIERS) * (len(space.top_k_options) + len(space.block_options))
    for tier in TIERS:
        part = curves[curves["tier"] == tier]
        assert sorted(part.loc[part["knob"] == "top_k", "top_k"]) == list(space.top_k_options)
        assert sorted(part.loc[part["knob"] == "blocks", "num_active_blocks"]) == list(space.block_options)
    # the full config closes both curves and is answered once: the same score on both
    full = curves[(curves["tier"] == "high") & (curves["top_k"] == space.default_top_k)
                  & (curves["num_active_blocks"] == space.num_blocks)]
    assert len(full) == 2 and full["vqa_score"].nunique() == 1
    assert {"vqa_score_synth_textvqa", "vqa_score_synth_attrvqa"} <= set(curves.columns)


def test_knob_costs_read_the_extremes_and_the_smallest_step():
    rows = [{"knob": "top_k", "tier": "high", "top_k": k, "num_active_blocks": 8, "vqa_score": v}
            for k, v in zip((1, 2, 3, 4, 6), (0.70, 0.78, 0.85, 0.84, 0.90))]
    rows += [{"knob": "blocks", "tier": "high", "top_k": 6, "num_active_blocks": b, "vqa_score": v}
             for b, v in zip((4, 5, 6, 7, 8), (0.60, 0.70, 0.80, 0.85, 0.90))]
    costs = knob_costs(pd.DataFrame(rows))
    assert costs["knob_cost_top_k_high"] == pytest.approx(0.20)
    assert costs["knob_min_step_top_k_high"] == pytest.approx(-0.01)  # 3 -> 4 gains: not monotone
    assert costs["knob_cost_blocks_high"] == pytest.approx(0.30)
    assert costs["knob_min_step_blocks_high"] == pytest.approx(0.05)
