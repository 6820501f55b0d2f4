"""The base VLM: knob application really changes the computation and is undone exactly, generation
honours its limits and timing contract, the KV cache is right under a block subset, and a
checkpoint round trip is exact. All on a tiny config with random weights."""

from pathlib import Path

import pytest
import torch

from core.knobs import BASE_VLM_SPACE, KNOBS, KnobConfig, KnobOutOfSpaceError
from core.vlm.base_vlm import BaseVLM, BaseVLMBackend, apply_knobs, build_base_vlm, space_for
from core.vqa.suite import load_split
from tests.helpers import TINY_BASE_VLM as TINY


@pytest.fixture(scope="module")
def model() -> BaseVLM:
    return build_base_vlm(TINY, seed=0).eval()


@pytest.fixture(scope="module")
def sample():
    return load_split("synth_textvqa", "val", 1)[0]


def _logits(model, sample):
    return model.prompt_logits(sample.image, sample.question)


def test_a_smaller_model_gets_a_space_scaled_to_it(model):
    space = space_for(model.config)
    assert space.top_k_options == (1, 2, 3, 4, 6) and space.block_options == (2, 3, 4, 5, 6)
    assert space.num_blocks == 6 and space.full().num_active_blocks == 6


@pytest.mark.parametrize("knob", KNOBS)
def test_each_knob_alone_changes_the_logits(model, sample, knob):
    space = space_for(model.config)
    full = space.full()
    reduced = {
        "tier": KnobConfig("low", full.top_k, full.num_active_blocks),
        "top_k": KnobConfig(full.tier, space.top_k_options[0], full.num_active_blocks),
        "num_active_blocks": KnobConfig(full.tier, full.top_k, space.block_options[0]),
    }[knob]
    with apply_knobs(model, full, space):
        base = _logits(model, sample)
    with apply_knobs(model, reduced, space):
        changed = _logits(model, sample)
    assert not torch.allclose(base, changed)


def test_knobs_are_restored_exactly(model, sample):
    space = space_for(model.config)
    layers = model.decoder.model.layers
    before = _logits(model, sample)
    with apply_knobs(model, space.minimal(), space) as kept:
        assert len(model.decoder.model.layers) == len(kept) == space.minimal().num_active_blocks
        assert all(layer.mlp.gate.top_k == space.minimal().top_k for layer in layers)
    assert model.decoder.model.layers is layers
    assert all(layer.mlp.gate.top_k == TINY.default_top_k for layer in layers)
    assert model.max_crops == TINY.max_tiles
    assert torch.equal(before, _logits(model, sample))


def test_knobs_are_restored_after_an_exception(model, sample):
    space = space_for(model.config)
    before = _logits(model, sample)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_knobs(model, space.minimal(), space):
            raise RuntimeError("boom")
    assert torch.equal(before, _logits(model, sample))


def test_block_subset_keeps_first_and_last(model):
    space = space_for(model.config)
    for n in space.block_options:
        with apply_knobs(model, KnobConfig("high", 4, n), space) as kept:
            assert kept[0] == 0 and kept[-1] == TINY.num_blocks - 1 and len(kept) == n
            assert [layer.self_attn.layer_idx for layer in model.decoder.model.layers] == list(kept)


def test_out_of_space_knobs_raise_before_touching_the_model(model):
    space = space_for(model.config)
    layers = model.decoder.model.layers
    for bad in (KnobConfig("huge", 4, 6), KnobConfig("high", 7, 6), KnobConfig("high", 4, 1)):
        with pytest.raises(KnobOutOfSpaceError):
            with apply_knobs(model, bad, space):
                pass
    assert model.decoder.model.layers is layers


def test_kv_cache_generation_matches_full_recompute_under_a_block_subset(model, sample):
    """Greedy decoding with a DynamicCache over a block subset equals re-running the whole prefix."""
    space = space_for(model.config)
    config = KnobConfig("medium", 2, space.block_options[1])
    with torch.no_grad(), apply_knobs(model, config, space):
        cached, _, _ = model.generate(sample.image, sample.question, max_new_tokens=5, force_output_tokens=5)
        crops, grid = model.preprocess(sample.image)
        embeds, _ = model._single_prompt(model.encode_crops(crops[None], grid), sample.question)
        recomputed = []
        for _ in range(5):
            logits = model.decoder(inputs_embeds=embeds, use_cache=False).logits[0]
            token = int(logits[-1].argmax())
            recomputed.append(token)
            embeds = torch.cat([embeds, model.decoder.model.embed_tokens(torch.tensor([[token]]))], dim=1)
    assert cached == recomputed


