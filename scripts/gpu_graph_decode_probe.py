"""Would CUDA graphs make molmoe_arch's GPU timing quiet? One decode step, eager vs graph replay.

For a few configs: prefill one request into a StaticCache, then time the same decode step
`--repeats` times eagerly and as a captured CUDA graph (CUDA events around each call), and print
the median and coefficient of variation of both. A graph replays the step's kernels without Python
dispatch, so what it measures is the GPU's own time; if its CV is small where eager's is not, the
host, not the kernels, is where the profiling tables' noise comes from.

  python scripts/gpu_graph_decode_probe.py --out $OUT      # on the GPU machine (CUDA only)

No MLflow: core only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.knobs import KnobConfig  # noqa: E402
from core.profiling.planning import PROBE_IMAGE_SIZE  # noqa: E402
from core.timing import coefficient_of_variation  # noqa: E402
from core.vlm.molmoe_arch import MolmoeArchBackend, image_crops, prompt_token_ids, synthetic_latency_samples  # noqa: E402


def _stats(values: list[float]) -> dict[str, float]:
    """Median and sample CV (ddof 1: `core.timing.coefficient_of_variation`)."""
    return {"median_ms": round(statistics.median(values), 4), "cv": round(coefficient_of_variation(values), 4)}


def _time(fn, repeats: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def probe(backend: MolmoeArchBackend, config: KnobConfig, repeats: int) -> dict[str, object]:
    from transformers import StaticCache

    lm, dev = backend.lm, backend.device
    sample = synthetic_latency_samples([16], [PROBE_IMAGE_SIZE], n=1, max_new_tokens=8, seed=0)[0]
    blocks = backend.blocks_for(config)
    with torch.inference_mode(), backend.knobs_applied(config.top_k, blocks):
        rows, cols = backend.crops_for(sample.image, config.tier)
        pixels = image_crops(sample.image, rows, cols, backend.dims.image_size).to(dev, backend.dtype)
        vision = backend.vision(pixels).reshape(1, -1, backend.dims.d_model)
        ids = torch.tensor([prompt_token_ids(sample.question, backend.dims.text_vocab)], device=dev)
        embeds = torch.cat([vision, lm.get_input_embeddings()(ids)], dim=1)
        length = embeds.shape[1]
        # Room for every eager step: some transformers versions place a step at the cache's current
        # length, not at `cache_position`, so each call writes one slot further.
        cache = StaticCache(config=lm.config, max_cache_len=length + 2 * repeats + 32)
        out = lm(inputs_embeds=embeds, past_key_values=cache, cache_position=torch.arange(length, device=dev),
                 use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1)[:, None].clone()
        position = torch.tensor([length], device=dev)

        def step() -> torch.Tensor:
            return lm(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        result: dict[str, object] = {"config": config.key, "prompt_tokens": length, "eager": _stats(_time(step, repeats))}
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graphed_logits = step()
            result["graph"] = _stats(_time(graph.replay, repeats))
            # No logits comparison: the eager calls above wrote further cache slots than the captured one.
            result["graph_logits_finite"] = bool(torch.isfinite(graphed_logits).all())
        except Exception as exc:  # noqa: BLE001 - the probe reports why capture failed
            result["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
            result["graph_error_where"] = traceback.format_exc().strip().splitlines()[-3:]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_graph_decode_probe: needs a CUDA device")
    backend = MolmoeArchBackend("reference", seed=0)
    space = backend.space
    configs = [space.full(), space.minimal(), KnobConfig("high", space.top_k_options[0], space.num_blocks),
               KnobConfig("high", space.top_k_options[-1], space.num_blocks)]
    results = [probe(backend, c, args.repeats) for c in configs]
    for r in results:
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "graph_decode_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
