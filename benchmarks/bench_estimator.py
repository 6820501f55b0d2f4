"""Latency estimator speed: training wall time, batched throughput, single-request time.

Usage: python benchmarks/bench_estimator.py [--rows 100000] [--epochs 50] [--train-threads 1] [--infer-threads 2]
Goals (two CPU cores): 50 epochs over 100k profiling rows <= 30 s; batched inference >= 1M configs/s;
one request <= 0.1 ms (the original study's estimator target). Prints figures, asserts nothing.

The table comes from the test suite's synthetic law (tests/helpers.py `synthetic_profile`: MolmoE knob space,
75 configs per sample, 1% noise): `--rows` training rows plus a separate 20% validation table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from core.knobs import MOLMOE_SPACE, TIERS  # noqa: E402
from core.latency.estimator import EstimatorConfig, train_estimator  # noqa: E402
from core.latency.evaluation import evaluate_predictor  # noqa: E402
from core.latency.features import raw_matrix  # noqa: E402
from tests.helpers import synthetic_profile  # noqa: E402


def random_configs(n: int, seed: int = 0) -> pd.DataFrame:
    """n request x config rows drawn from the MolmoE knob space (what a controller would score)."""
    rng = np.random.default_rng(seed)
    tier = rng.integers(0, len(TIERS), n)
    caps = np.array([MOLMOE_SPACE.tier_max_crops[t] for t in TIERS])
    crops = rng.integers(1, caps[tier] + 1)
    return pd.DataFrame({
        "tier": np.array(TIERS)[tier], "crops": crops, "vision_tokens": (crops + 1) * MOLMOE_SPACE.tokens_per_crop,
        "text_tokens": rng.integers(8, 129, n), "top_k": rng.choice(MOLMOE_SPACE.top_k_options, n),
        "num_active_blocks": rng.choice(MOLMOE_SPACE.block_options, n), "output_tokens": rng.integers(1, 33, n),
    })


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="training rows (a validation table of 20%% comes on top)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=EstimatorConfig.batch_size)
    parser.add_argument("--train-threads", type=int, default=1)
    parser.add_argument("--infer-threads", type=int, default=2, help="batched inference is timed with 1 and with this many threads")
    parser.add_argument("--configs", type=int, default=1_000_000, help="rows per batched-inference call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--single-calls", type=int, default=5000)
    args = parser.parse_args()

    # The host's CPUs may be shared: the load average says how much else was running.
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    configs_per_sample = len(MOLMOE_SPACE.grid())
    num_samples = max(3, round(args.rows / (2 * configs_per_sample)))
    started = time.perf_counter()
    train = synthetic_profile(num_samples=num_samples, num_runs=2, seed=0, dataset="bench_train")
    val = synthetic_profile(num_samples=max(3, num_samples // 5), num_runs=2, seed=1, dataset="bench_val")
    print(f"table: {len(train):,} training rows, {len(val):,} validation rows "
          f"({time.perf_counter() - started:.1f} s to generate)")

    config = replace(EstimatorConfig(), num_epochs=args.epochs, batch_size=args.batch_size, num_threads=args.train_threads)
    started = time.perf_counter()
    model, history = train_estimator(train, val, config)
    wall_s = time.perf_counter() - started
    epoch_s = statistics.median(r["epoch_time_s"] for r in history)
    steps = -(-len(train) // config.batch_size) * config.num_epochs
    print(f"training: {config.num_epochs} epochs x {len(train):,} rows, batch {config.batch_size}, "
          f"{args.train_threads} thread(s): {wall_s:.1f} s wall (goal <= 30 s), median epoch {epoch_s:.2f} s, "
          f"{steps / wall_s:,.0f} steps/s")
    metrics = evaluate_predictor(model, val, "val_")
    print(f"  fit: val MAPE prefill {metrics['val_mape_prefill']:.2f}%, decode {metrics['val_mape_decode']:.2f}%, "
          f"within10 {metrics['val_within10']:.3f}")

    frame = random_configs(args.configs)
    raw = raw_matrix(frame)  # the array path skips the DataFrame in and out
    # Both thread counts: on a shared host a second intra-op thread can wait on a busy core.
    for threads in sorted({1, args.infer_threads}):
        torch.set_num_threads(threads)
        model.predict_frame(frame.iloc[:10_000])  # warm-up
        frame_s = statistics.median(timed(lambda: model.predict_frame(frame), args.repeats))
        array_s = statistics.median(timed(lambda: model.predict_array(raw), args.repeats))
        print(f"batched, {args.configs:,} configs, {threads} thread(s): predict_frame {frame_s * 1e3:.0f} ms = "
              f"{args.configs / frame_s / 1e6:.2f} M configs/s, predict_array {array_s * 1e3:.0f} ms = "
              f"{args.configs / array_s / 1e6:.2f} M configs/s (goal >= 1 M/s)")

    row = frame.iloc[0]
    request = (str(row["tier"]), int(row["top_k"]), int(row["num_active_blocks"]), int(row["vision_tokens"]),
               int(row["text_tokens"]), int(row["crops"]), int(row["output_tokens"]))
    for _ in range(100):
        model.predict_one(*request)
    per_call = []
    for _ in range(args.single_calls):
        started = time.perf_counter()
        model.predict_one(*request)
        per_call.append(time.perf_counter() - started)
    one_row = frame.iloc[:1]
    frame_call = statistics.median(timed(lambda: model.predict_frame(one_row), 200))
    print(f"single request predict_one: median {statistics.median(per_call) * 1e3:.4f} ms, "
          f"p99 {np.quantile(per_call, 0.99) * 1e3:.4f} ms over {args.single_calls} calls (goal <= 0.1 ms); "
          f"predict_frame on one row: {frame_call * 1e3:.3f} ms (pandas overhead)")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
