"""Elastic training of the base VLM: one set of weights that answers sensibly at every knob config.

In the spirit of LayerDrop and once-for-all networks, every batch runs under a knob config drawn
afresh: tier, top_k and block count each from their own weights over the knob space's options, and
a random subset of middle blocks (first and last always kept) for part of the reduced-block batches.
Drawing random subsets, not only the default drop order, keeps the model usable under whatever
drop order the importance experiment measures later.

The weights set how much each knob costs. Trained uniformly over every config (an earlier recipe), the
experts and blocks became redundant: top_k 1 and 4 blocks answered as well as the full model, and a
controller had nothing to learn but "the highest tier that fits". MolmoE-1B was trained at its full
config only, and its accuracy falls with every block removed and every expert fewer (its router keeps
the un-renormalised top-k gate weights, as this model's does). The shipped weights train top_k at the
full value only and put a few batches at each reduced block count, so every config stays usable but
pays for what it leaves out.

Two stages. Stage 1 trains the vision side alone with the dense region reader of
`core.vlm.region_reader` (sign words first, then colours and shapes too). Stage 2 trains everything on
the answers (several questions per image), the reader loss beside. Per epoch of stage 2: train over
the mixed train split, score greedy answers on the val split at the full and the minimal config and
the reader at every tier, call `on_epoch(record)`, and checkpoint (weights + reader + optimizer +
history) so a stopped run resumes from its last finished epoch (or from the end of stage 1).
Shuffling and knob draws are seeded per epoch, so a resumed run repeats what an uninterrupted one
would have done, to float rounding.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from core.vlm.base_vlm import BaseVLM, BaseVLMConfig, apply_knobs, build_base_vlm, space_for, token_boxes
from core.knobs import TIERS, KnobConfig, KnobSpace
from core.vlm.region_reader import (
    READER_GROUPS, ReaderTargets, RegionReader, batch_targets, reader_accuracy, reader_loss, token_targets,
)
from core.vqa.sample import VQASample
from core.vqa.metrics import vqa_score
from core.vqa.suite import DATASETS, Annotations, load_mixed_split, sample_annotations

STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"  # per-epoch records, beside a checkpoint (training state and exported copies)
TRAINING_CONFIG_FILE = "training_config.json"  # the full ElasticTrainConfig, beside an exported checkpoint
MODEL_SUBDIR = "model"
# The per-knob sampling weights of ElasticTrainConfig and how many options each weighs.
KNOB_WEIGHT_FIELDS: dict[str, int] = {"tier_weights": 3, "top_k_weights": 5, "block_weights": 5}
# The keys of an epoch record (`train_base_vlm`): training figures, and held-out ones on the val split.
TRAINING_KEYS = ("train_loss", "train_ce", "train_aux", "train_reader", "train_router_entropy", "lr", "samples_per_s", "epoch_time_s")
VALIDATION_KEYS = ("val_vqa_score_full", "val_vqa_score_min", *(f"val_vqa_score_{d}" for d in DATASETS),
                   *(f"val_reader_{group}_{tier}" for group in READER_GROUPS for tier in TIERS))


@dataclass
class ElasticTrainConfig:
    """Everything a training run depends on; defaults are the shipped recipe (~45 min on 2 CPU cores)."""

    seed: int = 0
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    train_samples_per_dataset: int = 8000
    val_samples_per_dataset: int = 100
    datasets: tuple[str, ...] = DATASETS
    # Sampling weights of each knob's options per stage-2 batch, drawn independently: tiers low, medium,
    # high; top_k and block options ascending (the knob space's; the last is the full config's).
    # top_k is trained at the full value only, as MolmoE was: fewer experts then scale the MoE output
    # down (gate weights are not renormalised) and cost what the answer needed from them. Blocks get a
    # few reduced batches, so 4 of 8 blocks stays usable rather than broken (full-only training cost
    # 0.36 of accuracy at 4 blocks after two epochs).
    tier_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    top_k_weights: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 1.0)
    block_weights: tuple[float, ...] = (0.03, 0.03, 0.03, 0.06, 0.85)
    p_default_drop_order: float = 0.5  # reduced-block batches that drop blocks in the default order
    # Stage 1 (as Molmo pre-trains its vision side on dense captions before instruction tuning): the
    # vision tower, projector and layout embedding with the region reader alone, first on the sign
    # words only (`reader_word_steps`, synth_textvqa), then on every data set (`reader_steps`), one
    # data set and tier per batch. Reading must come first: learnt beside colours and shapes from the
    # start, it stalled near chance in a probe, while alone it reached 0.85 within ~300 steps.
    reader_word_steps: int = 400
    reader_steps: int = 1600
    reader_tier_weights: tuple[float, float, float] = (0.15, 0.25, 0.6)  # low, medium, high
    reader_weight: float = 1.0  # stage 2: weight of the reader loss next to the answer loss
    qa_pairs_per_image: int = 8  # questions about one image in one training sequence (its own first)
    full_model_fraction: float = 0.3  # first share of steps: all blocks at the trained top_k, random tier
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's setting
    # Keep every image's crops per tier in memory (~1 GB for the full train split): on a GPU the
    # per-batch Pillow resizing otherwise costs about as much as the step itself.
    cache_crops: bool = False
    # A training checkpoint directory (model/ and training_state.pt, as `save_checkpoint` writes them)
    # whose weights and region reader start this run: stage 1 is skipped, the optimizer starts afresh
    # and the schedule (warm-up, cosine) spans this run's epochs. For fine-tuning a trained model with
    # other knob weights or router settings instead of paying for its whole training again.
    init_from: str | None = None
    device: str = "cpu"
    model: BaseVLMConfig = field(default_factory=BaseVLMConfig)

    def validate(self) -> None:
        """ValueError naming the first field whose value cannot train (or a device this machine lacks)."""
        for name in ("batch_size", "train_samples_per_dataset", "val_samples_per_dataset", "qa_pairs_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "reader_word_steps", "reader_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, options in KNOB_WEIGHT_FIELDS.items():
            weights = getattr(self, name)
            if len(weights) != options or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"{name} must be {options} non-negative weights with a positive sum, got {list(weights)}")
        if not 0 <= self.p_default_drop_order <= 1:
            raise ValueError(f"p_default_drop_order must lie in [0, 1], got {self.p_default_drop_order}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available")

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["datasets"] = list(self.datasets)
        for name in ("reader_tier_weights", "tier_weights", "top_k_weights", "block_weights"):
            d[name] = list(getattr(self, name))
        d["model"]["conv_stem_channels"] = list(self.model.conv_stem_channels)
        return d


@dataclass
class _Example:
    sample: VQASample
    annotations: Annotations  # regions (region-reader targets) and all QA pairs of the image
    views: dict[int, tuple[torch.Tensor, tuple[int, int]]] | None = None  # crops per tier cap, if cached

    def crops(self, model: BaseVLM) -> tuple[torch.Tensor, tuple[int, int]]:
        """`model.preprocess` of the image at the model's current tier cap (memoised when `views` is a dict)."""
        if self.views is None:
            return model.preprocess(self.sample.image)
        if model.max_crops not in self.views:
            self.views[model.max_crops] = model.preprocess(self.sample.image)
        return self.views[model.max_crops]


