"""The base VLM's knob space: its shape, its corners, and that every tier tiles suite images differently."""

import pytest

from core.knobs import BASE_VLM_SPACE, TIERS, KnobConfig, KnobOutOfSpaceError, active_blocks, get_space
from core.vlm.knob_application import select_grid
from core.vqa.suite import IMAGE_SIZE


def test_base_vlm_space_is_registered_and_its_grid_is_tier_major():
    s = BASE_VLM_SPACE
    assert get_space("base_vlm") is s
    grid = s.grid()
    assert grid[0] == KnobConfig("low", 1, 4) and grid[-1] == KnobConfig("high", 6, 8)
    assert [c.tier for c in grid[::25]] == list(TIERS)


def test_full_and_minimal_corners():
    s = BASE_VLM_SPACE
    assert s.full() == KnobConfig("high", s.default_top_k, s.num_blocks)
    assert s.minimal() == KnobConfig("low", s.top_k_options[0], s.block_options[0])
    s.validate(s.full())
    s.validate(s.minimal())


def test_each_tier_tiles_a_suite_image_into_more_crops():
    crops = [select_grid(*IMAGE_SIZE, BASE_VLM_SPACE.max_crops(t)) for t in TIERS]
    counts = [r * c for r, c in crops]
    assert counts == sorted(set(counts)), crops
    assert [BASE_VLM_SPACE.vision_tokens(n) for n in counts] == [8, 12, 36]


@pytest.mark.parametrize(
    "config", [KnobConfig("ultra", 4, 8), KnobConfig("high", 5, 8), KnobConfig("high", 4, 3), KnobConfig("low", 8, 8)]
)
def test_out_of_space_knobs_raise(config):
    with pytest.raises(KnobOutOfSpaceError):
        BASE_VLM_SPACE.validate(config)


def test_block_subsets_keep_first_and_last():
    for n in BASE_VLM_SPACE.block_options:
        kept = active_blocks(BASE_VLM_SPACE.num_blocks, n)
        assert len(kept) == n and kept[0] == 0 and kept[-1] == BASE_VLM_SPACE.num_blocks - 1
