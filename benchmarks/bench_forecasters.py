"""Workload forecasters side by side on the synthetic trace: test MAE per channel of persistence,
seasonal naive, moving average, DLinear, the calendar MLP and the generator's true intensity (the
floor no forecaster can know), mean and spread over seeds on the same test windows; P90 coverage;
seconds per epoch and forecast-call latency at 1 thread.

Usage: python benchmarks/bench_forecasters.py --days 61 --seeds 0,1,2 --splits 0.7,0.1 0.6,0.1,0.2 --out benchmarks/forecasters.md
Training seeds vary; the trace (seed 0) and the windows stay the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from core.forecasting.burstgpt import CHANNELS, generate_synthetic_trace, per_minute_series, synthetic_expected_load  # noqa: E402
from core.forecasting.evaluation import evaluate_forecaster, scores  # noqa: E402
from core.forecasting.training import Forecaster, ForecastTrainConfig, study_datasets, train_with_reference  # noqa: E402

ROWS = ("persistence", "seasonal_naive", "moving_average", "dlinear", "calendar_mlp", "true intensity (floor)")


def forecast_ms(forecaster: Forecaster, series, calls: int = 200) -> float:
    history = forecaster.history_example(series)
    forecaster.forecast(history)  # warm-up: builds the model once
    times = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        forecaster.forecast(history)
        times.append((time.perf_counter_ns() - started) / 1e6)
    return statistics.median(times)


def run_split(series, expected, split: str, seeds: list[int], threads: int) -> list[str]:
    mae = {row: {ch: [] for ch in CHANNELS} for row in ROWS}
    coverage, epoch_s, call_ms = {ch: [] for ch in CHANNELS}, {"dlinear": [], "calendar_mlp": []}, {"dlinear": [], "calendar_mlp": []}
    for seed in seeds:
        config = replace(ForecastTrainConfig(), seed=seed, num_threads=threads)
        data = study_datasets(series, config, split, 60, "synthetic")
        result, dlinear = train_with_reference(data, config)
        metrics, _ = evaluate_forecaster(result, data, 60, dlinear)
        floor = scores(data.unscaled("test")[1], expected[data.t0_test[:, None] + np.arange(data.horizon)], CHANNELS, "")
        for ch in CHANNELS:
            for row in ROWS[:4]:
                mae[row][ch].append(metrics[f"baseline_{row}_test_mae_{ch}"])
            mae["calendar_mlp"][ch].append(metrics[f"test_mae_{ch}"])
            mae[ROWS[-1]][ch].append(floor[f"mae_{ch}"])
            coverage[ch].append(metrics[f"test_p90_coverage_{ch}"])
        for kind, trained in (("dlinear", dlinear), ("calendar_mlp", result)):
            epoch_s[kind].append(statistics.median(r.epoch_time_s for r in trained.history))
            call_ms[kind].append(forecast_ms(Forecaster.from_training(trained, data), series))
    spread = lambda v: f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2f}"  # noqa: E731  (sample std, ddof 1)
    lines = [f"### split {split} ({len(data.t0_test)} test windows, seeds {seeds})", "",
             "| forecaster | " + " | ".join(f"MAE {ch}" for ch in CHANNELS) + " |", "|---|" + "---|" * len(CHANNELS)]
    lines += [f"| {row} | " + " | ".join(spread(mae[row][ch]) for ch in CHANNELS) + " |" for row in ROWS]
    gain = [100 * (1 - np.mean(mae["calendar_mlp"][ch]) / np.mean(mae["dlinear"][ch])) for ch in CHANNELS]
    lines += ["", "calendar_mlp vs DLinear: " + ", ".join(f"{ch} {g:+.1f} % lower MAE" for ch, g in zip(CHANNELS, gain)),
              "P90 coverage (calendar_mlp): " + ", ".join(f"{ch} {spread(coverage[ch])}" for ch in CHANNELS),
              f"at {threads} thread(s): seconds per epoch " + ", ".join(f"{k} {spread(v)}" for k, v in epoch_s.items())
              + "; forecast call ms (median of 200) " + ", ".join(f"{k} {spread(v)}" for k, v in call_ms.items()), ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=61)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--splits", nargs="+", default=["0.7,0.1", "0.6,0.1,0.2"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    series = per_minute_series(generate_synthetic_trace(num_days=args.days, seed=0))[list(CHANNELS)]
    expected = synthetic_expected_load(num_days=args.days, seed=0)[list(CHANNELS)].to_numpy()
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [f"## Forecasters on the {args.days}-day synthetic trace (seed 0), test MAE in original units, mean ± sample std", ""]
    for split in args.splits:
        lines += run_split(series, expected, split, seeds, args.threads)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
