"""GPU check of the MolmoE-1B release mapping: a randomly initialised molmoe_arch backend at the reference
(MolmoE-1B) dims is written as a release-layout checkpoint directory (config.json, bf16 safetensors shards
with model.safetensors.index.json, a word-level tokenizer.json), loaded into a fresh backend by
`core.vlm.molmoe_checkpoint.load_molmoe_checkpoint`, and both answer the same requests greedily under each
engine: the tokens must be identical, and so must the logits of one prefill on the same embeddings.

Prints one line per engine and writes --out/checkpoint_roundtrip.json; exits 1 on any mismatch.

  python scripts/gpu_checkpoint_roundtrip.py --out $OUT                                  # H100: reference dims, bf16
  python scripts/gpu_checkpoint_roundtrip.py --size tiny --device cpu --out /tmp/rt      # CPU smoke test

The full-size checkpoint takes ~14 GB of disk (--checkpoint-dir, a temporary directory by default, removed
afterwards unless --keep-checkpoint) and the two backends ~28 GB of GPU memory. No MLflow: core only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.knobs import KnobConfig  # noqa: E402
from core.vlm.molmoe_arch import MolmoeArchBackend, synthetic_latency_samples  # noqa: E402
from core.vlm.molmoe_checkpoint import (  # noqa: E402
    load_molmoe_checkpoint, write_release_checkpoint, write_word_level_tokenizer,
)


def prefill_logits(backend: MolmoeArchBackend, pixels: torch.Tensor, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        vision = backend.vision(pixels).reshape(1, -1, backend.dims.d_model)
        text = backend.lm.get_input_embeddings()(torch.tensor([ids], device=backend.device))
        return backend.lm(inputs_embeds=torch.cat([vision, text], dim=1), logits_to_keep=1).logits.float()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="reference", choices=["reference", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--engines", default="eager,graph", help="comma-separated molmoe_arch engines")
    p.add_argument("--requests", type=int, default=6, help="requests per engine (configs cycle over the grid's corners)")
    p.add_argument("--new-tokens", type=int, default=8, help="forced answer length (random weights never stop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default="", help="where the release-layout checkpoint is written (default: a temp dir)")
    p.add_argument("--keep-checkpoint", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: device={args.device!r} but no CUDA device is available", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(tempfile.mkdtemp(prefix="molmoe-release-"))
    started = time.perf_counter()

    source = MolmoeArchBackend(size=args.size, device=args.device, seed=args.seed)
    write_release_checkpoint(source, workdir, dtype=torch.bfloat16)
    write_word_level_tokenizer(workdir / "tokenizer.json", source.dims.text_vocab)
    written_s = time.perf_counter() - started
    loaded = load_molmoe_checkpoint(workdir, device=args.device)
    loaded_s = time.perf_counter() - started - written_s
    if source.dtype != torch.bfloat16:  # fp32 on a CPU: the source must hold what the bf16 files hold
        with torch.no_grad():
            for module in (source.lm, source.vision):
                for param in module.parameters():
                    param.copy_(param.to(torch.bfloat16).to(param.dtype))
    source.tokenizer, source.eos_token_id = loaded.tokenizer, loaded.eos_token_id  # the same prompt ids

    space = source.space
    configs = [space.full(), space.minimal(), KnobConfig("medium", 6, 12), KnobConfig("low", 10, 14)]
    samples = synthetic_latency_samples([8, 32], [(640, 480), (336, 336), (500, 900)], n=args.requests,
                                        max_new_tokens=args.new_tokens, seed=args.seed)
    torch.manual_seed(args.seed)
    pixels = torch.randn(2, 3, source.dims.image_size, source.dims.image_size).to(source.device, source.dtype)
    logit_diff = (prefill_logits(source, pixels, [5, 9, 17]) - prefill_logits(loaded, pixels, [5, 9, 17])).abs().max()

    summary: dict[str, object] = {
        "size": args.size, "device": str(source.device), "dtype": str(source.dtype),
        "gpu": torch.cuda.get_device_name(source.device) if source.device.type == "cuda" else platform.processor(),
        "checkpoint_files": sorted(p.name for p in workdir.iterdir()), "write_s": round(written_s, 1),
        "load_s": round(loaded_s, 1), "prefill_logits_max_abs_diff": float(logit_diff), "engines": {},
    }
    ok = float(logit_diff) == 0.0
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        source.engine = loaded.engine = engine
        same, mismatches = 0, []
        for i, sample in enumerate(samples):
            config = configs[i % len(configs)]
            a = source.answer(sample, config, force_output_tokens=args.new_tokens)
            b = loaded.answer(sample, config, force_output_tokens=args.new_tokens)
            if (a.text, a.output_tokens, a.vision_tokens) == (b.text, b.output_tokens, b.vision_tokens):
                same += 1
            else:
                mismatches.append({"sample_id": sample.sample_id, "config": config.key, "source": a.text, "loaded": b.text})
        ok &= same == len(samples)
        summary["engines"][engine] = {"requests": len(samples), "same_tokens": same, "mismatches": mismatches}
        print(f"{engine}: {same}/{len(samples)} requests gave the same {args.new_tokens} greedy tokens "
              f"(source vs loaded from {workdir.name}); prefill logits max |diff| {float(logit_diff):.3g}")
    summary["ok"] = bool(ok)
    (out / "checkpoint_roundtrip.json").write_text(json.dumps(summary, indent=1))
    if not args.keep_checkpoint and not args.checkpoint_dir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'OK' if ok else 'MISMATCH'}: summary in {out / 'checkpoint_roundtrip.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
