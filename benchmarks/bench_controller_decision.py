"""Budget controller decision overhead: the shared rule (core.control.decision) with features already computed.

Usage: python benchmarks/bench_controller_decision.py [--requests 1000] [--repeats 20] [--threads 1]
Goal (issue 14): <= 0.2 ms per request on CPU. Prints the median per-request time of `LearnedController.decide`
(net forward, calibrated latency of all 75 configs, fit check, pick) for
  batch, suite-like   requests whose text_tokens vary as the suite's questions do (5..12) and whose crops per
                      tier are the suite's (every image is 2:1): the estimator runs once per distinct size
  batch, all distinct every request a different (text_tokens, crops) combination: one estimator pass each
  one request         a batch of one, called request after request: `decide_arrays` (features held as
                      arrays, as a server keeps them) and `decide` (a one-row DataFrame: pandas costs most)
numpy's OpenBLAS runs with one thread here: on a busy 2-core machine its threads turned the estimator's
small (75-row) matmuls from 0.07 to 0.3-0.9 ms each (set OPENBLAS_NUM_THREADS=1 where decisions are served).
The net and the estimator have the trainers' default widths (random weights: the time does not depend on
them); question and global-view features are 96 wide each, as the committed base VLM's d_model.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: see the docstring
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from core.control.decision import LearnedController, OutputLengthModel, request_columns  # noqa: E402
from core.control.policies import ControllerConfig, build_net, knob_options  # noqa: E402
from core.control.risk import PRICE_FRACTIONS, FitModel, ViolationPrices  # noqa: E402
from core.knobs import BASE_VLM_SPACE, TIERS  # noqa: E402
from core.latency.estimator import EstimatorConfig, train_estimator  # noqa: E402
from tests.helpers import synthetic_profile  # noqa: E402

DIM = 96


def controller(stage: str) -> LearnedController:
    table = synthetic_profile(num_samples=4, num_runs=1, space=BASE_VLM_SPACE)
    estimator, _ = train_estimator(table, table, EstimatorConfig(num_epochs=1))
    options = knob_options(BASE_VLM_SPACE)
    heads = ("tier",) if stage == "stage1" else ("tier", "top_k", "num_active_blocks")
    net = build_net(ControllerConfig(question_dim=DIM, global_view_dim=DIM, heads=heads, options=options)).eval()
    length = OutputLengthModel(np.zeros(DIM), np.ones(DIM), np.r_[np.zeros(DIM), 2.4], 8)
    # stage 1 with its risk pricing (core.control.risk), as trained by default
    fit = FitModel.from_ratios(np.linspace(0.6, 1.3, 1001)) if stage == "stage1" else None
    prices = ViolationPrices(np.array(PRICE_FRACTIONS), np.full(len(PRICE_FRACTIONS), 2.0), 0.02) if fit else None
    return LearnedController(net, "supervised" if stage != "stage1" else "two_stage", BASE_VLM_SPACE.name, 20.0,
                             estimator, 1.1, 0.95, length, np.linspace(0, 1, 75), fit=fit, prices=prices)


def requests(n: int, distinct: bool, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    crops = {t: BASE_VLM_SPACE.tier_max_crops[t] for t in TIERS}
    frame = pd.DataFrame({"text_tokens": np.arange(n) + 5 if distinct else rng.integers(5, 13, n)})
    for t in TIERS:
        frame[f"crops_{t}"] = crops[t] + (np.arange(n) % 3 if distinct else 0)
        frame[f"vision_tokens_{t}"] = (frame[f"crops_{t}"] + 1) * BASE_VLM_SPACE.tokens_per_crop
    features = rng.normal(size=(n, 2 * DIM)).astype(np.float32)
    names = [f"q_emb_{j}" for j in range(DIM)] + [f"gv_{j}" for j in range(DIM)]
    return pd.concat([frame, pd.DataFrame(features, columns=names)], axis=1)


def per_request_ms(decide, frame: pd.DataFrame, budget: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        decide(frame, budget)
        times.append((time.perf_counter_ns() - start) / 1e6 / len(frame))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(1)
    print(f"decision overhead per request, median of {args.repeats} repeats, {args.threads} torch thread(s), "
          f"goal <= 0.2 ms")
    for stage in ("supervised", "stage1"):
        c = controller(stage)
        for label, distinct in (("batch, suite-like", False), ("batch, all distinct", True)):
            frame = requests(args.requests, distinct)
            budget = rng.uniform(8, 24, len(frame))
            c.decide(frame, budget)  # warm-up
            print(f"  {stage:10s} {label:20s} {args.requests:5d} requests: {per_request_ms(c.decide, frame, budget, args.repeats):.4f} ms")
        frame = requests(200, False)
        budget = rng.uniform(8, 24, len(frame))
        q_columns, gv_columns = c._columns(frame)
        rows = [(frame[q_columns].to_numpy(np.float32)[i:i + 1], frame[gv_columns].to_numpy(np.float32)[i:i + 1],
                 frame[request_columns()].to_numpy(np.float64)[i:i + 1], budget[i:i + 1]) for i in range(len(frame))]
        frames = [frame.iloc[i:i + 1] for i in range(len(frame))]
        for name, call, items in (("one request, arrays", c.decide_arrays, rows),
                                  ("one request, frame", lambda f, b: c.decide(f, b), list(zip(frames, budget)))):
            times = []
            for _ in range(max(1, args.repeats // 4)):
                start = time.perf_counter_ns()
                for item in items:
                    call(*item)
                times.append((time.perf_counter_ns() - start) / 1e6 / len(items))
            print(f"  {stage:10s} {name:20s} {len(items):5d} calls   : {statistics.median(times):.4f} ms")


if __name__ == "__main__":
    main()
