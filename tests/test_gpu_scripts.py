"""The device-side scripts (core only, no MLflow) run end to end on a CPU with the tiny molmoe_arch
(and the CPU timing diagnostic with the committed base VLM)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_timing_noise_script_reports_both_schedules(tmp_path: Path):
    out = _run("gpu_timing_noise.py", "--size", "tiny", "--repeats", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "timing_noise.json").read_text())
    assert set(report) >= {"back_to_back", "interleaved"} and len(report["back_to_back"]) == 3
    for stats in report["interleaved"].values():
        total = stats["T_total_ms"]
        assert total["median"] > 0
        # Two repeats: the sample CV (ddof 1, core.timing.coefficient_of_variation) is (max - min) / (sqrt(2) median).
        assert total["cv"] == pytest.approx((total["max"] - total["min"]) / (math.sqrt(2) * total["median"]), abs=2e-4)
    assert "interleaved" in out


def test_timing_noise_script_checks_the_graph_engine_against_eager(tmp_path: Path):
    out = _run("gpu_timing_noise.py", "--size", "tiny", "--repeats", "2", "--engine", "graph", "--compare-eager",
               "--out", str(tmp_path))
    report = json.loads((tmp_path / "timing_noise_graph.json").read_text())
    assert report["engine"] == "graph" and report["one_request_wall_ms"] > 0
    assert report["tokens_match_eager"] == {key: True for key in report["back_to_back"]}
    assert "graph tokens equal eager tokens" in out


def test_cpu_timing_noise_script_reports_burst_and_pass_spread(tmp_path: Path):
    _run("cpu_timing_noise.py", "--items", "3", "--repeats", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "cpu_timing_noise.json").read_text())
    assert (report["items"], report["repeats"], report["passes"]) == (3, 2, 2)
    for stats in report["components"].values():
        assert stats["within_burst_cv"] >= 0 and stats["pass_gap_single"] >= 0 and stats["pass_gap_median_of_repeats"] >= 0
    assert report["components"]["T_total_ms"]["within_burst_cv"] > 0  # real timings: never exactly equal


def test_gpu_profile_script_writes_a_resumable_store(tmp_path: Path):
    args = ("--size", "tiny", "--runs", "1", "--warmup", "0", "--num-shards", "25", "--output-tokens", "2",
            "--prompt-lengths", "4", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"))
    _run("profile_molmoe_arch_gpu.py", *args)
    first = pd.concat([pd.read_parquet(f) for f in (tmp_path / "out").rglob("*.parquet")])
    assert len(first) == 3 and first["output_tokens"].eq(2).all()  # 75 configs / 25 shards, one sample
    _run("profile_molmoe_arch_gpu.py", *args)  # a rerun finds every row stored and adds none
    again = pd.concat([pd.read_parquet(f) for f in (tmp_path / "out").rglob("*.parquet")])
    assert len(again) == len(first)


def test_checkpoint_roundtrip_script_matches_tokens_under_both_engines(tmp_path: Path):
    out = _run("gpu_checkpoint_roundtrip.py", "--size", "tiny", "--device", "cpu", "--requests", "2",
               "--new-tokens", "3", "--out", str(tmp_path))
    report = json.loads((tmp_path / "checkpoint_roundtrip.json").read_text())
    assert report["ok"] and report["prefill_logits_max_abs_diff"] == 0.0
    assert {e: r["same_tokens"] for e, r in report["engines"].items()} == {"eager": 2, "graph": 2}
    assert "config.json" in report["checkpoint_files"] and "tokenizer.json" in report["checkpoint_files"]
    assert out.count("requests gave the same") == 2
