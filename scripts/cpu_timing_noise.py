"""How noisy is CPU timing of the base VLM on this machine, and over which time scale?

Picks `--items` random (sample, config) pairs, then times each `--repeats` times back to back, in
`--passes` passes over all items in shuffled orders. Reports per latency component:
  within-burst CV      the spread of the back-to-back repeats (fast noise; sample std / mean),
  pass-to-pass error   median |a - b| / mean(a, b) between two passes' single timings and between
                       their medians of the repeats (what a profiling table's rows disagree by).
If the median of repeats does not shrink the pass-to-pass error, the noise is slow (seconds): more
repeats inside a row cannot help, only more runs spread in time or a quieter machine can.

  python scripts/cpu_timing_noise.py --out $OUT --pin-cpu 2         # one worker on core 2
  python scripts/cpu_timing_noise.py --items 4 --repeats 2           # smoke test

No MLflow: core only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.timing import STAGE_COLUMNS, coefficient_of_variation  # noqa: E402
from core.vlm.registry import load_backend  # noqa: E402
from core.vqa.suite import DATASETS, load_split  # noqa: E402


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / ((a + b) / 2) if a + b > 0 else 0.0


def summarise(bursts: dict[int, list[list[dict[str, float]]]]) -> dict[str, dict[str, float]]:
    """Per component: median within-burst CV (the sample CV, ddof 1, of `core.timing.coefficient_of_variation`)
    and pass-0 vs pass-1 gaps (single timing, median of repeats)."""
    out = {}
    for comp in STAGE_COLUMNS:
        cvs, single, median_gap = [], [], []
        for passes in bursts.values():
            for burst in passes:
                xs = [r[comp] for r in burst]
                if len(xs) > 1 and statistics.mean(xs) > 0:
                    cvs.append(coefficient_of_variation(xs))
            if len(passes) > 1:
                first, second = [r[comp] for r in passes[0]], [r[comp] for r in passes[1]]
                single.append(relative_gap(first[0], second[0]))
                median_gap.append(relative_gap(statistics.median(first), statistics.median(second)))
        out[comp] = {
            "within_burst_cv": round(statistics.median(cvs), 4) if cvs else float("nan"),
            "pass_gap_single": round(statistics.median(single), 4) if single else float("nan"),
            "pass_gap_median_of_repeats": round(statistics.median(median_gap), 4) if median_gap else float("nan"),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=str(Path(__file__).resolve().parents[1] / "data" / "base_vlm"))
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pin-cpu", type=int, default=None, help="pin this process to one core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for cpu_timing_noise[_cpuN].json")
    args = p.parse_args()
    if args.items < 1 or args.repeats < 1 or args.passes < 1:
        raise SystemExit("cpu_timing_noise: --items, --repeats and --passes must be >= 1")
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})
    torch.set_num_threads(args.threads)
    backend = load_backend("base_vlm", "cpu", checkpoint_dir=args.base_model)
    samples = [s for name in DATASETS for s in load_split(name, "test", 20, seed=args.seed)]
    grid = list(backend.space.grid())
    rng = random.Random(args.seed)
    items = [(rng.choice(samples), rng.choice(grid)) for _ in range(args.items)]
    for _ in range(3):
        backend.answer(items[0][0], backend.space.full())
    start = time.perf_counter()
    bursts: dict[int, list[list[dict[str, float]]]] = {i: [] for i in range(len(items))}
    for _ in range(args.passes):
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            sample, config = items[i]
            burst = []
            for _ in range(args.repeats):
                r = backend.answer(sample, config)
                burst.append({"T_vision_ms": r.T_vision_ms, "T_prefill_ms": r.T_prefill_ms, "T_decode_ms": r.T_decode_ms,
                              "T_total_ms": r.T_total_ms})
            bursts[i].append(burst)
    report = {
        "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "pin_cpu": args.pin_cpu, "threads": args.threads, "items": args.items, "repeats": args.repeats,
        "passes": args.passes, "wall_s": round(time.perf_counter() - start, 1), "components": summarise(bursts),
    }
    print(json.dumps(report), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        suffix = f"_cpu{args.pin_cpu}" if args.pin_cpu is not None else ""
        Path(args.out, f"cpu_timing_noise{suffix}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
