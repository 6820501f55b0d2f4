"""The graph engine's static-cache generation gives the same greedy tokens as transformers' eager
DynamicCache loop (also with blocks skipped), guards its cache size, and backs molmoe_arch's
engine="graph". On a CPU the graphs run eagerly; the CUDA capture itself is exercised on the GPU
machine (scripts/gpu_timing_noise.py --engine graph --compare-eager)."""

import functools

import pytest
import torch
from torch import nn

from core.vlm.graph_engine import GraphedGenerator
from core.knobs import KnobConfig
from core.vlm.molmoe_arch import MolmoeArchBackend
from core.timing import StageClock
from tests.helpers import probe_samples, tiny_backend

CPU = torch.device("cpu")


@functools.cache
def varied_lm():
    """A small OLMoE whose greedy tokens change from step to step (large init), so a wrong position,
    mask or cache slot shows up as a different token sequence."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.5,
                      tie_word_embeddings=False)
    return OlmoeForCausalLM(cfg).eval()


def eager_greedy(lm, prefix: torch.Tensor, ids: torch.Tensor, n: int) -> list[int]:
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
    token = lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    out = [int(token)]
    for _ in range(n - 1):
        token = lm(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        out.append(int(token))
    return out


def request(seed: int, prefix_len: int = 7, text_len: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, prefix_len, 64, generator=g), torch.randint(0, 300, (1, text_len), generator=g)


@torch.inference_mode()
def test_static_generation_matches_eager_tokens_request_after_request():
    lm = varied_lm()
    generator = GraphedGenerator(lm, CPU, max_cache_len=64)
    generator.initialise(4)
    sequences = []
    for seed in range(3):  # the cache is reused: each request must start from a clean reset
        prefix, ids = request(seed, prefix_len=5 + seed)
        got = generator.generate(prefix, ids, 10, "all-blocks", StageClock(CPU))
        assert got == eager_greedy(lm, prefix, ids, 10)
        sequences.append(got)
    assert len({tuple(s) for s in sequences}) == 3 and len(set(sequences[0])) > 3  # not a degenerate model


@torch.inference_mode()
def test_static_generation_with_blocks_skipped_matches_eager():
    lm = varied_lm()
    generator = GraphedGenerator(lm, CPU, max_cache_len=64)
    generator.initialise(4)
    layers = lm.model.layers
    try:
        lm.model.layers = nn.ModuleList([layers[0], layers[2]])
        prefix, ids = request(5)
        expected = eager_greedy(lm, prefix, ids, 8)
        assert generator.generate(prefix, ids, 8, "blocks-0-2", StageClock(CPU)) == expected
    finally:
        lm.model.layers = layers
    assert generator.decode_graphs == 1


@torch.inference_mode()
def test_stages_are_timed_and_eos_stops_generation():
    lm = varied_lm()
    generator = GraphedGenerator(lm, CPU, max_cache_len=64)
    generator.initialise(4)
    prefix, ids = request(1)
    tokens = eager_greedy(lm, prefix, ids, 6)
    clock = StageClock(CPU)
    got = generator.generate(prefix, ids, 6, "k", clock, eos_token_id=tokens[2])
    assert got == tokens[: tokens.index(tokens[2]) + 1]
    stages = clock.durations_ms()
    assert len(stages["prefill"]) == 1 and len(stages.get("decode", [])) == len(got) - 1
    assert all(ms > 0 for ms in stages["prefill"] + stages.get("decode", []))


@torch.inference_mode()
def test_generation_refuses_prompts_beyond_the_static_cache_and_needs_initialise():
    lm = varied_lm()
    generator = GraphedGenerator(lm, CPU, max_cache_len=16)
    prefix, ids = request(0)
    with pytest.raises(RuntimeError, match="initialise"):
        generator.generate(prefix, ids, 2, "k", StageClock(CPU))
    layers = lm.model.layers
    try:
        lm.model.layers = nn.ModuleList([layers[0]])
        with pytest.raises(ValueError, match="all 4 blocks"):
            generator.initialise(4)
    finally:
        lm.model.layers = layers
    generator.initialise(4)
    with pytest.raises(ValueError, match="12 tokens plus 6 output tokens exceeds the static cache's 16 slots"):
        generator.generate(prefix, ids, 6, "k", StageClock(CPU))


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedGenerator(varied_lm(), CPU, max_cache_len=16, use_graphs=True)


def test_molmoe_arch_graph_engine_answers_like_the_eager_engine():
    torch.set_num_threads(1)
    graph, eager = MolmoeArchBackend("tiny", device="cpu", seed=0, engine="graph"), tiny_backend()
    for sample in probe_samples()[:2]:
        for config in (graph.space.full(), graph.space.minimal(), KnobConfig("medium", 6, 12)):
            g = graph.answer(sample, config, force_output_tokens=4)
            e = eager.answer(sample, config, force_output_tokens=4)
            assert (g.text, g.crops, g.vision_tokens, g.text_tokens, g.active_blocks) == (
                e.text, e.crops, e.vision_tokens, e.text_tokens, e.active_blocks)
            assert g.output_tokens == 4 and len(g.decode_step_ms) == 3 and g.T_prefill_ms > 0
    assert graph.generator().decode_graphs == 3  # one per (top_k, blocks), kept across requests


def test_unknown_engine_is_one_clear_error():
    with pytest.raises(ValueError, match=r"engine='compiled' is unknown \(choose from: eager, graph, fused\)"):
        MolmoeArchBackend("tiny", device="cpu", engine="compiled")
