"""molmoe_arch: the knobs change what the model computes, the model is restored exactly afterwards,
forced output lengths are honoured, and the reference preset has MolmoE-1B's size."""

import pytest
import torch

from core.knobs import MOLMOE_SPACE, KnobConfig, active_blocks
from core.vlm.knob_application import select_grid, tier_crop_band
from core.vlm.molmoe_arch import SIZE_PRESETS, MolmoeArchBackend, synthetic_latency_samples
from tests.helpers import probe_samples, tiny_backend


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiling_follows_aspect_ratio_within_the_tier_band():
    assert [tier_crop_band(MOLMOE_SPACE, t) for t in ("low", "medium", "high")] == [(1, 3), (4, 6), (7, 12)]
    bands = [tier_crop_band(MOLMOE_SPACE, t) for t in ("low", "medium", "high")]
    assert [select_grid(600, 600, hi, min_crops=lo) for lo, hi in bands] == [(1, 1), (2, 2), (3, 3)]
    assert [select_grid(1600, 900, hi, min_crops=lo) for lo, hi in bands] == [(1, 2), (2, 3), (2, 4)]
    assert select_grid(900, 1600, 3) == (2, 1)  # tall image: more rows
    assert select_grid(300, 300, 2, min_crops=2) == (1, 2)  # 1x2 and 2x1 equally far from square: fewer rows
    with pytest.raises(ValueError, match="crop band"):
        select_grid(600, 600, 3, min_crops=4)


def test_tier_sets_crops_and_vision_tokens():
    backend, sample = tiny_backend(), probe_samples()[0]
    crops = []
    for tier in ("low", "medium", "high"):
        r = backend.answer(sample, KnobConfig(tier, 8, 16), force_output_tokens=1)
        assert r.vision_tokens == (r.crops + 1) * backend.dims.tokens_per_crop
        crops.append(r.crops)
    assert crops[0] < crops[1] < crops[2]


def test_top_k_reaches_every_router_and_is_restored():
    backend, sample = tiny_backend(), probe_samples()[0]
    seen: list[int] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, out: seen.append(out[2].shape[-1]))
        for layer in backend.lm.model.layers
    ]
    try:
        backend.answer(sample, KnobConfig("low", 4, 16), force_output_tokens=2)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 16 * 2 and set(seen) == {4}  # every block, prefill and one decode step
    assert {layer.mlp.gate.top_k for layer in backend.lm.model.layers} == {SIZE_PRESETS["tiny"].top_k}


def test_block_knob_runs_exactly_the_active_blocks():
    backend, sample = tiny_backend(), probe_samples()[1]
    ran: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, idx=i: ran.append(idx))
        for i, layer in enumerate(backend.lm.model.layers)
    ]
    order = [7, 3, 11, 1, 13, 5, 9, 2, 4, 6, 8, 10, 12, 14]
    try:
        backend.set_drop_order(order)
        result = backend.answer(sample, KnobConfig("low", 8, 10), force_output_tokens=1)
    finally:
        backend.set_drop_order(list(range(14, 0, -1)))
        for h in hooks:
            h.remove()
    expected = active_blocks(16, 10, order)
    assert result.active_blocks == expected
    assert sorted(set(ran)) == list(expected) and len(ran) == 10
    assert len(backend.lm.model.layers) == 16


def test_knobs_change_the_computation():
    backend = tiny_backend()
    torch.manual_seed(1)
    embeds = torch.randn(1, 12, backend.dims.d_model)

    def logits(top_k: int, blocks: tuple[int, ...]) -> torch.Tensor:
        with torch.inference_mode(), backend.knobs_applied(top_k, blocks):
            return backend.lm(inputs_embeds=embeds).logits

    full = logits(8, tuple(range(16)))
    assert torch.equal(full, logits(8, tuple(range(16))))  # deterministic
    assert not torch.allclose(full, logits(4, tuple(range(16))))
    assert not torch.allclose(full, logits(8, (0, 1, 2, 3, 4, 5, 6, 15)))


def test_model_is_restored_exactly_even_after_an_error():
    backend, sample = tiny_backend(), probe_samples()[2]
    layers, state = backend.lm.model.layers, _snapshot(backend.lm)
    top_ks = [layer.mlp.gate.top_k for layer in layers]
    backend.answer(sample, KnobConfig("medium", 12, 8), force_output_tokens=2)
    with pytest.raises(RuntimeError, match="boom"):
        with backend.knobs_applied(4, (0, 5, 15)):
            raise RuntimeError("boom")
    assert backend.lm.model.layers is layers
    assert [layer.mlp.gate.top_k for layer in layers] == top_ks
    after = backend.lm.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_forced_output_length_is_honoured():
    backend, sample = tiny_backend(), probe_samples()[3]
    r = backend.answer(sample, KnobConfig("low", 6, 12), force_output_tokens=5)
    assert r.output_tokens == 5 and len(r.decode_step_ms) == 4
    assert len(r.text.split()) <= 5
    assert r.T_decode_per_token_ms == pytest.approx(r.T_decode_ms / 4)
    assert r.text_tokens == 10  # ten words in the probe question
    unforced = backend.answer(sample, KnobConfig("low", 6, 12), max_new_tokens=3)
    assert 1 <= unforced.output_tokens <= 3


def test_active_blocks_override_runs_that_set():
    backend, sample = tiny_backend(), probe_samples()[0]
    r = backend.answer(sample, KnobConfig("low", 8, 16), force_output_tokens=1, active_blocks_override=(0, 2, 9, 15))
    assert r.active_blocks == (0, 2, 9, 15)
    with pytest.raises(ValueError, match="block 0"):
        backend.answer(sample, KnobConfig("low", 8, 16), force_output_tokens=1, active_blocks_override=(1, 15))


def test_reference_preset_is_molmoe_1b_sized():
    dims = SIZE_PRESETS["reference"]
    assert dims.tokens_per_crop == MOLMOE_SPACE.tokens_per_crop == 144
    assert dims.vocab_size == 50280 + 128
    backend = MolmoeArchBackend("reference", device="meta")  # shapes only, no memory
    lm_params = sum(p.numel() for p in backend.lm.parameters())
    assert 6.5e9 < lm_params < 7.5e9  # OLMoE-1B-7B: ~1.3B active, ~6.9B total
    assert backend.lm.config.intermediate_size == 1024 and backend.lm.config.num_experts == 64
    assert backend.vision.feature_index == [23, 16]  # ViT layers -2 and -9 of 24; 23 run


def test_synthetic_probe_samples_are_deterministic():
    a = synthetic_latency_samples([16, 64], [(640, 480)], n=3)
    b = synthetic_latency_samples([16, 64], [(640, 480)], n=3)
    assert [s.sample_id for s in a] == ["latency_probe:test:0", "latency_probe:test:1", "latency_probe:test:2"]
    assert [len(s.question.split()) for s in a] == [16, 64, 16]
    assert [s.question for s in a] == [s.question for s in b] and a[0].image.size == (640, 480)
    assert a[0].image.tobytes() == b[0].image.tobytes()
