"""The fused decode engine on one GPU, in one call: environment, correctness against transformers'
eager OLMoE, decode per token (fused vs graph engine), copy bandwidth, and per-kernel timings over a
few launch shapes (which pick `FusedLaunch`'s defaults).

  python3 scripts/bench_fused_decode.py --out $OUT --deadline-s 400

Correctness: (1) one decode step after a real prompt (vision + text tokens) through transformers'
eager forward (DynamicCache) and through the fused kernels (StaticCache prefill, then `forward_token`):
relative error of the last block's hidden state and of the logits; (2) greedy tokens of the fused
engine (CUDA graphs) and the eager engine on probe samples, for several configs.
Writes --out/bench.json (after each section, so a cut-off run keeps what it measured).

No MLflow: core only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.knobs import KnobConfig  # noqa: E402
from core.profiling.floors import copy_bandwidth_gbs, decode_bytes_per_token, floor_ms  # noqa: E402
from core.vlm.fused_decode import FusedDecoder, FusedLaunch  # noqa: E402
from core.vlm.molmoe_arch import MolmoeArchBackend, image_crops, prompt_token_ids, synthetic_latency_samples  # noqa: E402


def graph_ms(fn, reps: int = 30) -> float:  # noqa: ANN001
    """Median ms of one replay of a CUDA graph of `fn` (captured after two eager warm-ups)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.float() - r.float()).norm() / r.float().norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--deadline-s", type=float, default=400)
    p.add_argument("--skip-launch-sweep", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {}

    def save(section: str) -> None:
        report.setdefault("sections_done", []).append(section)  # type: ignore[union-attr]
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"[{report['elapsed_s']} s] {section} done", flush=True)

    import transformers
    import triton

    backend = MolmoeArchBackend("reference", seed=0, engine="fused")
    lm, dev = backend.lm, backend.device
    layer = lm.model.layers[0]
    report["env"] = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(dev),
        "experts_implementation": backend.experts_implementation, "attn": lm.config._attn_implementation,
        "mlp": repr(layer.mlp), "expert_shapes": {n: list(t.shape) for n, t in layer.mlp.named_parameters()},
        "build_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report["env"], indent=1), flush=True)
    bw = copy_bandwidth_gbs(dev)
    report["copy_bandwidth_gbs"] = round(bw, 1)
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    save("env")

    gen = backend.generator()
    fused: FusedDecoder = gen.decoder  # type: ignore[assignment]
    space = backend.space
    samples = synthetic_latency_samples([16, 64], [(640, 480), (800, 450), (500, 500)], n=6, seed=0)

    # (1) one step vs transformers eager: hidden state of the last block and logits
    checks = []
    for config in [space.full(), space.minimal(), KnobConfig("high", 12, 12), KnobConfig("medium", 6, 14)]:
        sample = samples[1]
        blocks = backend.blocks_for(config)
        rows, cols = backend.crops_for(sample.image, config.tier)
        with torch.inference_mode(), backend.knobs_applied(config.top_k, blocks):
            vision = backend.vision(image_crops(sample.image, rows, cols, 336).to(dev, backend.dtype)).reshape(1, -1, 2048)
            text = lm.get_input_embeddings()(torch.tensor([prompt_token_ids(sample.question, 50280)], device=dev))
            prefix = torch.cat([vision, text], dim=1)
            token = torch.tensor([[4242]], device=dev)
            captured = {}
            hook = lm.model.layers[-1].register_forward_hook(
                lambda m, i, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[0, -1].clone()))
            cache = backend._new_cache()
            lm(inputs_embeds=prefix, past_key_values=cache, use_cache=True)
            ref = lm(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
            hook.remove()
            gen.cache.reset()
            lm(inputs_embeds=prefix, past_key_values=gen.cache, use_cache=True)
            fused.start(prefix.shape[1])
            gen.step_ids.copy_(token)
            fused.forward_token(config.top_k, blocks)
            torch.cuda.synchronize()
            checks.append({"config": config.key, "context": int(prefix.shape[1]), "hidden_rel_err": rel(fused.x, captured["h"]),
                           "logits_rel_err": rel(fused.logits, ref), "argmax_equal": int(fused.logits.argmax()) == int(ref.argmax())})
            print(checks[-1], flush=True)
    with torch.inference_mode():
        gen.cache.reset()
    report["one_step_vs_eager"] = checks
    save("one_step")

    # (2) greedy tokens: fused engine vs eager engine (same weights)
    configs = [space.full(), space.minimal(), KnobConfig("medium", 6, 12), KnobConfig("high", 12, 16), KnobConfig("low", 10, 10)]
    matches = []
    for config in configs:
        for sample in samples:
            a = backend.answer(sample, config, force_output_tokens=8).text
            backend.engine = "eager"
            b = backend.answer(sample, config, force_output_tokens=8).text
            backend.engine = "fused"
            matches.append({"config": config.key, "sample": sample.sample_id, "equal": a == b, "fused": a, "eager": b})
    report["tokens_match_eager"] = {"all_equal": all(m["equal"] for m in matches), "n": len(matches),
                                    "equal": sum(m["equal"] for m in matches), "cases": matches}
    print(f"greedy tokens equal: {report['tokens_match_eager']['equal']}/{len(matches)}", flush=True)
    save("tokens")

    # (3) per-token decode: fused vs graph engine, full and fastest configs, short and long prompts
    def decode_stats(cfg: KnobConfig, sample) -> dict[str, float]:  # noqa: ANN001
        rs = [backend.answer(sample, cfg, force_output_tokens=17) for _ in range(4)]
        r = rs[-1]
        steps = [ms for x in rs[1:] for ms in x.decode_step_ms]
        return {"decode_per_token_ms": round(statistics.median(steps), 4), "prefill_ms": round(r.T_prefill_ms, 3),
                "vision_ms": round(r.T_vision_ms, 3), "context": r.vision_tokens + r.text_tokens,
                "host_ms": round(float(backend.last_vision_host_ms), 3)}

    bench = {}
    for cfg in [space.full(), space.minimal(), KnobConfig("low", 8, 16), KnobConfig("low", 4, 16), KnobConfig("low", 8, 8),
                KnobConfig("high", 4, 8)]:
        for sample in (samples[0], samples[1]):
            key = f"{cfg.key}/{sample.sample_id}"
            s = decode_stats(cfg, sample)
            nbytes = decode_bytes_per_token(lm.config, cfg.top_k, cfg.num_active_blocks, s["context"] + 8)
            s["floor_ms"] = round(floor_ms(nbytes, bw), 4)
            s["ratio_to_floor"] = round(s["decode_per_token_ms"] / s["floor_ms"], 2)
            bench[f"fused/{key}"] = s
            print("fused", key, s, flush=True)
    saved_decoder, saved_graphs = gen.decoder, gen._decode
    gen.decoder, gen._decode = None, {}
    backend.engine = "graph"
    for cfg in [space.full(), space.minimal()]:
        key = f"{cfg.key}/{samples[0].sample_id}"
        bench[f"graph/{key}"] = decode_stats(cfg, samples[0])
        print("graph", key, bench[f"graph/{key}"], flush=True)
    gen._decode = {}
    gen.decoder, gen._decode = saved_decoder, saved_graphs
    backend.engine = "fused"
    torch.cuda.empty_cache()
    report["decode_bench"] = bench
    save("decode_bench")

    # (4) per-kernel timings over launch shapes: graph of the kernel over all 16 layers, per launch
    if not args.skip_launch_sweep:
        H, L = 2048, 16
        with torch.inference_mode():
            gen.cache.reset()
        variants = {"default": FusedLaunch()}
        for name, change in [("qkv8", {"qkv_rows": 8}), ("qkv32", {"qkv_rows": 32}), ("k128", {"block_k": 128}),
                             ("k512", {"block_k": 512}), ("w8", {"num_warps": 8}), ("exp8", {"expert_rows": 8}),
                             ("exp32", {"expert_rows": 32}), ("down4", {"down_rows": 4}), ("down16", {"down_rows": 16}),
                             ("dk512", {"down_k": 512}), ("dk1024", {"down_k": 1024}), ("chunk128", {"attn_chunk": 128}),
                             ("o4", {"o_rows": 4}), ("o16", {"o_rows": 16}), ("head16", {"head_rows": 16}),
                             ("head64", {"head_rows": 64})]:
            variants[name] = replace(FusedLaunch(), **change)
        sweep = {}
        for name, launch in variants.items():
            if time.perf_counter() - t0 > args.deadline_s:
                print("deadline: launch sweep cut", flush=True)
                break
            fd = FusedDecoder(lm, gen.cache, gen.step_ids, backend.graph_cache_len, launch=launch)
            fd.x.normal_()
            fd.router_logits.normal_()
            fd.xn.normal_()
            fd.attn.normal_()
            res = {}
            with torch.inference_mode():
                for ctx in (300, 2000):
                    fd.start(ctx)
                    res[f"attn_ctx{ctx}_us"] = 1000 * graph_ms(lambda: [
                        (fd.k.qk_rope[(1,)](fd.qkv, fd.layers[i].self_attn.q_norm.weight, fd.layers[i].self_attn.k_norm.weight,
                                            fd.cos, fd.sin, fd.pos, fd.q, *fd._kv(i), 1e-5, fd._kv(i)[0].stride(1),
                                            fd._kv(i)[0].stride(2), NH=16, HD=128, num_warps=launch.num_warps),
                         fd.k.attn_split[(16, fd.nsplit)](fd.q, *fd._kv(i), fd.pos, fd.m, fd.l, fd.acc, 0.088, fd._kv(i)[0].stride(1),
                                                          fd._kv(i)[0].stride(2), HD=128, CHUNK=launch.attn_chunk,
                                                          BLOCK_S=min(launch.attn_block, launch.attn_chunk), NSPLIT=fd.nsplit,
                                                          num_warps=launch.num_warps),
                         fd.k.attn_combine[(16,)](fd.m, fd.l, fd.acc, fd.pos, fd.attn, HD=128, CHUNK=launch.attn_chunk,
                                                  NSPLIT=fd.nsplit, NSPLIT_P2=max(2, 1 << (fd.nsplit - 1).bit_length()),
                                                  num_warps=launch.num_warps)) for i in range(L)]) / L
                res["qkv_us"] = 1000 * graph_ms(lambda: [fd._gemv(fd.x, fd.qkv_w[i], fd.qkv, launch.qkv_rows,
                                                                   norm=fd.layers[i].input_layernorm) for i in range(L)]) / L
                res["o_us"] = 1000 * graph_ms(lambda: [fd._gemv(fd.attn, fd.layers[i].self_attn.o_proj.weight, fd.xn,
                                                                 launch.o_rows, residual=fd.xn) for i in range(L)]) / L
                res["router_us"] = 1000 * graph_ms(lambda: [fd._gemv(fd.x, fd.layers[i].mlp.gate.weight, fd.router_logits,
                                                                      launch.router_rows, norm=fd.layers[i].post_attention_layernorm,
                                                                      xn=fd.qkv) for i in range(L)]) / L
                for top_k in (4, 8, 12):
                    def moe(top_k: int = top_k) -> None:
                        for i in range(L):
                            gu, dn = fd.experts[i]
                            rows = launch.expert_rows
                            fd.k.moe_gate_up[(top_k * (1024 // rows),)](fd.router_logits, fd.xn, gu, fd.act, fd.topi, fd.topw,
                                                                        E=64, K=H, I=1024, TOP_K=top_k, BLOCK_I=rows,
                                                                        BLOCK_K=launch.block_k, num_warps=launch.num_warps)
                            fd.k.moe_down[(H // launch.down_rows,)](fd.act, dn, fd.topi, fd.topw, fd.attn, H=H, I=1024, TOP_K=top_k,
                                                                    BLOCK_H=launch.down_rows, BLOCK_I=launch.down_k,
                                                                    num_warps=launch.num_warps)
                    res[f"moe_k{top_k}_us"] = 1000 * graph_ms(moe) / L
                    res[f"moe_k{top_k}_gbs"] = top_k * 3 * H * 1024 * 2 / (res[f"moe_k{top_k}_us"] * 1e3)
                res["head_us"] = 1000 * graph_ms(lambda: fd._gemv(fd.x, lm.lm_head.weight, fd.logits, launch.head_rows,
                                                                   norm=lm.model.norm))
                res["qkv_gbs"] = 3 * H * H * 2 / (res["qkv_us"] * 1e3)
                res["head_gbs"] = lm.lm_head.weight.numel() * 2 / (res["head_us"] * 1e3)
                for cfg in (space.full(), space.minimal()):
                    blocks = backend.blocks_for(cfg)
                    fd.start(400)
                    res[f"step_{cfg.key}_ms"] = graph_ms(lambda: (fd.forward_token(cfg.top_k, blocks), fd.pos.fill_(400)))
            sweep[name] = {k: round(v, 2) for k, v in res.items()}
            print(name, sweep[name], flush=True)
            del fd
            torch.cuda.empty_cache()
        report["launch_sweep"] = {"launches": {k: asdict(v) for k, v in variants.items()}, "results": sweep}
        save("launch_sweep")
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
