"""GPU check of the stage-by-stage path that controller data and adaptive inference use on molmoe_arch:
for each engine, the accuracy grid built through `StagedVLM` (`core.control.data.accuracy_grid`) must give,
config by config, the answer `answer` gives, and the graph / fused engines the eager engine's tokens, on
the same weights (a MolmoE-1B-sized model with random weights: no release is needed).

Usage (on the GPU machine): python scripts/gpu_staged_engines.py --out DIR [--engines eager,graph]
Prints one line per engine and writes DIR/staged_engines.json; exits 1 on any mismatch with `answer`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from core.control.data import accuracy_grid, sample_features
from core.knobs import KNOBS
from core.vlm.molmoe_arch import MolmoeArchBackend, synthetic_latency_samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="reference")
    p.add_argument("--engines", default="eager,graph")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--new_tokens", type=int, default=6)
    p.add_argument("--check_every", type=int, default=8, help="compare with `answer` on every N-th config")
    args = p.parse_args()
    torch.manual_seed(0)
    backend = MolmoeArchBackend(size=args.size, device="cuda", seed=0)
    samples = synthetic_latency_samples((12, 24), ((640, 480), (480, 640)), args.samples, max_new_tokens=args.new_tokens,
                                        seed=0, dataset="probe")
    summary: dict = {"gpu": torch.cuda.get_device_name(), "size": args.size, "samples": len(samples), "engines": {}}
    grids = {}
    features = sample_features(backend, samples)
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        backend.engine = engine
        started = time.perf_counter()
        grid = accuracy_grid(backend, samples, progress=False, score_fn=lambda prediction, answers: 0.0)  # probes: no answers
        grid_s = time.perf_counter() - started
        checked, mismatches = 0, []
        for config in backend.space.grid()[::args.check_every]:
            for sample in samples:
                answer = backend.answer(sample, config, max_new_tokens=args.new_tokens)
                row = grid[(grid["sample_id"] == sample.sample_id) & (grid["tier"] == config.tier)
                           & (grid["top_k"] == config.top_k) & (grid["num_active_blocks"] == config.num_active_blocks)].iloc[0]
                checked += 1
                if row["prediction"] != answer.text or int(row["output_tokens"]) != answer.output_tokens:
                    mismatches.append(f"{sample.sample_id} {config}: grid {row['prediction']!r} / answer {answer.text!r}")
        grids[engine] = grid
        summary["engines"][engine] = {"grid_rows": len(grid), "grid_s": round(grid_s, 1), "checked_against_answer": checked,
                                      "mismatches": mismatches}
        print(f"{engine}: {len(grid)} grid answers in {grid_s:.1f} s; {checked - len(mismatches)}/{checked} equal to answer()")
    if "eager" in grids:
        for engine, grid in grids.items():
            same = (grid["prediction"] == grids["eager"]["prediction"]).mean()
            summary["engines"][engine]["same_prediction_as_eager"] = float(same)
            print(f"{engine}: {same:.3f} of the grid's predictions equal eager's")
    summary["features_rows"] = len(features)
    summary["knobs"] = list(KNOBS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "staged_engines.json").write_text(json.dumps(summary, indent=1))
    return 1 if any(e["mismatches"] for e in summary["engines"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
