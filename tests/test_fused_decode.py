"""The fused engine (engine="fused"): tiling on the device matches the host's PIL tiling; on a CPU it
answers like the eager engine; its Triton decode kernels compute transformers' OLMoE step (checked
with Triton's interpreter on CPU tensors where triton is installed, skipped where it is not: CI has
none); and the bandwidth floor counts the bytes each knob removes. The CUDA graphs and timings are
exercised on the GPU machine (scripts/bench_fused_decode.py, scripts/gpu_timing_noise.py)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.knobs import KnobConfig
from core.profiling.floors import decode_bytes_per_token, floor_ms
from core.vlm.molmoe_arch import MolmoeArchBackend, device_crops, image_crops, image_uint8
from tests.helpers import probe_samples, tiny_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rows, cols", [(1, 1), (2, 3), (3, 4)])
def test_device_tiling_matches_pil_tiling_within_a_grey_level(rows: int, cols: int):
    image = Image.fromarray(np.random.default_rng(rows * 7 + cols).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    host = image_crops(image, rows, cols, 56)
    device = device_crops(image_uint8(image), rows, cols, 56)
    assert device.shape == host.shape == (1 + rows * cols, 3, 56, 56)
    grey_level = 1 / 255 / 0.27  # one 8-bit step after CLIP normalisation (std ~0.27)
    assert float((device - host).abs().mean()) < grey_level
    # the tiles are the grid's, in row-major order: swapping two would move far more than a grey level
    if rows * cols > 1:
        assert float((device[1] - host[2]).abs().mean()) > 10 * grey_level


def test_fused_engine_on_cpu_answers_like_the_eager_engine():
    torch.set_num_threads(1)
    fused, eager = MolmoeArchBackend("tiny", device="cpu", seed=0, engine="fused"), tiny_backend()
    for sample in probe_samples()[:2]:
        for config in (fused.space.full(), KnobConfig("medium", 6, 12)):
            f = fused.answer(sample, config, force_output_tokens=3)
            e = eager.answer(sample, config, force_output_tokens=3)
            assert (f.text, f.crops, f.vision_tokens, f.active_blocks) == (e.text, e.crops, e.vision_tokens, e.active_blocks)
            assert f.T_vision_ms > 0 and fused.last_vision_host_ms > 0


def test_decode_floor_counts_the_bytes_each_knob_removes():
    from transformers import OlmoeConfig

    cfg = OlmoeConfig(vocab_size=50408, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=16, num_experts=64)
    full = decode_bytes_per_token(cfg, 8, 16, 0)
    assert full - decode_bytes_per_token(cfg, 4, 16, 0) == 16 * 4 * 3 * 2048 * 1024 * 2  # 4 experts x 16 blocks
    assert decode_bytes_per_token(cfg, 8, 16, 1000) - full == 16 * 1000 * 2 * 2048 * 2  # K and V of 1000 slots
    assert 2.3e9 < full < 2.4e9  # MolmoE-1B at top-8: ~2.36 GB a token
    assert floor_ms(full, 4000.0) == pytest.approx(full / 4e12 * 1e3)  # 4 TB/s -> ms


INTERPRETED = textwrap.dedent('''
    import torch
    from torch import nn
    from transformers import DynamicCache
    from core.timing import StageClock
    from core.vlm.fused_decode import FusedDecoder
    from core.vlm.graph_engine import GraphedGenerator
    from tests.test_graph_engine import eager_greedy, request, varied_lm

    lm = varied_lm()  # 2 * intermediate == hidden: the expert layout cannot be read off gate_up's shape
    cpu = torch.device("cpu")
    with torch.inference_mode():
        gen = GraphedGenerator(lm, cpu, max_cache_len=300)
        gen.initialise(4)
        gen.decoder = FusedDecoder(lm, gen.cache, gen.step_ids, 300)
        # one step after a prompt that spans three attention splits of 128 slots
        prefix, ids = request(3, prefix_len=290, text_len=4)
        embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        ref = lm(input_ids=torch.tensor([[17]]), past_key_values=cache, use_cache=True).logits[0, -1]
        gen.cache.reset()
        lm(inputs_embeds=embeds, past_key_values=gen.cache, use_cache=True)
        gen.decoder.start(embeds.shape[1])
        gen.step_ids.fill_(17)
        gen.decoder.forward_token(2, (0, 1, 2, 3))
        err = float((gen.decoder.logits - ref).norm() / ref.norm())
        assert err < 1e-4, err
        # greedy generation, blocks skipped, top_k changed, request after request
        layers = lm.model.layers
        for seed, (top_k, blocks) in enumerate([(2, (0, 1, 2, 3)), (3, (0, 2))]):
            prefix, ids = request(seed, prefix_len=6 + seed)
            for router in (l.mlp.gate for l in layers):
                router.top_k = top_k
            lm.model.layers = nn.ModuleList([layers[i] for i in blocks])
            try:
                expected = eager_greedy(lm, prefix, ids, 6)
                got = gen.generate(prefix, ids, 6, (top_k, blocks), StageClock(cpu))
            finally:
                lm.model.layers = layers
            assert got == expected, (got, expected)
            assert len(set(got)) > 2
    print("ok", err)
''')


def test_fused_kernels_compute_transformers_olmoe_step_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_realised_vs_theory_compares_paired_savings_with_the_floor():
    from types import SimpleNamespace

    from core.profiling.floors import decode_floor_ms, realised_vs_theory

    cfg = SimpleNamespace(hidden_size=2048, num_experts=64, intermediate_size=1024, num_attention_heads=16,
                          num_key_value_heads=16, vocab_size=50408)
    rows = [{"sample_id": f"s{s}", "run_index": r, "tier": t, "top_k": k, "num_active_blocks": b,
             "vision_tokens": v, "text_tokens": 16, "output_tokens": 8}
            for s in range(2) for r in range(2) for t, v in (("low", 288), ("high", 1872)) for k in (4, 8) for b in (8, 16)]
    df = pd.DataFrame(rows)
    floor = decode_floor_ms(df, cfg, 3000.0)
    assert floor.iloc[0] == pytest.approx(floor_ms(decode_bytes_per_token(cfg, 4, 8, 288 + 16 + 4), 3000.0))
    # an engine at its floor realises every saving; one with a fixed cost per block saves more on blocks
    at_floor = realised_vs_theory(df.assign(T_decode_per_token_ms=floor), floor, "top_k", 8, 4)
    assert at_floor["realised_share"] == pytest.approx(1.0) and at_floor["pairs"] == 16  # 2 samples x 2 runs x 2 tiers x 2 block counts
    slow = df.assign(T_decode_per_token_ms=floor + 0.05 * df["num_active_blocks"])
    assert realised_vs_theory(slow, floor, "top_k", 8, 4)["realised_share"] == pytest.approx(1.0)
    blocks = realised_vs_theory(slow, floor, "num_active_blocks", 16, 8)
    assert blocks["realised_ms"] == pytest.approx(blocks["theory_ms"] + 0.4)
