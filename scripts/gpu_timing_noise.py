"""Where the GPU tables' run-to-run noise comes from: the same request timed back to back vs interleaved.

For a few configs of molmoe_arch, times one request `--repeats` times in a row (after warm-up), then
the same configs interleaved (config A, B, C, A, B, C, ...), as the profiling sweep orders its work.
Prints and writes (`--out`/timing_noise.json, timing_noise_graph.json for the graph engine) the median and coefficient of variation per stage for
both schedules. Low CV back to back but high CV interleaved means the noise comes from switching
configs (allocator, caches, clocks), not from the kernels; high CV in both means host jitter.

  python scripts/gpu_timing_noise.py --out $OUT            # on the GPU machine
  python scripts/gpu_timing_noise.py --engine graph --compare-eager --out $OUT   # CUDA-graph engine
  python scripts/gpu_timing_noise.py --size tiny --repeats 3  # CPU smoke test

With `--compare-eager` it also reports whether the graph (or fused) engine's greedy tokens equal the
eager engine's for each config (same weights, same request); `--compare-samples N` checks N probe
samples (prompt lengths 16 / 64 x three image sizes) x five configs instead of one sample x the three
timed configs, and for every mismatch the eager logits' gap between the two engines' tokens at the
first differing position, in bf16 steps (a gap of a step or two is a near-tie that rounding decides).

No MLflow: core only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.knobs import KnobConfig  # noqa: E402
from core.profiling.planning import PROBE_IMAGE_SIZE  # noqa: E402
from core.timing import PREDICTED_COMPONENTS, coefficient_of_variation  # noqa: E402
from core.vlm.backend import ENGINES  # noqa: E402
from core.vlm.molmoe_arch import MolmoeArchBackend, image_crops, prompt_token_ids, synthetic_latency_samples  # noqa: E402

# What the latency estimator predicts (decode per decode forward) and the end-to-end sum.
STAGES = (*PREDICTED_COMPONENTS.values(), "T_total_ms")


def summarise(values: list[float]) -> dict[str, float]:
    """Median, sample CV (ddof 1: `core.timing.coefficient_of_variation`; NaN for one value), min, max."""
    median = statistics.median(values)
    cv = coefficient_of_variation(values) if len(values) > 1 else float("nan")
    return {"median": round(median, 3), "cv": round(cv, 4), "min": round(min(values), 3), "max": round(max(values), 3)}


def token_id(word: str) -> int:
    return int(word[1:])  # molmoe_arch answers are "t<id>" words


@torch.inference_mode()
def eager_gap(eager: MolmoeArchBackend, sample, config: KnobConfig, eager_text: str, other_text: str) -> dict[str, float]:  # noqa: ANN001
    """Teacher-forced eager logits at the first position where the two answers differ: the gap between
    eager's token and the other engine's there, absolute and in bf16 steps at that logit's magnitude."""
    a, b = [token_id(w) for w in eager_text.split()], [token_id(w) for w in other_text.split()]
    t = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    rows, cols = eager.crops_for(sample.image, config.tier)
    with eager.knobs_applied(config.top_k, eager.blocks_for(config)):
        pixels = image_crops(sample.image, rows, cols, eager.dims.image_size).to(eager.device, eager.dtype)
        vision = eager.vision(pixels).reshape(1, -1, eager.dims.d_model)
        ids = prompt_token_ids(sample.question, eager.dims.text_vocab) + a[:t]
        text = eager.lm.get_input_embeddings()(torch.tensor([ids], device=eager.device))
        logits = eager.lm(inputs_embeds=torch.cat([vision, text], dim=1), logits_to_keep=1).logits[0, -1].float()
    gap = float(logits[a[t]] - logits[b[t]])
    step = 2.0 ** (math.floor(math.log2(abs(float(logits[a[t]])) + 1e-30)) - 7)  # bf16: 8 significant bits
    top2 = torch.topk(logits, 2).values
    return {"position": t, "gap": round(gap, 5), "gap_bf16_steps": round(gap / step, 2),
            "top1_minus_top2": round(float(top2[0] - top2[1]), 5), "logit": round(float(logits[a[t]]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="reference", choices=["reference", "tiny"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--pin-cpu", type=int, default=None, help="pin to this core with one torch thread")
    p.add_argument("--engine", default="eager", choices=list(ENGINES))
    p.add_argument("--compare-eager", action="store_true", help="graph/fused engine: check its tokens against eager's")
    p.add_argument("--compare-samples", type=int, default=0, help="token check over this many probe samples x 5 configs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    backend = MolmoeArchBackend(args.size, seed=0, engine=args.engine)
    sample = synthetic_latency_samples([16], [PROBE_IMAGE_SIZE], n=1, max_new_tokens=args.output_tokens, seed=0)[0]
    space = backend.space
    configs = [space.full(), space.minimal(), KnobConfig("medium", space.top_k_options[2], space.block_options[2])]
    print(f"built on {backend.device} in {time.perf_counter() - t0:.1f} s; configs {[c.key for c in configs]}", flush=True)

    def timed(config: KnobConfig) -> dict[str, float]:
        r = backend.answer(sample, config, force_output_tokens=args.output_tokens)
        return {"T_vision_ms": r.T_vision_ms, "T_prefill_ms": r.T_prefill_ms,
                "T_decode_per_token_ms": r.T_decode_per_token_ms, "T_total_ms": r.T_total_ms}

    for c in configs:
        for _ in range(3):
            timed(c)
    report: dict[str, object] = {"device": str(backend.device), "size": args.size, "repeats": args.repeats,
                                 "engine": args.engine, "pin_cpu": args.pin_cpu, "back_to_back": {}, "interleaved": {}}
    start = time.perf_counter()
    timed(configs[0])
    report["one_request_wall_ms"] = round(1000 * (time.perf_counter() - start), 1)
    for c in configs:
        rows = [timed(c) for _ in range(args.repeats)]
        report["back_to_back"][c.key] = {s: summarise([r[s] for r in rows]) for s in STAGES}  # type: ignore[index]
    interleaved: dict[str, list[dict[str, float]]] = {c.key: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            interleaved[c.key].append(timed(c))
    for key, rows in interleaved.items():
        report["interleaved"][key] = {s: summarise([r[s] for r in rows]) for s in STAGES}  # type: ignore[index]
    for schedule in ("back_to_back", "interleaved"):
        for key, stats in report[schedule].items():  # type: ignore[union-attr]
            line = ", ".join(f"{s[2:-3]} {v['median']:.2f} ms cv {v['cv']:.3f}" for s, v in stats.items())
            print(f"{schedule:13s} {key:14s} {line}", flush=True)
    if args.compare_eager and args.engine != "eager":
        eager = MolmoeArchBackend(args.size, seed=0, engine="eager")
        if args.compare_samples:
            probes = synthetic_latency_samples([16, 64], [(640, 480), (800, 450), (500, 500)], n=args.compare_samples,
                                               max_new_tokens=args.output_tokens, seed=0)
            check = [space.full(), space.minimal(), KnobConfig("medium", 6, 12), KnobConfig("high", 12, 16),
                     KnobConfig("low", 10, 10)]
        else:
            probes, check = [sample], configs
        cases = []
        for c in check:
            for probe in probes:
                ours = backend.answer(probe, c, force_output_tokens=args.output_tokens).text
                ref = eager.answer(probe, c, force_output_tokens=args.output_tokens).text
                case = {"config": c.key, "sample": probe.sample_id, "equal": ours == ref}
                if ours != ref:
                    case.update({"engine": ours, "eager": ref, **eager_gap(eager, probe, c, ref, ours)})
                cases.append(case)
        # keyed by config for the one timed sample (as the timing sections), by config/sample otherwise
        report["tokens_match_eager"] = {(f"{c['config']}/{c['sample']}" if args.compare_samples else c["config"]): c["equal"]
                                        for c in cases}
        report["token_mismatches"] = [c for c in cases if not c["equal"]]
        print(f"{args.engine} tokens equal eager tokens: {sum(c['equal'] for c in cases)}/{len(cases)}; "
              f"mismatches: {report['token_mismatches']}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "timing_noise.json" if args.engine == "eager" else f"timing_noise_{args.engine}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
