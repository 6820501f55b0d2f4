"""Entry point `train_base_model`: elastic training of the embedded base MoE VLM on the synthetic VQA
suite (knobs sampled per batch), registered as `base-vlm`; `champion` moves only when it is better.

With `-P from_checkpoint=DIR` it trains nothing: it scores and registers an existing checkpoint
(the committed one, for a demo without training).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch

from core.vlm.base_vlm import DROP_ORDER_FILE, BaseVLM, BaseVLMBackend
from core.vlm.elastic_training import ElasticTrainConfig, evaluate_val, recorded_history, train_base_vlm
from core.knobs import TIERS
from core.vqa.suite import DATASETS, load_split
from tracking.artifacts import log_dataset_input, log_json
from tracking.cli import exit_on_input_error, parse_params, params_as_dict
from tracking.epoch_logging import EpochLogger
from tracking.model_refs import BASE_VLM_ARTIFACT
from tracking.models import log_pyfunc_model
from tracking.pyfunc_models import BaseVLMPyfunc, encode_image
from tracking.registry import RegistryError, promote
from tracking.run_context import entry_point_run, set_data_digest

MODEL_NAME = "base-vlm"
PROMOTION_METRIC = "val_vqa_score_full"


@dataclass
class Params:
    """Train (or register) the base VLM."""

    seed: int = 0
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    train_samples_per_dataset: int = 8000
    val_samples_per_dataset: int = 100
    p_full: float = 0.3
    p_min: float = 0.1
    reader_word_steps: int = 400  # stage 1a: region reader on the sign words alone
    reader_steps: int = 1600  # stage 1b: region reader on every data set
    reader_weight: float = 1.0  # stage 2: reader loss beside the answer loss
    qa_pairs_per_image: int = 8  # questions about one image per training sequence (all a count image has)
    device: str = "cpu"
    num_threads: int = 2
    checkpoint_dir: str = "outputs/base_vlm_training"  # per-epoch checkpoints; a rerun resumes from here
    output_dir: str = ""  # also copy the final checkpoint here (e.g. data/base_vlm)
    from_checkpoint: str = ""  # score and register this checkpoint directory instead of training
    register: bool = True
    model_name: str = MODEL_NAME


TRAINING_COLUMNS = ("train_loss", "train_ce", "train_aux", "train_reader", "lr", "samples_per_s", "epoch_time_s")
VALIDATION_COLUMNS = (
    "val_vqa_score_full", "val_vqa_score_min", *(f"val_vqa_score_{d}" for d in DATASETS),
    *(f"val_reader_{g}_{t}" for g in ("word", "color", "shape") for t in TIERS),
)


def _split_frame(split: str, n: int, seed: int) -> pd.DataFrame:
    rows = [{"sample_id": s.sample_id, "dataset": s.dataset, "question": s.question, "answers": "|".join(s.answers)}
            for d in DATASETS for s in load_split(d, split, n, seed)]
    return pd.DataFrame(rows)


def log_recorded_training(directory: Path) -> None:
    """Per-epoch metrics and config of the run that trained a checkpoint elsewhere (a GPU machine
    without MLflow, `scripts/train_base_vlm_device.py`), from the history.json and
    training_config.json saved beside it."""
    history_file, config_file = directory / "history.json", directory / "training_config.json"
    if history_file.is_file():
        logger = EpochLogger(TRAINING_COLUMNS, VALIDATION_COLUMNS, flush_every=1_000)
        for record in json.loads(history_file.read_text()):
            logger.log(record["epoch"], {k: v for k, v in record.items() if k != "epoch"})
        logger.close()
        mlflow.set_tag("training_history", "recorded with the checkpoint")
    if config_file.is_file():
        log_json(json.loads(config_file.read_text()), "training_config.json")


def validate(params: Params) -> None:
    for name in ("epochs", "batch_size", "train_samples_per_dataset", "val_samples_per_dataset"):
        if getattr(params, name) < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be positive, got {getattr(params, name)}")
    if params.from_checkpoint and not (Path(params.from_checkpoint) / "base_vlm_config.json").is_file():
        raise FileNotFoundError(f"from_checkpoint={params.from_checkpoint}: no base-VLM checkpoint (base_vlm_config.json) there")
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={params.device!r} but no CUDA device is available")


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="train_base_model")
    validate(params)
    torch.set_num_threads(params.num_threads)
    with entry_point_run("train_base_model", params_as_dict(params)) as run:
        source = {"generator": "core.vqa.suite.load_split", "seed": str(params.seed)}
        train_frame = _split_frame("train", params.train_samples_per_dataset, params.seed)
        val_frame = _split_frame("val", params.val_samples_per_dataset, params.seed)
        log_dataset_input(train_frame, "synthetic-vqa-train", "training", source)
        log_dataset_input(val_frame, "synthetic-vqa-val", "validation", source)
        set_data_digest(f"vqa-suite-seed{params.seed}")
        config = ElasticTrainConfig(
            seed=params.seed, epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
            train_samples_per_dataset=params.train_samples_per_dataset,
            val_samples_per_dataset=params.val_samples_per_dataset, p_full=params.p_full, p_min=params.p_min,
            reader_word_steps=params.reader_word_steps, reader_steps=params.reader_steps,
            reader_weight=params.reader_weight, qa_pairs_per_image=params.qa_pairs_per_image,
            num_threads=params.num_threads, device=params.device,
        )
        if params.from_checkpoint:
            model = BaseVLM.load_pretrained(params.from_checkpoint, params.device)
            space = BaseVLMBackend(model).space
            val = [s for d in DATASETS for s in load_split(d, "val", params.val_samples_per_dataset, params.seed)]
            full, minimal = evaluate_val(model, val, space.full(), space), evaluate_val(model, val, space.minimal(), space)
            final = {"val_vqa_score_full": full["mean"], "val_vqa_score_min": minimal["mean"],
                     **{f"val_vqa_score_{d}": full[d] for d in DATASETS}}
            log_recorded_training(Path(params.from_checkpoint))
            mlflow.log_metrics(final)
            mlflow.set_tag("checkpoint_source", str(Path(params.from_checkpoint).resolve()))
        else:
            logger = EpochLogger(TRAINING_COLUMNS, VALIDATION_COLUMNS, flush_every=1)
            checkpoint_dir = Path(params.checkpoint_dir)
            for record in recorded_history(checkpoint_dir):  # a resumed run shows the epochs it did not run itself
                logger.log(record["epoch"], {k: v for k, v in record.items() if k != "epoch"})
            try:
                model, history = train_base_vlm(
                    config, on_epoch=lambda r: logger.log(r["epoch"], {k: v for k, v in r.items() if k != "epoch"}),
                    checkpoint_dir=checkpoint_dir, resume=True,
                )
            finally:
                logger.close()
            final = {k: v for k, v in history[-1].items() if k.startswith("val_")}
            log_json(config.to_dict(), "training_config.json")
        mlflow.log_metric("checkpoint_mb", sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)

        # The checkpoint directory travels inside the pyfunc model.
        staging = Path(params.checkpoint_dir) / BASE_VLM_ARTIFACT  # pyfunc artifacts keep the directory name
        if staging.exists():
            shutil.rmtree(staging)
        model.save_pretrained(staging)
        if params.from_checkpoint and (Path(params.from_checkpoint) / DROP_ORDER_FILE).is_file():
            # the checkpoint's measured drop order travels with it
            shutil.copy(Path(params.from_checkpoint) / DROP_ORDER_FILE, staging / DROP_ORDER_FILE)
        if params.output_dir:
            shutil.copytree(staging, params.output_dir, dirs_exist_ok=True)
            if not params.from_checkpoint:  # what `from_checkpoint` logs when this copy is registered elsewhere
                Path(params.output_dir, "history.json").write_text(json.dumps(history, indent=2))
                Path(params.output_dir, "training_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        backend = BaseVLMBackend(model)
        example = load_split(DATASETS[0], "test", 1, params.seed)[0]
        input_example = pd.DataFrame([{"image": encode_image(example.image), "question": example.question,
                                       "tier": "high", "top_k": backend.space.default_top_k,
                                       "num_active_blocks": backend.space.num_blocks, "max_new_tokens": example.max_new_tokens}])
        pyfunc = BaseVLMPyfunc()
        pyfunc.backend = backend
        output_example = pyfunc.predict(None, input_example)
        info = log_pyfunc_model("model", BaseVLMPyfunc(), {BASE_VLM_ARTIFACT: str(staging)}, input_example, output_example,
                                registered_model_name=params.model_name if params.register else None,
                                extra_requirements=("transformers", "pillow", "safetensors", "tokenizers"),
                                optional_inputs=("tier", "top_k", "num_active_blocks", "max_new_tokens"))
        outcome = "not registered"
        if params.register:
            version = str(info.registered_model_version)
            try:
                result = promote(params.model_name, PROMOTION_METRIC, "max", version=version)
                outcome = f"registered {params.model_name} version {version}, champion -> {result.version}"
            except RegistryError as refused:
                outcome = f"registered {params.model_name} version {version}; champion kept ({refused})"
            mlflow.set_tag("registry_outcome", outcome)
    print(f"train_base_model: val VQA full {final['val_vqa_score_full']:.3f}, min {final['val_vqa_score_min']:.3f}; "
          f"{outcome}; run {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
