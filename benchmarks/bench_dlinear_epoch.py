"""Seconds per DLinear training epoch and milliseconds per forecast call on the synthetic trace.

Usage: python benchmarks/bench_dlinear_epoch.py --days 61 --epochs 3 --threads 2
Goal (DESIGN: two CPU cores): <= 1 s per epoch with the default config; the original study
claimed ~90 s per epoch and < 3 ms per prediction.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from core.forecasting.burstgpt import CHANNELS, generate_synthetic_trace, per_minute_series  # noqa: E402
from core.forecasting.windows import build_datasets  # noqa: E402
from core.forecasting.training import ForecastTrainConfig, Forecaster, train_dlinear  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=61)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forecast-calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    series = per_minute_series(generate_synthetic_trace(num_days=args.days, seed=0))
    config = replace(ForecastTrainConfig(), num_epochs=args.epochs, patience=args.epochs + 1,
                     num_threads=args.threads)
    data = build_datasets(series.to_numpy(), config.seq_len, config.horizon, config.stride,
                          0.7, 0.1, channels=CHANNELS)
    print(f"data: {len(series)} minutes, {len(data.X_train)} train windows "
          f"({time.perf_counter() - started:.1f} s to generate and window)")

    result = train_dlinear(data, config)
    epoch_s = [r.epoch_time_s for r in result.history]
    print(f"epoch time: median {statistics.median(epoch_s):.3f} s "
          f"(all: {', '.join(f'{s:.3f}' for s in epoch_s)}) with {args.threads} threads, "
          f"batch {config.batch_size}")

    forecaster = Forecaster.from_training(result.model, data.scaler, CHANNELS)
    history = series.iloc[-config.seq_len:]
    forecaster.forecast(history)  # warm-up: builds the model once
    call_ms = []
    for _ in range(args.forecast_calls):
        t = time.perf_counter_ns()
        forecaster.forecast(history)
        call_ms.append((time.perf_counter_ns() - t) / 1e6)
    print(f"forecast call: median {statistics.median(call_ms):.3f} ms, "
          f"p95 {sorted(call_ms)[int(0.95 * len(call_ms)) - 1]:.3f} ms over {len(call_ms)} calls")


if __name__ == "__main__":
    main()
