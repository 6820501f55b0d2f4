"""Train the base VLM on a machine without MLflow (a lent GPU), for `train_base_model -P from_checkpoint=`.

The same `core.vlm.elastic_training.train_base_vlm` that the `train_base_model` entry point runs, with
the entry point's recipe defaults; this script only adds what a bare accelerator machine needs: no
tracking store, a wall-clock deadline checked between epochs (the checkpoint directory then resumes
with the same command), and the outputs the entry point's `from_checkpoint` registers:

  <output-dir>/             the checkpoint (`core.vlm.elastic_training.export_trained`), with
  <output-dir>/history.json per-epoch records (logged as per-epoch metrics on registration)
  <output-dir>/training_config.json  the full ElasticTrainConfig
  <output-dir>/knob_curves.csv      test-split accuracy of one knob at a time at each tier
                                    (`core.vlm.evaluation.knob_accuracy_curves`), with --curve-samples > 0

  python3 scripts/train_base_vlm_device.py --device cuda --output-dir $OUT/base_vlm --set epochs=12
  python3 scripts/train_base_vlm_device.py --set epochs=1 --set train_samples_per_dataset=64  # CPU smoke test

No MLflow: core only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.vlm.base_vlm import BaseVLM, BaseVLMBackend, BaseVLMConfig  # noqa: E402
from core.vlm.elastic_training import (  # noqa: E402
    MODEL_SUBDIR, ElasticTrainConfig, export_trained, recorded_history, train_base_vlm,
)
from core.vlm.evaluation import knob_accuracy_curves, knob_costs  # noqa: E402
from core.vqa.suite import load_mixed_split  # noqa: E402


class DeadlineReached(Exception):
    """Raised after an epoch's checkpoint once the wall-clock budget is spent."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint-dir", default="outputs/base_vlm_training")
    p.add_argument("--output-dir", default="outputs/base_vlm")
    p.add_argument("--deadline-s", type=float, default=None, help="stop after the epoch that passes this many seconds")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an ElasticTrainConfig field (JSON value), e.g. --set epochs=12 --set reader_steps=2000")
    p.add_argument("--curve-samples", type=int, default=200,
                   help="test samples per data set for the knob curves after training (0: none)")
    return p.parse_args()


def build_config(assignments: list[str], device: str) -> ElasticTrainConfig:
    """ElasticTrainConfig from `field=json` assignments (`model.FIELD=json` for the architecture);
    an unknown field or bad value names itself."""
    fields = {f.name for f in dataclasses.fields(ElasticTrainConfig)} - {"model"}
    model_fields = {f"model.{f.name}" for f in dataclasses.fields(BaseVLMConfig)}
    values: dict[str, object] = {"device": device}
    model_values: dict[str, object] = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields | model_fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields | model_fields)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        value = tuple(value) if isinstance(value, list) else value
        if name.startswith("model."):
            model_values[name.removeprefix("model.")] = value
        else:
            values[name] = value
    return ElasticTrainConfig(**values, model=BaseVLMConfig(**model_values))


def main() -> int:
    args = parse_args()
    config = build_config(args.set, args.device)
    start = time.perf_counter()

    def report(record: dict) -> None:
        keys = ("train_loss", "train_ce", "train_reader", "train_router_entropy", "val_vqa_score_full", "val_vqa_score_min",
                "val_vqa_score_synth_textvqa", "val_vqa_score_synth_countvqa", "val_vqa_score_synth_attrvqa",
                "val_reader_word_high", "val_reader_shape_high", "epoch_time_s")
        print(f"epoch {record['epoch']}: " + " ".join(f"{k}={record[k]:.3f}" for k in keys if k in record)
              + f" wall={time.perf_counter() - start:.0f}s", flush=True)
        if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s and record["epoch"] < config.epochs:
            raise DeadlineReached

    partial = False
    try:
        model, history = train_base_vlm(config, on_epoch=report, checkpoint_dir=Path(args.checkpoint_dir), resume=True)
    except DeadlineReached:
        # Export what the last epoch left (a partial run's curves still tell recipes apart); the
        # checkpoint directory resumes with the same command.
        print(f"deadline reached: exporting the last epoch; rerun the same command to resume from {args.checkpoint_dir}")
        partial = True
        model = BaseVLM.load_pretrained(Path(args.checkpoint_dir) / MODEL_SUBDIR, config.device).eval()
        history = recorded_history(args.checkpoint_dir)
    out = export_trained(model, history, config, args.output_dir)
    print(f"trained in {time.perf_counter() - start:.0f}s; final {history[-1] if history else {}}; wrote {out}")
    if args.curve_samples > 0:
        test = load_mixed_split(config.datasets, "test", args.curve_samples, config.seed)
        curves = knob_accuracy_curves(BaseVLMBackend(model), test, progress=False)
        curves.to_csv(out / "knob_curves.csv", index=False)
        print(json.dumps({"output": str(out), **knob_costs(curves),
                          **{row["name"]: round(row["vqa_score"], 4) for _, row in curves.iterrows()}}), flush=True)
    return 3 if partial else 0


if __name__ == "__main__":
    sys.exit(main())