def sample_train_config(
    rng: random.Random, space: KnobSpace, cfg: ElasticTrainConfig, progress: float = 1.0
) -> tuple[KnobConfig, list[int] | None]:
    """Knob config (and drop order; None = the default order) for one training batch.

    `progress` is the share of training done; before `cfg.full_model_fraction` the decoder is trained
    whole (only the tier varies), as once-for-all trains the full network before shrinking it.
    """
    tier = rng.choices(TIERS, weights=cfg.tier_weights)[0]
    full = space.full()
    if progress < cfg.full_model_fraction:
        return KnobConfig(tier, full.top_k, full.num_active_blocks), None
    top_k = rng.choices(space.top_k_options, weights=cfg.top_k_weights)[0]
    blocks = rng.choices(space.block_options, weights=cfg.block_weights)[0]
    config = KnobConfig(tier, top_k, blocks)
    if blocks == space.num_blocks or rng.random() < cfg.p_default_drop_order:
        return config, None
    order = list(range(1, space.num_blocks - 1))
    rng.shuffle(order)
    return config, order


def _examples(samples: Sequence[VQASample], seed: int, cache_crops: bool = False) -> list[_Example]:
    return [_Example(s, sample_annotations(s.sample_id, seed), {} if cache_crops else None) for s in samples]


