"""Bandwidth floors of a GPU latency table: the fewest bytes a decode step must read, and the copy
bandwidth of the device it ran on (measured in the same run), so each config's measured decode time
can be put against the time those bytes take at that bandwidth.
"""

from __future__ import annotations

import statistics

import pandas as pd
import torch

from core.knobs import KNOBS


def decode_bytes_per_token(config: object, top_k: int, num_blocks: int, context_len: int, itemsize: int = 2) -> int:
    """The fewest bytes one batch-1 decode step of an OLMoE (`config`: its transformers config) must read:
    per active block the attention weights, router, the `top_k` selected experts and the K/V of
    `context_len` cached positions; the final norm and LM head; the token's embedding row."""
    h, e, i = config.hidden_size, config.num_experts, config.intermediate_size
    head_dim = h // config.num_attention_heads
    kv_width = config.num_key_value_heads * head_dim
    attention = h * h * 2 + h * kv_width * 2 + 2 * h + 2 * kv_width  # q, o, k, v, q/k norms
    per_block = attention + e * h + 2 * h + top_k * 3 * h * i + 2 * kv_width * int(context_len)
    head = config.vocab_size * h + h + h  # LM head, final norm, embedding row
    return int(itemsize * (num_blocks * per_block + head))


def copy_bandwidth_gbs(device: torch.device | str, n_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + bytes written), median of `repeats` copies of
    `n_bytes` of random bf16 data timed with CUDA events after warm-up."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"copy bandwidth is measured on a CUDA device, got {device}")
    src = torch.randn(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times_ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    del src, dst
    return 2 * n_bytes / statistics.median(times_ms) / 1e6


def floor_ms(n_bytes: float, bandwidth_gbs: float) -> float:
    """Milliseconds to move `n_bytes` at `bandwidth_gbs`."""
    return float(n_bytes) / bandwidth_gbs / 1e6


def decode_floor_ms(df: pd.DataFrame, config: object, bandwidth_gbs: float, itemsize: int = 2) -> pd.Series:
    """Per profiling row: the bandwidth floor of one decode step (ms) at the row's top_k and block count,
    with the K/V of the mean context its decode steps attend over (prompt + output_tokens / 2 slots)."""
    context = df["vision_tokens"] + df["text_tokens"] + df["output_tokens"] / 2
    n_bytes = [decode_bytes_per_token(config, int(k), int(b), int(round(c)), itemsize)
               for k, b, c in zip(df["top_k"], df["num_active_blocks"], context)]
    return pd.Series([floor_ms(n, bandwidth_gbs) for n in n_bytes], index=df.index, name="floor_ms")


def realised_vs_theory(df: pd.DataFrame, floor: pd.Series, knob: str, high: object, low: object) -> dict[str, float]:
    """Decode-per-token saving of stepping `knob` from `high` to `low`, the other knobs, sample and run
    held fixed: median measured saving, median saving of the bandwidth floor, and their ratio."""
    others = [k for k in KNOBS if k != knob]
    frame = df.assign(floor_ms=floor)
    wide = frame.pivot_table(index=["sample_id", "run_index", *others], columns=knob,
                             values=["T_decode_per_token_ms", "floor_ms"], aggfunc="median")
    realised = (wide[("T_decode_per_token_ms", high)] - wide[("T_decode_per_token_ms", low)]).dropna()
    theory = (wide[("floor_ms", high)] - wide[("floor_ms", low)]).loc[realised.index]
    return {"realised_ms": float(realised.median()), "theory_ms": float(theory.median()),
            "realised_share": float(realised.median() / theory.median()), "pairs": int(len(realised))}


__all__ = ["copy_bandwidth_gbs", "decode_bytes_per_token", "decode_floor_ms", "floor_ms", "realised_vs_theory"]
