"""Replay GRPO throughput and the time of a full training (issue 15).

Usage: python benchmarks/bench_grpo.py [--samples 2400] [--epochs 100] [--threads 1] [--batch-sizes 64,256,1024]
Goals: >= 100,000 rollouts/s on 2 CPU cores; a full 100-epoch training of any controller <= 5 min.

The controller data has the default build's size (1,000 train + 200 val samples per data set, 80% of
the train+val samples trained on = 2,880; 75 configs; question and global-view features 96 wide each,
as the committed base VLM's d_model), random accuracies and latencies (the time does not depend on
them). `rollouts/s` is configs drawn and scored per second of training (forward, sampling, reward,
advantages, backward, Adam step, multiplier update), validation excluded, median over epochs.
Prints one line per (policy, batch size) and the wall time of each full training.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from core.control.decision import fit_output_length  # noqa: E402
from core.control.grpo import GRPOConfig, train_grpo  # noqa: E402
from core.control.policies import ControllerConfig, TierControllerNet, knob_options  # noqa: E402
from core.control.supervised import ControllerArrays, Rule  # noqa: E402
from core.knobs import BASE_VLM_SPACE  # noqa: E402

DIM = 96


def synthetic_arrays(n: int, seed: int = 0) -> ControllerArrays:
    rng = np.random.default_rng(seed)
    configs = len(BASE_VLM_SPACE.grid())
    latency = rng.uniform(20, 60, size=(n, configs))
    return ControllerArrays([f"synth:train:{i}" for i in range(n)], rng.normal(size=(n, DIM)).astype(np.float32),
                            rng.normal(size=(n, DIM)).astype(np.float32), rng.integers(0, 2, (n, configs)).astype(float),
                            latency, latency * 1.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=3600, help="controller-data samples (80%% are trained on)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", default="64,256,1024")
    p.add_argument("--policies", default="end_to_end,stage2,joint")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    options = knob_options(BASE_VLM_SPACE)
    arrays = synthetic_arrays(args.samples)
    rule = Rule(fit_output_length(np.zeros((4, DIM)), np.full(4, 2.0)), 1.0, 0.97, 0)
    noise = np.random.default_rng(1).normal(1.0, 0.05, 2000)
    stage1 = TierControllerNet(ControllerConfig(question_dim=DIM, global_view_dim=DIM, options=options, dropout=0.0))
    stage1.fit_scalers(stage1.inputs(arrays.question, arrays.global_view))
    print(f"{len(arrays.sample_ids)} samples x {arrays.accuracy.shape[1]} configs, {args.threads} torch thread(s)")
    for policy in args.policies.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            records: list[dict] = []
            started = time.perf_counter()
            train_grpo(arrays, rule, None, options, BASE_VLM_SPACE.name, 50.0, noise,
                       GRPOConfig(policy=policy, num_epochs=args.epochs, batch_size=batch_size, num_threads=args.threads),
                       stage1=stage1 if policy == "stage2" else None, on_epoch=lambda e, r: records.append(r))
            wall = time.perf_counter() - started
            rate = statistics.median(r["train_rollouts_per_s"] for r in records)
            print(f"{policy:>10}  batch {batch_size:>5}: {rate:>10,.0f} rollouts/s (median of {len(records)} epochs), "
                  f"{args.epochs} epochs in {wall:6.1f} s")


if __name__ == "__main__":
    main()
