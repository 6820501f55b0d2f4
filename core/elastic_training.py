"""Elastic training of the base VLM: one set of weights that answers sensibly at every knob config.

In the spirit of LayerDrop and once-for-all networks, every batch runs under a knob config drawn
afresh: the full config (`p_full` of the batches), the minimal one (`p_min`), or a random
(tier, top_k, block count) with a random subset of middle blocks (first and last always kept).
Drawing random subsets, not only the default drop order, keeps the model usable under whatever
drop order the importance experiment measures later.

Per epoch: train over the mixed train split, score greedy answers on the val split at the full and
the minimal config, call `on_epoch(record)`, and checkpoint (weights + optimizer + history) so a
stopped run resumes from its last finished epoch. Shuffling and knob draws are seeded per epoch,
so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from core.base_vlm import BaseVLM, BaseVLMConfig, apply_knobs, build_base_vlm, space_for, token_boxes
from core.knobs import TIERS, KnobConfig, KnobSpace
from core.vlm_backend import VQASample
from core.vqa_metrics import vqa_score
from core.vqa_suite import DATASETS, VISUAL_WORDS, Annotations, Region, load_split, sample_annotations

STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"
MODEL_SUBDIR = "model"


@dataclass
class ElasticTrainConfig:
    """Everything a training run depends on; defaults are the shipped recipe (~20 min on 2 CPU cores)."""

    seed: int = 0
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    train_samples_per_dataset: int = 4000
    val_samples_per_dataset: int = 100
    datasets: tuple[str, ...] = DATASETS
    p_full: float = 0.3  # share of batches at the full config
    p_min: float = 0.1  # share of batches at the minimal config
    p_default_drop_order: float = 0.5  # random-config batches that drop blocks in the default order
    grounding_weight: float = 0.1  # dense vision-token targets from the generator (see teacher_forced_loss)
    qa_pairs_per_image: int = 4  # questions about one image in one training sequence (its own first)
    full_model_fraction: float = 0.0  # first share of steps: all blocks at the trained top_k, random tier
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's setting
    device: str = "cpu"
    model: BaseVLMConfig = field(default_factory=BaseVLMConfig)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["datasets"] = list(self.datasets)
        return d


@dataclass
class _Example:
    sample: VQASample
    annotations: Annotations  # regions (grounding targets) and all QA pairs of the image


def sample_train_config(
    rng: random.Random, space: KnobSpace, cfg: ElasticTrainConfig, progress: float = 1.0
) -> tuple[KnobConfig, list[int] | None]:
    """Knob config (and drop order; None = the default order) for one training batch.

    `progress` is the share of training done; before `cfg.full_model_fraction` the decoder is trained
    whole (only the tier varies), as once-for-all trains the full network before shrinking it.
    """
    if progress < cfg.full_model_fraction:
        full = space.full()
        return KnobConfig(rng.choice(TIERS), full.top_k, full.num_active_blocks), None
    u = rng.random()
    if u < cfg.p_full:
        return space.full(), None
    if u < cfg.p_full + cfg.p_min:
        return space.minimal(), None
    config = KnobConfig(rng.choice(TIERS), rng.choice(space.top_k_options), rng.choice(space.block_options))
    if rng.random() < cfg.p_default_drop_order:
        return config, None
    order = list(range(1, space.num_blocks - 1))
    rng.shuffle(order)
    return config, order


def _examples(samples: Sequence[VQASample], seed: int) -> list[_Example]:
    return [_Example(s, sample_annotations(s.sample_id, seed)) for s in samples]


def grounding_targets(
    regions: Sequence[Region], boxes: torch.Tensor, words: Sequence[str], min_overlap: float = 0.2
) -> torch.Tensor:
    """(n_tokens, len(words)) 0/1: a token is labelled with a region's word when they overlap by at
    least `min_overlap` of the smaller of the two areas."""
    target = torch.zeros((boxes.shape[0], len(words)))
    index = {w: i for i, w in enumerate(words)}
    token_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for word, (x0, y0, x1, y1) in regions:
        iw = (boxes[:, 2].clamp(max=x1) - boxes[:, 0].clamp(min=x0)).clamp(min=0)
        ih = (boxes[:, 3].clamp(max=y1) - boxes[:, 1].clamp(min=y0)).clamp(min=0)
        smaller = token_area.clamp(max=(x1 - x0) * (y1 - y0)).clamp(min=1e-6)
        target[iw * ih >= min_overlap * smaller, index[word]] = 1.0
    return target


def collate(
    model: BaseVLM, batch: Sequence[_Example], rng: random.Random, qa_pairs_per_image: int
) -> dict[str, object]:
    """Tensors for `BaseVLM.teacher_forced_loss` from examples whose images share one size (so one
    tiling grid at the active tier): crops, grid, right-padded dialogues of the sample's own question
    plus up to `qa_pairs_per_image - 1` others about the same image, their target masks, and the
    grounding targets of every vision token."""
    crops, grids = zip(*(model.preprocess(e.sample.image) for e in batch))
    if len(set(grids)) != 1 or len({e.sample.image.size for e in batch}) != 1:
        raise ValueError(f"a training batch needs one image size and tiling grid, got {sorted(set(grids))}")
    dialogues = []
    for e in batch:
        own, others = e.annotations.qa_pairs[0], list(e.annotations.qa_pairs[1:])
        rng.shuffle(others)
        dialogues.append(model.dialogue_ids([own] + others[: qa_pairs_per_image - 1]))
    t = max(len(ids) for ids, _ in dialogues)
    text = torch.full((len(batch), t), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.bool)
    for i, (ids, targets) in enumerate(dialogues):
        text[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = torch.tensor(targets)
    boxes = token_boxes(batch[0].sample.image.size, grids[0], model.config)
    return {
        "crops": torch.stack(crops),
        "grid": grids[0],
        "text_ids": text,
        "target_mask": mask,
        "grounding_targets": torch.stack([grounding_targets(e.annotations.regions, boxes, VISUAL_WORDS) for e in batch]),
    }


def _to(batch: dict[str, object], device: torch.device) -> dict[str, object]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate_val(
    model: BaseVLM, samples: Sequence[VQASample], config: KnobConfig, space: KnobSpace
) -> dict[str, float]:
    """Mean VQA score of batched greedy answers under `config`, overall and per data set."""
    model.eval()
    with apply_knobs(model, config, space):
        predictions = model.generate_batch(samples)
    per_ds: dict[str, list[float]] = {}
    for s, p in zip(samples, predictions):
        per_ds.setdefault(s.dataset, []).append(vqa_score(p, s.answers))
    scores = {ds: sum(v) / len(v) for ds, v in per_ds.items()}
    scores["mean"] = sum(scores.values()) / len(scores)  # mean over data sets, as reported
    return scores


def _lr_at(step: int, total: int, cfg: ElasticTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_base_vlm(
    config: ElasticTrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> tuple[BaseVLM, list[dict]]:
    """Train the base VLM elastically; returns (model in eval mode, per-epoch records).

    Each record has epoch, train_loss, train_ce, train_aux, train_grounding, lr, samples_per_s, epoch_time_s,
    val_vqa_score_full, val_vqa_score_min and val_vqa_score_<dataset> (full config), all on the
    val split. With `checkpoint_dir`, every finished epoch is saved there (model/ as
    `save_pretrained` writes it, plus optimizer state and history); with `resume`, training continues
    after the last saved epoch. Exceptions raised by `on_epoch` propagate (after the checkpoint).
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = torch.device(config.device)
    model = build_base_vlm(config.model, seed=config.seed).to(device)
    space = space_for(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict] = []
    start_epoch = 1
    if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / STATE_FILE).is_file():
        state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location=device, weights_only=False)
        if state["config"] != config.to_dict():
            raise ValueError(f"checkpoint in {checkpoint_dir} was written by a different training config")
        model.load_state_dict(BaseVLM.load_pretrained(Path(checkpoint_dir) / MODEL_SUBDIR, device).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
        start_epoch = state["epoch"] + 1

    train = [s for ds in config.datasets for s in load_split(ds, "train", config.train_samples_per_dataset, config.seed)]
    val = [s for ds in config.datasets for s in load_split(ds, "val", config.val_samples_per_dataset, config.seed)]
    examples = _examples(train, config.seed)
    word_ids = torch.tensor(model.tokenizer.convert_tokens_to_ids(list(VISUAL_WORDS)), device=device)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    for epoch in range(start_epoch, config.epochs + 1):
        rng = random.Random(config.seed * 100_003 + epoch)  # per-epoch stream: resume-exact
        order = list(range(len(examples)))
        rng.shuffle(order)
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "grounding": 0.0}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", leave=False)
        for i in bar:
            step = (epoch - 1) * steps_per_epoch + i
            batch = [examples[j] for j in order[i * config.batch_size : (i + 1) * config.batch_size]]
            knob, drop_order = sample_train_config(rng, space, config, step / total_steps)
            lr = _lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with apply_knobs(model, knob, space, drop_order):
                parts = model.teacher_forced_loss(
                    **_to(collate(model, batch, rng, config.qa_pairs_per_image), device),
                    grounding_word_ids=word_ids,
                    grounding_weight=config.grounding_weight,
                )
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            sums["loss"] += parts.total.item()
            sums["ce"] += parts.answer_ce.item()
            sums["aux"] += parts.router_aux.item()
            sums["grounding"] += parts.grounding.item()
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}", knob=knob.key)
        elapsed = time.perf_counter() - t0
        full = evaluate_val(model, val, space.full(), space)
        minimal = evaluate_val(model, val, space.minimal(), space)
        record: dict = {
            "epoch": epoch,
            "train_loss": sums["loss"] / steps_per_epoch,
            "train_ce": sums["ce"] / steps_per_epoch,
            "train_aux": sums["aux"] / steps_per_epoch,
            "train_grounding": sums["grounding"] / steps_per_epoch,
            "lr": lr,
            "epoch_time_s": elapsed,
            "samples_per_s": len(examples) / elapsed,
            "val_vqa_score_full": full["mean"],
            "val_vqa_score_min": minimal["mean"],
        }
        record.update({f"val_vqa_score_{ds}": full[ds] for ds in config.datasets})
        history.append(record)
        if checkpoint_dir is not None:
            save_checkpoint(model, optimizer, history, epoch, config, Path(checkpoint_dir))
        if on_epoch is not None:
            on_epoch(record)
    model.eval()
    return model, history


def save_checkpoint(
    model: BaseVLM, optimizer: torch.optim.Optimizer, history: list[dict], epoch: int, config: ElasticTrainConfig, directory: Path
) -> None:
    """Model files under directory/model, optimizer + history in training_state.pt (written last, atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / MODEL_SUBDIR)
    (directory / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "history": history, "config": config.to_dict()}, tmp)
    tmp.replace(directory / STATE_FILE)
