"""Entry point `train_base_model`: elastic training of the embedded base MoE VLM on the synthetic VQA suite
(knobs sampled per batch), registered as `base-vlm`; `champion` moves only when it is better. `-P
from_checkpoint=DIR` scores and registers an existing checkpoint instead (e.g. one trained without MLflow)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import mlflow
import torch

from core.vlm.base_vlm import BaseVLM, space_for
from core.vlm.elastic_training import (KNOB_WEIGHT_FIELDS, TRAINING_KEYS, VALIDATION_KEYS, ElasticTrainConfig, export_trained, exported_training,
                                       recorded_history, train_base_vlm, validation_samples, validation_scores)
from core.vqa.sample import samples_frame
from core.vqa.suite import DATASETS, load_mixed_split, load_split
from tracking.artifacts import log_dataset_input, log_json
from tracking.cli import ParameterError, config_from_params, number_list
from tracking.entry_point import EntryPoint, EpochHook
from tracking.epoch_logging import EpochLogger, epoch_callback
from tracking.pyfunc_models import log_base_vlm
from tracking.registry import Promotion, promote_if_better
from tracking.run_context import set_data_digest
from tracking.store import ADAPTIVE_VLM_STUDY

# The registered (= last epoch's) weights' val VQA score at the full config, as recorded when they were trained
# (the same weights get the same figure in every run that registers them); not the per-epoch curve's name.
PROMOTION = Promotion("base-vlm", metric="final_val_vqa_score_full", mode="max")
_D = ElasticTrainConfig()  # the training defaults live in core


@dataclass
class Params:
    """Train (or register) the base VLM."""

    seed: int = _D.seed  # data, initialisation and knob draws
    epochs: int = _D.epochs
    batch_size: int = _D.batch_size
    lr: float = _D.lr  # peak learning rate (warm-up, then cosine decay)
    train_samples_per_dataset: int = _D.train_samples_per_dataset
    val_samples_per_dataset: int = _D.val_samples_per_dataset
    tier_weights: str = ",".join(map(str, _D.tier_weights))  # per-batch sampling weights of the tiers low,medium,high
    top_k_weights: str = ",".join(map(str, _D.top_k_weights))  # of the top_k options, ascending (last = full config)
    block_weights: str = ",".join(map(str, _D.block_weights))  # of the active-block options, ascending (last = all)
    reader_word_steps: int = _D.reader_word_steps  # stage 1a: region reader on the sign words alone
    reader_steps: int = _D.reader_steps  # stage 1b: region reader on every data set
    reader_weight: float = _D.reader_weight  # stage 2: reader loss beside the answer loss
    qa_pairs_per_image: int = _D.qa_pairs_per_image  # questions about one image per training sequence
    warmup_steps: int = _D.warmup_steps  # linear warm-up of the learning rate
    full_model_fraction: float = _D.full_model_fraction  # first share of steps at all blocks (only the tier varies)
    router_entropy_coef: float = _D.model.router_entropy_coef  # bonus on the router's entropy (keeps top_k costly)
    init_from: str = ""  # start from this training checkpoint directory (fine-tuning; stage 1 skipped)
    device: str = _D.device  # cpu or cuda[:N]
    num_threads: int = 2  # torch intra-op threads
    checkpoint_dir: str = "outputs/base_vlm_training"  # per-epoch checkpoints; a rerun resumes from here
    output_dir: str = ""  # also export the trained checkpoint here, with its history (e.g. data/base_vlm)
    from_checkpoint: str = ""  # score and register this checkpoint directory instead of training
    register: bool = True  # register the model under model_name
    model_name: str = PROMOTION.model_name


def prepare(params: Params) -> ElasticTrainConfig:
    config = config_from_params(ElasticTrainConfig, params, init_from=params.init_from or None,
                                model=replace(_D.model, router_entropy_coef=params.router_entropy_coef),
                                **{name: number_list(getattr(params, name), name) for name in KNOB_WEIGHT_FIELDS})
    config.validate()
    if params.from_checkpoint and not (Path(params.from_checkpoint) / "base_vlm_config.json").is_file():
        raise FileNotFoundError(f"from_checkpoint={params.from_checkpoint}: no base_vlm_config.json (not a base-VLM checkpoint)")
    if params.from_checkpoint and params.output_dir:
        raise ParameterError("output_dir: from_checkpoint registers a checkpoint that is already in a directory")
    if not params.from_checkpoint and params.epochs < 1:
        raise ParameterError(f"epochs must be >= 1 to train (0 only with from_checkpoint), got {params.epochs}")
    return config


def execute(params: Params, config: ElasticTrainConfig, epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    """Train (resuming) or load `from_checkpoint`, log every epoch (also those recorded elsewhere: on a
    machine without MLflow, or before a resume), then log the model, register it and promote it if better."""
    torch.set_num_threads(params.num_threads)
    for split, context, n in (("train", "training", params.train_samples_per_dataset), ("val", "validation", params.val_samples_per_dataset)):
        log_dataset_input(samples_frame(load_mixed_split(DATASETS, split, n, params.seed)), f"synthetic-vqa-{split}",
                          context, {"generator": "core.vqa.suite.load_split", "seed": str(params.seed)})
    set_data_digest(f"vqa-suite-seed{params.seed}")
    recorded, recorded_config = (exported_training(params.from_checkpoint) if params.from_checkpoint
                                 else (recorded_history(params.checkpoint_dir), config.to_dict()))
    logger = EpochLogger(TRAINING_KEYS, VALIDATION_KEYS, flush_every=1)
    replay, on_epoch = epoch_callback(logger), epoch_callback(logger, epoch_hook)
    try:
        for record in recorded:
            replay(record["epoch"], record)
        if params.from_checkpoint:  # scored afresh on this run's val samples
            model, history = BaseVLM.load_pretrained(params.from_checkpoint, params.device), recorded
            scores = validation_scores(model, validation_samples(config), space_for(model.config))
            mlflow.log_metrics(scores)
            mlflow.set_tag("checkpoint_source", str(Path(params.from_checkpoint).resolve()))
        else:
            model, history = train_base_vlm(config, on_epoch=lambda r: on_epoch(r["epoch"], r),
                                            checkpoint_dir=Path(params.checkpoint_dir), resume=True)
            scores = {k: v for k, v in history[-1].items() if k.startswith("val_vqa_score")}
    finally:
        logger.close()
    if recorded_config is not None:
        log_json(recorded_config, "training_config.json")
    final = {PROMOTION.metric: (history or [scores])[-1]["val_vqa_score_full"], "checkpoint_mb": model.parameter_mib}
    mlflow.log_metrics(final)
    if params.output_dir:  # with what `from_checkpoint` logs when this copy is registered elsewhere
        export_trained(model, history, config, params.output_dir)
    version = log_base_vlm(model, load_split(DATASETS[0], "test", 1, params.seed)[0], source_dir=params.from_checkpoint,
                           registered_model_name=params.model_name if params.register else None, promotion=PROMOTION)
    outcome = promote_if_better(params.model_name, str(version), PROMOTION) if version is not None else "not registered"
    mlflow.set_tag("registry_outcome", outcome)
    return {**scores, **final, "registry_outcome": outcome, **({"registered_version": version} if version else {})}


def summary(params: Params, o: Mapping[str, Any]) -> str:
    return f"val VQA full {o['val_vqa_score_full']:.3f}, min {o['val_vqa_score_min']:.3f}; {o['registry_outcome']}"


ENTRY_POINT = EntryPoint("train_base_model", Params, study=ADAPTIVE_VLM_STUDY, execute=execute, summary=summary, prepare=prepare, promotion=PROMOTION)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