def reader_targets(model: BaseVLM, batch: Sequence[_Example], grid: tuple[int, int]) -> ReaderTargets:
    """Region-reader targets of a batch whose images share one size and tiling `grid`; the global
    view's tokens carry no word target (see `core.vlm.region_reader.token_targets`)."""
    boxes = token_boxes(batch[0].sample.image.size, grid, model.config)
    readable = torch.arange(boxes.shape[0]) >= model.config.tokens_per_crop
    return batch_targets([token_targets(e.annotations.regions, boxes, readable) for e in batch])


def collate(
    model: BaseVLM, batch: Sequence[_Example], rng: random.Random, qa_pairs_per_image: int
) -> dict[str, object]:
    """Tensors for `BaseVLM.teacher_forced_loss` from examples whose images share one size (so one
    tiling grid at the active tier): crops, grid, right-padded dialogues of the sample's own question
    plus up to `qa_pairs_per_image - 1` others about the same image, their target masks, and the
    region-reader targets of the vision tokens."""
    crops, grids = zip(*(e.crops(model) for e in batch))
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
    return {
        "crops": torch.stack(crops),
        "grid": grids[0],
        "text_ids": text,
        "target_mask": mask,
        "reader_targets": reader_targets(model, batch, grids[0]),
    }


def _to(batch: dict[str, object], device: torch.device) -> dict[str, object]:
    return {k: v.to(device) if isinstance(v, (torch.Tensor, ReaderTargets)) else v for k, v in batch.items()}


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


def validation_samples(config: ElasticTrainConfig) -> list[VQASample]:
    """The val-split samples a training run with `config` scores its epochs on."""
    return load_mixed_split(config.datasets, "val", config.val_samples_per_dataset, config.seed)


