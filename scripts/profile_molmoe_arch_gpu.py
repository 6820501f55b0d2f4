"""GPU latency profile of molmoe_arch (MolmoE-1B-sized, random weights) over the full 75-config grid.

One probe data set per forced output length (decode is timed on a known number of forwards):
  latency_probe_out<L>: prompts of each --prompt-lengths text tokens, one --image-size image (4:3 by
  default: 1 / 6 / 12 crops at low / medium / high), every config x sample x --runs repeats.
Rows go to a ProfileStore at --store (resumable: rerun the same command to continue a cut-off run);
--out gets a merged copy (one Parquet per data set) and summary.json. Prints medians per knob step.

  python scripts/profile_molmoe_arch_gpu.py --store /tmp/store --out $OUT            # H100 run
  python scripts/profile_molmoe_arch_gpu.py --size tiny --runs 1 --num-shards 25 ...  # CPU smoke test

No MLflow: core only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from core.knobs import TIERS, KnobConfig  # noqa: E402
from core.profiling.floors import copy_bandwidth_gbs  # noqa: E402
from core.profiling.planning import PROBE_IMAGE_SIZE, latency_probe_name, latency_probe_samples  # noqa: E402
from core.profiling.profiler import ProfileSweepConfig, run_sweep  # noqa: E402
from core.profiling.store import ProfileStore  # noqa: E402
from core.profiling.summaries import knob_step_effects, median_run_to_run_cv, medians_by_knob_option  # noqa: E402
from core.vlm.backend import ENGINES  # noqa: E402
from core.vlm.molmoe_arch import MolmoeArchBackend  # noqa: E402


class DeadlineReached(Exception):
    """Raised between rows when the wall-clock budget is spent; the sweep flushes and can resume."""


class DeadlineBackend:
    """Delegates to a backend; refuses new answers after `deadline` (perf_counter seconds). Keeps the
    fused engine's host share of vision (image conversion + upload, outside T_vision) per answer."""

    def __init__(self, inner: MolmoeArchBackend, deadline: float) -> None:
        self.inner, self.deadline = inner, deadline
        self.name, self.space, self.device = inner.name, inner.space, inner.device
        self.host_ms: list[dict[str, object]] = []

    def set_drop_order(self, order):  # noqa: ANN001, ANN201
        self.inner.set_drop_order(order)

    def answer(self, sample, config, max_new_tokens=None, force_output_tokens=None):  # noqa: ANN001, ANN201
        if time.perf_counter() > self.deadline:
            raise DeadlineReached
        result = self.inner.answer(sample, config, max_new_tokens=max_new_tokens, force_output_tokens=force_output_tokens)
        if self.inner.engine == "fused":
            self.host_ms.append({"image": f"{sample.image.width}x{sample.image.height}", "tier": config.tier,
                                 "crops": result.crops, "host_ms": float(self.inner.last_vision_host_ms),
                                 "T_vision_ms": result.T_vision_ms})
        return result


