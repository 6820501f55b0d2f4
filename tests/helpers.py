"""Builders shared by several test modules (a test module never imports another test module)."""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import pandas as pd
import torch

from core.knobs import MOLMOE_SPACE, KnobSpace, active_blocks
from core.profiling.schema import PROFILE_COLUMNS, ProfileRow, encode_list
from core.vlm.base_vlm import BaseVLMConfig
from core.vlm.molmoe_arch import MolmoeArchBackend, synthetic_latency_samples


def make_row(sample_id: str = "probe:test:0", backend: str = "molmoe_arch", **overrides) -> ProfileRow:
    """A valid molmoe_arch profile row (medium-k8-b12, 5 output tokens, no accuracy); `overrides` replace fields."""
    fields = dict(
        sample_id=sample_id, dataset="probe", task="vqa", question="what colour?", tier="medium",
        crops=4, vision_tokens=720, text_tokens=16, top_k=8, num_active_blocks=12,
        active_blocks=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15), output_tokens=5,
        T_vision_ms=30.0, T_prefill_ms=120.0, T_decode_ms=80.0, T_decode_per_token_ms=20.0, T_total_ms=230.0,
        accuracy=math.nan, prediction="red", answers=("red", "dark red"), run_index=0, device="cpu", backend=backend,
    )
    fields.update(overrides)
    return ProfileRow(**fields)


# --- VLM backends ---------------------------------------------------------------------------------

# A base VLM small enough to build, train and run in seconds on a CPU (random weights unless trained).
TINY_BASE_VLM = BaseVLMConfig(
    crop_px=16, patch_px=8, vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64,
    d_model=32, num_blocks=6, num_heads=2, num_experts=8, expert_dim=32, default_top_k=6,
)


@functools.cache
def tiny_backend() -> MolmoeArchBackend:
    """One tiny molmoe_arch CPU backend shared by the test modules (built once; tests restore its drop order)."""
    torch.set_num_threads(1)  # the test machine is shared; one thread avoids oversubscription
    return MolmoeArchBackend("tiny", device="cpu", seed=0)


@functools.cache
def probe_samples() -> list:
    """Four latency-probe samples (6- and 10-word questions, two image sizes, 3 output tokens)."""
    return synthetic_latency_samples([6, 10], [(64, 48), (40, 72)], n=4, max_new_tokens=3)


# --- latency estimator: a profiling table from a known latency law -------------------------------
Law = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def moe_law(vision_tokens: np.ndarray, text_tokens: np.ndarray, top_k: np.ndarray, blocks: np.ndarray):
    """vision = 0.5 ms/token; prefill = blocks x tokens x (0.01 + 0.002 k); decode = blocks x (0.3 + 0.05 k)."""
    vision = 0.5 * vision_tokens
    prefill = blocks * (vision_tokens + text_tokens) * (0.01 + 0.002 * top_k)
    decode = blocks * (0.3 + 0.05 * top_k)
    return vision, prefill, decode


def synthetic_profile(num_samples: int = 20, num_runs: int = 2, noise: float = 0.01, seed: int = 0,
                      space: KnobSpace = MOLMOE_SPACE, law: Law = moe_law, dataset: str = "synthetic") -> pd.DataFrame:
    """A full-grid profiling table: every sample x config x run, latencies = law x exp(N(0, noise)).

    Each sample draws its text length (8..128 tokens), answer length (1..16 tokens; sample 0 answers
    with one token, so decode per token is undefined there) and crops per tier (half the tier's cap
    up to the cap).
    """
    rng = np.random.default_rng(seed)
    grid = space.grid()
    tier = np.array([c.tier for c in grid])
    top_k = np.array([c.top_k for c in grid], dtype=float)
    blocks = np.array([c.num_active_blocks for c in grid], dtype=float)
    block_lists = {b: encode_list(active_blocks(space.num_blocks, b)) for b in space.block_options}
    frames = []
    for s in range(num_samples):
        text = int(rng.integers(8, 129))
        output_tokens = 1 if s == 0 else int(rng.integers(2, 17))
        crops_of = {t: int(rng.integers(max(1, cap // 2), cap + 1)) for t, cap in space.tier_max_crops.items()}
        crops = np.array([crops_of[t] for t in tier])
        vision_tokens = (crops + 1) * space.tokens_per_crop
        v, p, d = law(vision_tokens.astype(float), np.full(len(grid), float(text)), top_k, blocks)
        for run in range(num_runs):
            noise_v, noise_p, noise_d = np.exp(rng.normal(0.0, noise, (3, len(grid))))
            per_token = d * noise_d if output_tokens > 1 else np.zeros(len(grid))
            decode = per_token * (output_tokens - 1)
            frames.append(pd.DataFrame({
                "sample_id": f"{dataset}:test:{s}", "dataset": dataset, "task": "synthetic", "question": f"q{s}",
                "tier": tier, "crops": crops, "vision_tokens": vision_tokens, "text_tokens": text,
                "top_k": top_k.astype(int), "num_active_blocks": blocks.astype(int),
                "active_blocks": [block_lists[int(b)] for b in blocks], "output_tokens": output_tokens,
                "T_vision_ms": v * noise_v, "T_prefill_ms": p * noise_p, "T_decode_ms": decode,
                "T_decode_per_token_ms": per_token, "T_total_ms": v * noise_v + p * noise_p + decode,
                "accuracy": rng.integers(0, 2, len(grid)).astype(float), "prediction": "a", "answers": '["a"]',
                "run_index": run, "device": "cpu", "backend": space.name,
            }))
    return pd.concat(frames, ignore_index=True)[list(PROFILE_COLUMNS)]