def test_generation_honours_max_new_tokens_and_the_decode_divisor(model, sample):
    backend = BaseVLMBackend(model)
    full = backend.space.full()
    r = backend.answer(sample, full, max_new_tokens=3)
    assert 1 <= r.output_tokens <= 3
    forced = backend.answer(sample, full, force_output_tokens=6)
    assert forced.output_tokens == 6
    assert len(forced.decode_step_ms) == forced.decode_forwards == 5
    assert forced.T_decode_per_token_ms == pytest.approx(forced.T_decode_ms / 5)
    one = backend.answer(sample, full, force_output_tokens=1)
    assert one.decode_forwards == 0 and one.T_decode_ms == 0.0 and one.T_decode_per_token_ms == 0.0


def test_answer_reports_crops_tokens_and_active_blocks_per_tier(model, sample):
    backend = BaseVLMBackend(model)
    space = backend.space
    crops = []
    for tier in ("low", "medium", "high"):
        config = KnobConfig(tier, 4, space.block_options[0])
        r = backend.answer(sample, config, max_new_tokens=2)
        with apply_knobs(model, config, space):
            pixels, grid = model.preprocess(sample.image)
            assert r.vision_tokens == model.encode_crops(pixels[None], grid).shape[1]  # the tokens the decoder saw
        assert r.active_blocks[0] == 0 and r.active_blocks[-1] == TINY.num_blocks - 1
        assert r.T_vision_ms > 0 and r.T_prefill_ms > 0
        crops.append(r.crops)
    assert crops == [1, 2, 8]


def test_save_load_round_trip_gives_identical_logits(model, sample, tmp_path: Path):
    model.save_pretrained(tmp_path / "ckpt")
    assert {"base_vlm_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded = BaseVLM.load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert torch.equal(_logits(model, sample), _logits(loaded, sample))
    backend = BaseVLMBackend.from_pretrained(tmp_path / "ckpt")
    assert backend.answer(sample, backend.space.full()).text == BaseVLMBackend(model).answer(sample, backend.space.full()).text


def test_set_drop_order_changes_the_dropped_blocks(model):
    backend = BaseVLMBackend(model)
    config = KnobConfig("low", 4, 4)  # keeps 4 of 6 blocks
    sample = load_split("synth_attrvqa", "val", 1)[0]
    default = backend.answer(sample, config, max_new_tokens=1).active_blocks
    backend.set_drop_order([1, 2, 3, 4])
    assert backend.answer(sample, config, max_new_tokens=1).active_blocks == (0, 3, 4, 5)
    assert default == (0, 1, 2, 5)  # default order drops the later middle blocks first
    with pytest.raises(ValueError):
        backend.set_drop_order([1, 2, 3])


def test_a_checkpoint_with_a_measured_drop_order_loads_with_it(model, tmp_path: Path):
    import json

    model.save_pretrained(tmp_path)
    assert BaseVLMBackend.from_pretrained(tmp_path).drop_order == [4, 3, 2, 1]  # the default
    (tmp_path / "drop_order.json").write_text(json.dumps({"drop_order": [2, 4, 1, 3]}))
    backend = BaseVLMBackend.from_pretrained(tmp_path)
    assert backend.drop_order == [2, 4, 1, 3]
    sample = load_split("synth_attrvqa", "val", 1)[0]
    assert backend.answer(sample, KnobConfig("low", 4, 4), max_new_tokens=1).active_blocks == (0, 1, 3, 5)


def test_shipped_config_fits_the_checkpoint_budget():
    model = build_base_vlm()
    assert space_for(model.config) is BASE_VLM_SPACE
    size_mb = sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 1e6
    assert size_mb <= 25