def validation_scores(model: BaseVLM, samples: Sequence[VQASample], space: KnobSpace) -> dict[str, float]:
    """The held-out figures of an epoch record: val_vqa_score_full / _min (means over data sets) and
    val_vqa_score_<dataset> at the full config."""
    full = evaluate_val(model, samples, space.full(), space)
    minimal = evaluate_val(model, samples, space.minimal(), space)
    return {"val_vqa_score_full": full["mean"], "val_vqa_score_min": minimal["mean"],
            **{f"val_vqa_score_{ds}": score for ds, score in full.items() if ds != "mean"}}


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

    Stage 1 trains the vision side with the region reader (`train_reader`); stage 2 trains everything
    on the answers, knobs drawn per batch, with the reader loss beside. Each record has epoch,
    train_loss, train_ce, train_aux, train_reader, lr, samples_per_s, epoch_time_s,
    val_vqa_score_full, val_vqa_score_min, val_vqa_score_<dataset> (full config) and
    val_reader_<group>_<tier> (region-reader accuracy), all on the val split. With
    `checkpoint_dir`, stage 1 and every finished epoch are saved there (model/ as `save_pretrained`
    writes it, plus reader, optimizer state and history); with `resume`, training continues after
    the last saved point. Exceptions raised by `on_epoch` propagate (after the checkpoint).
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = torch.device(config.device)
    model = build_base_vlm(config.model, seed=config.seed).to(device)
    space = space_for(config.model)
    reader = RegionReader(config.model.d_model).to(device)  # training-only: not part of the model
    optimizer = torch.optim.AdamW([*model.parameters(), *reader.parameters()], lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict] = []
    done_epoch = -1  # -1: nothing yet, 0: stage 1 done
    if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / STATE_FILE).is_file():
        state = load_training_state(Path(checkpoint_dir) / STATE_FILE, device)
        if state["config"] != config.to_dict():
            raise ValueError(f"checkpoint in {checkpoint_dir} was written by a different training config")
        model.load_state_dict(BaseVLM.load_pretrained(Path(checkpoint_dir) / MODEL_SUBDIR, device).state_dict())
        reader.load_state_dict(state["reader"])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
        done_epoch = state["epoch"]
    elif config.init_from is not None:
        load_initial_weights(model, reader, Path(config.init_from), device)
        done_epoch = 0  # stage 1 is what the initial checkpoint already did

    train = load_mixed_split(config.datasets, "train", config.train_samples_per_dataset, config.seed)
    val = validation_samples(config)
    examples = _examples(train, config.seed, config.cache_crops)
    val_examples = _examples(val, config.seed, config.cache_crops)
    if done_epoch < 0:
        train_reader(model, reader, examples, config, space, device)
    if done_epoch <= 0 and checkpoint_dir is not None:
        save_checkpoint(model, reader, None, history, 0, config, Path(checkpoint_dir))
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    for epoch in range(max(done_epoch, 0) + 1, config.epochs + 1):
        rng = random.Random(config.seed * 100_003 + epoch)  # per-epoch stream: resume-exact
        torch.manual_seed(config.seed * 100_003 + epoch)  # and torch's (MoE routing draws from it)
        order = list(range(len(examples)))
        rng.shuffle(order)
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "reader": 0.0, "entropy": 0.0}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", leave=False)
        for i in bar:
            step = (epoch - 1) * steps_per_epoch + i
            batch = [examples[j] for j in order[i * config.batch_size : (i + 1) * config.batch_size]]
            knob, drop_order = sample_train_config(rng, space, config, step / total_steps)
            lr = _lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with apply_knobs(model, knob, space, drop_order):
                inputs = _to(collate(model, batch, rng, config.qa_pairs_per_image), device)
                targets = inputs.pop("reader_targets")
                parts = model.teacher_forced_loss(
                    **inputs, vision_loss=lambda v: reader_loss(reader, v, targets), vision_loss_weight=config.reader_weight
                )
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            sums["loss"] += parts.total.item()
            sums["ce"] += parts.answer_ce.item()
            sums["aux"] += parts.router_aux.item()
            sums["reader"] += parts.vision_aux.item()
            sums["entropy"] += parts.router_entropy.item()
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}", knob=knob.key)
        elapsed = time.perf_counter() - t0
        record: dict = {
            "epoch": epoch,
            "train_loss": sums["loss"] / steps_per_epoch,
            "train_ce": sums["ce"] / steps_per_epoch,
            "train_aux": sums["aux"] / steps_per_epoch,
            "train_reader": sums["reader"] / steps_per_epoch,
            "train_router_entropy": sums["entropy"] / steps_per_epoch,
            "lr": lr,
            "epoch_time_s": elapsed,
            "samples_per_s": len(examples) / elapsed,
            **validation_scores(model, val, space),
        }
        record.update(evaluate_reader(model, reader, val_examples, space, device))
        history.append(record)
        if checkpoint_dir is not None:
            save_checkpoint(model, reader, optimizer, history, epoch, config, Path(checkpoint_dir))
        if on_epoch is not None:
            on_epoch(record)
    model.eval()
    return model, history


def _reader_batch(
    model: BaseVLM, batch: Sequence[_Example], tier: str, space: KnobSpace, device: torch.device
) -> tuple[torch.Tensor, tuple[int, int], ReaderTargets]:
    saved = model.max_crops
    model.max_crops = space.max_crops(tier)
    try:
        crops, grids = zip(*(e.crops(model) for e in batch))
    finally:
        model.max_crops = saved
    return torch.stack(crops).to(device), grids[0], reader_targets(model, batch, grids[0]).to(device)


