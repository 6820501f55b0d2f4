"""Share of `train_predictor`'s wall time spent inside MLflow calls (goal <= 5%).

Runs the entry point in-process under cProfile against a throw-away SQLite store and attributes to
MLflow the cumulative time of every call that enters the `mlflow` package from outside it.

    python benchmarks/bench_mlflow_overhead.py [--num_epochs 150] [--repeats 1]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _is_mlflow(filename: str) -> bool:
    return f"{os.sep}mlflow{os.sep}" in filename and "site-packages" in filename


def mlflow_seconds(stats: pstats.Stats) -> float:
    total = 0.0
    for func, (_, _, _, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if not _is_mlflow(func[0]):
            continue
        for caller, (_, _, _, cumulative) in callers.items():
            if not _is_mlflow(caller[0]):
                total += cumulative
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_epochs", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from entry_points import train_predictor

    shares, walls = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            train_predictor.main(["--num_epochs", str(args.num_epochs)])
            profiler.disable()
            wall = time.perf_counter() - start
            spent = mlflow_seconds(pstats.Stats(profiler))
            shares.append(spent / wall)
            walls.append(wall)
            print(f"wall {wall:.1f} s, in MLflow calls {spent:.2f} s ({spent / wall:.1%})")
    print(f"median share of wall time in MLflow calls: {statistics.median(shares):.1%} "
          f"(median wall {statistics.median(walls):.1f} s, goal <= 5%)")


if __name__ == "__main__":
    main()
