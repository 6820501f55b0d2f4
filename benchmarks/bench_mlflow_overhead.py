"""Share of `train_predictor`'s wall time spent inside MLflow calls (goal <= 5%).

Runs the entry point in-process under cProfile against a throw-away SQLite store (tables created
before timing, as a user's store already has them) and attributes to MLflow the cumulative time of
every call from the project's code into the `mlflow` package.

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


REPO_ROOT = str(Path(__file__).resolve().parents[1])


def _is_mlflow(filename: str) -> bool:
    return f"{os.sep}mlflow{os.sep}" in filename and "site-packages" in filename


def _is_project(filename: str) -> bool:
    return filename.startswith(REPO_ROOT) and "site-packages" not in filename


def mlflow_seconds(stats: pstats.Stats) -> tuple[float, dict[str, float]]:
    """Total seconds in calls entering mlflow from outside it, and the same per mlflow function."""
    total, by_function = 0.0, {}
    for func, (_, _, _, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if not _is_mlflow(func[0]):
            continue
        for caller, (_, _, _, cumulative) in callers.items():
            if _is_project(caller[0]):  # our code calling MLflow; MLflow's own callbacks are inside these
                total += cumulative
                name = f"{Path(func[0]).parent.name}/{Path(func[0]).name}:{func[2]}"
                by_function[name] = by_function.get(name, 0.0) + cumulative
    return total, by_function


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
            # A user's store already exists: create its tables before timing (a one-off ~5 s).
            import mlflow

            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
            mlflow.search_experiments()
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            train_predictor.main(["--num_epochs", str(args.num_epochs)])
            profiler.disable()
            wall = time.perf_counter() - start
            spent, by_function = mlflow_seconds(pstats.Stats(profiler))
            shares.append(spent / wall)
            walls.append(wall)
            print(f"wall {wall:.1f} s, in MLflow calls {spent:.2f} s ({spent / wall:.1%}); largest:")
            for name, seconds in sorted(by_function.items(), key=lambda kv: -kv[1])[:8]:
                print(f"  {seconds:6.2f} s  {name}")
    print(f"median share of wall time in MLflow calls: {statistics.median(shares):.1%} "
          f"(median wall {statistics.median(walls):.1f} s, goal <= 5%)")


if __name__ == "__main__":
    main()