def host_share_summary(rows: list[dict[str, object]]) -> dict[str, object]:
    """Median host share of vision (ms) per image size and tier, and over all answers (fused engine)."""
    if not rows:
        return {}
    frame = pd.DataFrame(rows)
    per = frame.groupby(["image", "tier"]).agg(host_ms=("host_ms", "median"), T_vision_ms=("T_vision_ms", "median"),
                                                crops=("crops", "first"), n=("host_ms", "size"))
    return {"median_ms": round(float(frame["host_ms"].median()), 3), "p95_ms": round(float(frame["host_ms"].quantile(0.95)), 3),
            "by_image_tier": {f"{i}/{t}": {k: round(float(v), 3) for k, v in r.items()} for (i, t), r in per.iterrows()}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="reference", choices=["reference", "tiny"])
    p.add_argument("--device", default=None)
    p.add_argument("--engine", default="eager", choices=list(ENGINES),
                   help="graph: StaticCache + CUDA-graph replay of vision, prefill and decode (core/vlm/graph_engine.py); "
                        "fused: the same with tiling on the device and Triton decode kernels (core/vlm/fused_decode.py)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 64])
    p.add_argument("--output-tokens", type=int, nargs="+", default=[8, 32])
    p.add_argument("--image-size", nargs="+", default=["{}x{}".format(*PROBE_IMAGE_SIZE)],
                   help="WxH of the probe images (several: samples cycle over prompt length x image size)")
    p.add_argument("--pin-cpu", type=int, default=None,
                   help="pin the process to this CPU core and use one torch thread: the launch-bound decode "
                        "then waits less on the host scheduler")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-shards", type=int, default=1, help="profile only shard 0 of this many (smoke tests)")
    p.add_argument("--flush-every", type=int, default=50)
    p.add_argument("--deadline-s", type=float, default=540.0, help="stop cleanly (resumable) after this many seconds")
    p.add_argument("--store", required=True, help="ProfileStore directory (resumes what is there)")
    p.add_argument("--out", default=None, help="where the merged Parquet and summary.json go")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.deadline_s
    sizes = [tuple(int(x) for x in size.lower().split("x")) for size in args.image_size]
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})
        torch.set_num_threads(1)
    import transformers

    print(f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__}", flush=True)
    backend = MolmoeArchBackend(args.size, device=args.device, seed=args.seed, engine=args.engine)
    device_name = torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else "cpu"
    print(
        f"built molmoe_arch/{args.size} ({args.engine} engine) on {device_name} ({backend.dtype}, experts={backend.experts_implementation}, "
        f"attn={backend.lm.config._attn_implementation}) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    # The copy bandwidth of this device, in this run: the bandwidth floors of the table's README use it.
    copy_gbs = [copy_bandwidth_gbs(backend.device)] if backend.device.type == "cuda" else []
    store = ProfileStore(args.store)
    samples_by_ds: dict[str, list] = {}
    for n in args.output_tokens:  # one probe data set per output length, a sample per (prompt length, image size)
        samples_by_ds.update(latency_probe_samples(args.prompt_lengths, n, len(args.prompt_lengths) * len(sizes),
                                                   args.seed, image_sizes=sizes))
    # Pre-warm every tier (one vision/prefill shape each) and both top_k extremes before timing.
    for samples in samples_by_ds.values():
        for s in samples:
            for tier in TIERS:
                for k in (backend.space.top_k_options[0], backend.space.top_k_options[-1]):
                    backend.answer(s, KnobConfig(tier, k, backend.space.num_blocks), force_output_tokens=2)
    full = backend.answer(samples_by_ds[next(iter(samples_by_ds))][-1], backend.space.full(), force_output_tokens=8)
    print(
        f"pre-warm done at {time.perf_counter() - t0:.1f} s; full config: vision {full.T_vision_ms:.1f} ms, "
        f"prefill {full.T_prefill_ms:.1f} ms, decode/token {full.T_decode_per_token_ms:.2f} ms",
        flush=True,
    )

    guarded = DeadlineBackend(backend, deadline)
    stopped = False
    for n in args.output_tokens:
        ds = latency_probe_name(n)
        config = ProfileSweepConfig(
            backend="molmoe_arch", dataset_names=(ds,), num_samples=len(samples_by_ds[ds]), num_runs=args.runs,
            shard=0, num_shards=args.num_shards, seed=args.seed, warmup=args.warmup, flush_every=args.flush_every,
            force_output_tokens=n,
        )
        try:
            summary = run_sweep(guarded, samples_by_ds, config, store, None, progress=False)
            print(f"{ds}: wrote {summary.rows_written}, skipped {summary.rows_skipped} in {summary.wall_time_s:.1f} s", flush=True)
        except DeadlineReached:
            stopped = True
            print(f"{ds}: deadline reached; rerun the same command to resume", flush=True)
            break

    if copy_gbs:
        copy_gbs.append(copy_bandwidth_gbs(backend.device))
    df = store.load()
    wall_s = time.perf_counter() - t0
    median_cv = float(median_run_to_run_cv(df, ("T_total_ms",))["T_total_ms"])  # sample CV (ddof 1), NaN with one run
    result = {
        "command": " ".join(sys.argv),
        "pin_cpu": args.pin_cpu,
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "experts_implementation": backend.experts_implementation,
        "engine": args.engine,
        "rows": int(len(df)),
        "rows_per_dataset": {k: int(v) for k, v in df["dataset"].value_counts().sort_index().items()},
        "complete": not stopped,
        "copy_bandwidth_gbs": [round(x, 1) for x in copy_gbs],  # before and after the sweep
        "vision_host_ms": host_share_summary(guarded.host_ms),
        "wall_s": round(wall_s, 1),
        "median_cv_T_total": None if math.isnan(median_cv) else round(median_cv, 5),
        "medians_by_knob": {ds: medians_by_knob_option(part) for ds, part in df.groupby("dataset")},
        "step_effects_T_total_ms": {
            ds: knob_step_effects(part, "T_total_ms").to_dict(orient="records") for ds, part in df.groupby("dataset")
        },
    }
    if args.out:
        out = Path(args.out)
        store.merge(out)
        (out / "summary.json").write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k not in ("medians_by_knob", "step_effects_T_total_ms")}
    print(json.dumps(brief, indent=1))
    for ds, meds in result["medians_by_knob"].items():
        print(f"--- {ds}: median ms per knob option (total / prefill / vision / decode per token)")
        for knob, by_opt in meds.items():
            cells = [
                f"{o}: {v['T_total_ms']:.1f}/{v['T_prefill_ms']:.1f}/{v['T_vision_ms']:.1f}/{v['T_decode_per_token_ms']:.2f}"
                for o, v in by_opt.items()
            ]
            print(f"  {knob:18s} " + " | ".join(cells))
        for step in result["step_effects_T_total_ms"][ds]:
            print(f"  step {step['knob']:18s} {step['step']:14s} {step['delta_ms']:+9.2f} ms T_total (paired median, n={step['pairs']})")

if __name__ == "__main__":
    main()
