"""The figures of a fused-engine GPU table's README, from its files alone (runs on a CPU).

  python scripts/fused_table_report.py data/profiles/h100-molmoe-arch-fused

Reads the table (latency_probe_out8), summary.json (copy bandwidth measured in the same run, host share
of vision) and prints: run-to-run CVs, the per-knob table (paired medians), each config's decode per
token against its bandwidth floor, the realised-vs-theory decode savings of top_k 8 -> 4 and blocks
16 -> 8, decode growth with the context, and vision per tier step against the ViT's FLOP ratio.
Writes report.json beside the table.

No MLflow: core only.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.knobs import MOLMOE_SPACE  # noqa: E402
from core.profiling.floors import decode_floor_ms, realised_vs_theory  # noqa: E402
from core.profiling.summaries import knob_step_effects, median_run_to_run_cv  # noqa: E402
from core.vlm.molmoe_arch import SIZE_PRESETS  # noqa: E402

COMPONENTS = ("T_vision_ms", "T_prefill_ms", "T_decode_per_token_ms", "T_total_ms")


def olmoe_sizes() -> SimpleNamespace:
    d = SIZE_PRESETS["reference"]
    return SimpleNamespace(hidden_size=d.d_model, num_experts=d.num_experts, intermediate_size=d.expert_intermediate,
                           num_attention_heads=d.num_heads, num_key_value_heads=d.num_heads, vocab_size=d.vocab_size)


def main() -> None:
    root = Path(sys.argv[1])
    df = pd.read_parquet(root / "latency_probe_out8")
    summary = json.loads((root / "summary.json").read_text())
    bw = statistics.median(summary["copy_bandwidth_gbs"])
    floor = decode_floor_ms(df, olmoe_sizes(), bw)
    df = df.assign(floor_ms=floor, ratio=df["T_decode_per_token_ms"] / floor)
    out: dict[str, object] = {"rows": len(df), "copy_bandwidth_gbs": bw,
                              "cv": {k: round(float(v), 5) for k, v in median_run_to_run_cv(df, COMPONENTS).items()}}
    print(f"{len(df)} rows, copy bandwidth {bw:.0f} GB/s; median run-to-run CV: {out['cv']}")

    steps = {c: knob_step_effects(df, c).set_index(["knob", "step"])["delta_ms"] for c in COMPONENTS}
    table = pd.DataFrame(steps)
    out["knob_steps"] = {f"{k} {s}": {c: round(float(v), 3) for c, v in r.items()} for (k, s), r in table.iterrows()}
    print("| knob step | T_vision | T_prefill | T_decode per token | T_total (8 tokens) |\n|---|---|---|---|---|")
    for (knob, step), r in table.iterrows():
        print(f"| {knob} {step} | {r.T_vision_ms:+.2f} | {r.T_prefill_ms:+.2f} | {r.T_decode_per_token_ms:+.3f} | {r.T_total_ms:+.2f} |")

    per_config = df.groupby(["tier", "top_k", "num_active_blocks"]).agg(
        decode_ms=("T_decode_per_token_ms", "median"), floor_ms=("floor_ms", "median"), ratio=("ratio", "median"),
        total_ms=("T_total_ms", "median"))
    full, fastest = MOLMOE_SPACE.full(), MOLMOE_SPACE.minimal()
    pick = lambda c: per_config.loc[(c.tier, c.top_k, c.num_active_blocks)]  # noqa: E731
    out["full"] = {k: round(float(v), 4) for k, v in pick(full).items()}
    out["fastest"] = {k: round(float(v), 4) for k, v in pick(fastest).items()}
    out["ratio_range"] = [round(float(per_config["ratio"].min()), 2), round(float(per_config["ratio"].max()), 2)]
    out["total_range_ms"] = [round(float(per_config["total_ms"].min()), 1), round(float(per_config["total_ms"].max()), 1)]
    print(f"full {full.key}: {out['full']}\nfastest {fastest.key}: {out['fastest']}\nratio to floor over the 75 configs: "
          f"{out['ratio_range']}; median T_total per config {out['total_range_ms']} ms")

    savings = {"top_k 8->4": realised_vs_theory(df, floor, "top_k", 8, 4),
               "blocks 16->8": realised_vs_theory(df, floor, "num_active_blocks", 16, 8)}
    for blocks in (8, 16):
        savings[f"top_k 8->4 at {blocks} blocks"] = realised_vs_theory(
            df[df["num_active_blocks"] == blocks], floor[df["num_active_blocks"] == blocks], "top_k", 8, 4)
    for k in (4, 12):
        savings[f"blocks 16->8 at top_k {k}"] = realised_vs_theory(df[df["top_k"] == k], floor[df["top_k"] == k],
                                                                  "num_active_blocks", 16, 8)
    savings["tier low->high (context)"] = realised_vs_theory(df, floor, "tier", "high", "low")
    out["savings"] = {k: {a: round(b, 4) for a, b in v.items()} for k, v in savings.items()}
    for k, v in out["savings"].items():
        print(f"saving {k}: realised {v['realised_ms']:.4f} ms, theory {v['theory_ms']:.4f} ms, share {v['realised_share']:.2f} (n={v['pairs']})")

    # Vision against the ViT's FLOPs, which are linear in the crops it encodes (tiles + the global view).
    vis = df.groupby(["sample_id", "tier"]).agg(crops=("crops", "first"), vision=("T_vision_ms", "median")).reset_index()
    wide = vis.pivot(index="sample_id", columns="tier", values=["crops", "vision"])
    steps_out = []
    for grid, part in wide.groupby([wide[("crops", t)] for t in ("low", "medium", "high")]):
        row = {"crops (low/medium/high)": "/".join(str(int(c)) for c in grid)}
        for a, b in (("low", "medium"), ("medium", "high")):
            flop = (part[("crops", b)].iloc[0] + 1) / (part[("crops", a)].iloc[0] + 1)
            measured = float((part[("vision", b)] / part[("vision", a)]).median())
            row[f"{a}->{b}"] = {"flop_ratio": round(float(flop), 3), "measured_ratio": round(measured, 3),
                                "off": round(float(measured / flop - 1), 3)}
        row["vision_ms"] = [round(float(part[("vision", t)].median()), 3) for t in ("low", "medium", "high")]
        steps_out.append(row)
    slope, intercept = np.polyfit(df["crops"] + 1, df["T_vision_ms"], 1)
    out["vision_tier_steps"] = steps_out
    out["vision_fit"] = {"ms_per_crop": round(float(slope), 4), "fixed_ms": round(float(intercept), 4)}
    out["vision_host_ms"] = summary.get("vision_host_ms", {})
    for row in steps_out:
        print("vision", row)
    print(f"vision = {intercept:.3f} ms + {slope:.3f} ms x (crops + 1); host share median "
          f"{out['vision_host_ms'].get('median_ms')} ms (p95 {out['vision_host_ms'].get('p95_ms')})")
    (root / "report.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