def train_reader(
    model: BaseVLM,
    reader: RegionReader,
    examples: Sequence[_Example],
    config: ElasticTrainConfig,
    space: KnobSpace,
    device: torch.device,
) -> list[float]:
    """Stage 1: `reader_word_steps` steps on synth_textvqa, then `reader_steps` on all data sets, of the
    region-reader loss alone (vision tower, projector, layout embedding and reader; the decoder does not
    run). Each batch is one data set at one tier (`reader_tier_weights`). Returns the losses."""
    params = [p for n, p in model.named_parameters() if n.startswith(("vision.", "projector.", "token_norm.", "layout_embed.", "cell_embed."))]
    optimizer = torch.optim.AdamW(params + list(reader.parameters()), lr=config.lr, weight_decay=config.weight_decay)
    by_dataset: dict[str, list[_Example]] = {}
    for e in examples:
        by_dataset.setdefault(e.sample.dataset, []).append(e)
    text = "synth_textvqa"
    rng = random.Random(config.seed * 100_003)
    losses: list[float] = []
    model.train()
    total = config.reader_word_steps + config.reader_steps
    bar = tqdm(range(total), desc="stage 1: region reader", leave=False)
    for step in bar:
        words_only = step < config.reader_word_steps and text in by_dataset
        dataset = text if words_only else rng.choice(sorted(by_dataset))
        tier = rng.choices(TIERS, weights=config.reader_tier_weights)[0]
        pool = by_dataset[dataset]
        batch = rng.sample(pool, min(config.batch_size, len(pool)))
        crops, grid, targets = _reader_batch(model, batch, tier, space, device)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
        loss = reader_loss(reader, model.encode_crops(crops, grid), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", dataset=dataset, tier=tier)
    return losses


@torch.no_grad()
def evaluate_reader(
    model: BaseVLM, reader: RegionReader, examples: Sequence[_Example], space: KnobSpace, device: torch.device
) -> dict[str, float]:
    """Region-reader accuracy per group and tier on `examples`: `val_reader_<group>_<tier>`."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for tier in TIERS:
        crops, grid, targets = _reader_batch(model, examples, tier, space, device)
        scores = reader(model.encode_crops(crops, grid))
        out.update({f"val_reader_{k}_{tier}": v for k, v in reader_accuracy(scores, targets).items()})
    model.train(was_training)
    return out


def load_initial_weights(model: BaseVLM, reader: RegionReader, directory: Path, device: torch.device) -> None:
    """The weights and region reader of the training checkpoint in `directory` (`init_from`), into this
    run's freshly built model and reader; ValueError naming the directory when it holds no checkpoint or
    one of another architecture."""
    state_file, model_dir = directory / STATE_FILE, directory / MODEL_SUBDIR
    if not state_file.is_file() or not model_dir.is_dir():
        raise ValueError(f"init_from={str(directory)!r}: expected a training checkpoint ({MODEL_SUBDIR}/ and {STATE_FILE})")
    try:
        model.load_state_dict(BaseVLM.load_pretrained(model_dir, device).state_dict())
        reader.load_state_dict(load_training_state(state_file, device)["reader"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"init_from={str(directory)!r}: another architecture than this run's model ({first})") from None


def recorded_history(checkpoint_dir: Path | str) -> list[dict]:
    """Epoch records of a saved training state (empty when there is none), for a resumed run's log."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        return []
    return list(load_training_state(path)["history"])


def load_training_state(path: Path, device: torch.device | str = "cpu") -> dict:
    """training_state.pt, unpickled with weights_only=True: tensors, numbers, strings and containers only
    (the optimizer's state dict is all of those), so a crafted file cannot run code; ValueError naming it otherwise."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(f"{path} holds more than tensors and plain values; refused ({reason})") from None


def save_checkpoint(
    model: BaseVLM,
    reader: RegionReader,
    optimizer: torch.optim.Optimizer | None,
    history: list[dict],
    epoch: int,
    config: ElasticTrainConfig,
    directory: Path,
) -> None:
    """Model files under directory/model, reader + optimizer + history in training_state.pt (written
    last, atomically). Epoch 0 is the end of stage 1."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / MODEL_SUBDIR)
    (directory / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(
        {
            "epoch": epoch,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "reader": reader.state_dict(),
            "history": history,
            "config": config.to_dict(),
        },
        tmp,
    )
    tmp.replace(directory / STATE_FILE)


def export_trained(model: BaseVLM, history: list[dict], config: ElasticTrainConfig, directory: Path | str) -> Path:
    """The checkpoint (`save_pretrained`) with its per-epoch records and training config beside it: what
    `exported_training` reads back when the directory is registered elsewhere."""
    directory = model.save_pretrained(directory)
    (directory / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    (directory / TRAINING_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    return directory


def exported_training(directory: Path | str) -> tuple[list[dict], dict | None]:
    """(per-epoch records, training config) saved beside a checkpoint by `export_trained`; ([], None)
    for what is missing (e.g. a checkpoint written by `save_pretrained` alone)."""
    history_file, config_file = Path(directory) / HISTORY_FILE, Path(directory) / TRAINING_CONFIG_FILE
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    return history, json.loads(config_file.read_text()) if config_file.is_file() else None
