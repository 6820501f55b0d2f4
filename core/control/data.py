"""Controller data: what every controller trains on, built from a VLM backend without timing.

For the first N samples of each data set's train and val split (`ControllerDataConfig`; with a data
root, the real benchmarks', whose train file gives both: its first `train_samples` questions are the
controller's train split and the next `val_samples` its val split, because the real val file is the
test split the measured tables and every reported figure read):
  samples   one row per sample: what a controller may read before it picks the knobs (the question's
            token count and pooled token embeddings, the pooled global view, crops and vision tokens
            per tier);
  grid      one row per (sample, config) of the backend's whole knob space: the greedy answer, its
            token count and its VQA score; after the build, the champion latency estimator's
            median and P90 `T_total` for that config and that answer length.
It is an accuracy grid, not a profile: answers are untimed (batched on the base VLM, one request at a
time through `StagedVLM` on any other backend), and each sample's crops are encoded once per tier and
reused by the tier's (top_k, blocks) configs (the knobs reach only the decoder). Latency for training comes from the estimator; adherence is judged elsewhere, on a measured
table.

Layout on disk (`output_dir`):
  manifest.json      format, the build identity (`build`: base-model digest, samples digest, drop order,
                     knob space, data sets, sample counts, chunk size), the references the build came from, row
                     counts and the estimator used. A build into a directory whose identity differs is
                     refused in one line; the same identity resumes.
  parts/<dataset>/<split>/features-<start>-<stop>.parquet  sample rows of indices [start, stop)
  parts/<dataset>/<split>/grid-<start>-<stop>.parquet      their grid rows (no latency)
                     A chunk is done when both files exist; each is written under a temporary name and
                     renamed, so a killed build loses at most the chunk it was answering.
  samples.parquet    SAMPLE_COLUMNS, then crops_<tier> and vision_tokens_<tier> per tier, then
                     q_emb_0..q_emb_{d-1} and gv_0..gv_{d-1} (float32, d = the decoder's width)
  grid.parquet       GRID_COLUMNS + LATENCY_COLUMNS, sorted by split, dataset, sample index, config

Column definitions follow the profiler's (`core.profiling.profiler`): `text_tokens` counts the prompt's
text tokens (on the base VLM BOS, the question's words and ANS; on molmoe_arch its prompt template's); `crops` counts the tiles without the global view; `vision_tokens` =
(crops + 1) x tokens_per_crop; `output_tokens` counts the generated tokens with the EOS, capped at the
data set's max_new_tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from core.knobs import KNOBS, TIERS, KnobConfig, KnobSpace
from core.latency.estimator import LatencyEstimator
from core.latency.features import STEP_KNOBS
from core.timing import StageClock
from core.vlm.backend import StagedVLM
from core.vlm.base_vlm import BaseVLMBackend, apply_knobs
from core.vqa import real_data
from core.vqa.sources import ScoreFn, answer_score, dataset_choices
from core.vqa.metrics import vqa_score
from core.vqa.sample import VQASample
from core.vqa.suite import DATASETS, SPLIT_SIZES, make_sample

FORMAT = "controller-data/1"
SPLITS: tuple[str, ...] = ("train", "val")
MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "samples.parquet"
GRID_FILE = "grid.parquet"
PARTS_DIR = "parts"

SAMPLE_COLUMNS: tuple[str, ...] = ("sample_id", "dataset", "split", "task", "question", "text_tokens")
GRID_COLUMNS: tuple[str, ...] = ("sample_id", "dataset", "split", *KNOBS, "crops", "vision_tokens", "text_tokens",
                                 "output_tokens", "prediction", "accuracy")
LATENCY_COLUMNS: tuple[str, ...] = ("T_total_pred_ms", "T_total_p90_ms")
QUESTION_PREFIX, GLOBAL_VIEW_PREFIX = "q_emb_", "gv_"


def tier_columns() -> list[str]:
    """crops_<tier> and vision_tokens_<tier> for every tier, in TIERS order."""
    return [f"{name}_{tier}" for tier in TIERS for name in ("crops", "vision_tokens")]


def feature_columns(frame: pd.DataFrame, prefix: str) -> list[str]:
    """`prefix`0 .. `prefix`{d-1} of a samples frame, in index order."""
    return sorted((c for c in frame.columns if c.startswith(prefix)), key=lambda c: int(c[len(prefix):]))


@dataclass(frozen=True)
class ControllerDataConfig:
    """Which samples the controller data covers and how it is cut into parts (the defaults: issue 14)."""

    dataset_names: tuple[str, ...] = DATASETS
    train_samples: int = 1000  # per data set: the first N of its train split
    val_samples: int = 200  # per data set: the first N of its val split
    chunk_size: int = 100  # samples per part file (what a killed build can lose)
    batch_size: int = 128  # prompts per decoder forward
    data_root: str = ""  # the real benchmarks' files ('' = the synthetic suite)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_names", tuple(self.dataset_names))
        choices = dataset_choices(self.data_root)  # checks data_root
        unknown = [d for d in self.dataset_names if d not in choices]
        if not self.dataset_names or unknown:
            raise ValueError(f"parameter dataset_names: unknown or empty {list(unknown)} (choose from: {', '.join(choices)})")
        for name in ("chunk_size", "batch_size", "train_samples", "val_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name} must be >= 1, got {getattr(self, name)}")
        if not self.data_root:
            for split, n in self.samples_per_split.items():
                if n > SPLIT_SIZES[split]:
                    raise ValueError(f"parameter {split}_samples={n} must lie in [1, {SPLIT_SIZES[split]}] (the {split} split's size)")
            return
        wanted = self.train_samples + self.val_samples
        for dataset in self.dataset_names:
            if wanted > (size := real_data.split_size(self.data_root, dataset, "train")):
                raise ValueError(f"parameters train_samples + val_samples = {wanted} exceed the {size} questions of "
                                 f"{dataset}'s train file under {self.data_root} (with data_root both come from it)")

    @property
    def samples_per_split(self) -> dict[str, int]:
        return {"train": self.train_samples, "val": self.val_samples}

    def source_indices(self, split: str, start: int, stop: int) -> tuple[str, list[int]]:
        """(split of the files, indices) that samples [start, stop) of the controller's `split` are read as."""
        if not self.data_root:
            return split, list(range(start, stop))
        offset = self.train_samples if split == "val" else 0
        return "train", list(range(offset + start, offset + stop))

    def samples(self, dataset: str, split: str, start: int, stop: int) -> list[VQASample]:
        """Samples [start, stop) of the controller's `split` of `dataset` (module docstring)."""
        file_split, indices = self.source_indices(split, start, stop)
        if not self.data_root:
            return [make_sample(dataset, file_split, i) for i in indices]
        return real_data.load_real_split(self.data_root, dataset, file_split, indices=indices)

    def chunks(self) -> list[tuple[str, str, int, int]]:
        """(dataset, split, start, stop) of every part, train before val."""
        return [(dataset, split, start, min(start + self.chunk_size, n))
                for split, n in self.samples_per_split.items() for dataset in self.dataset_names
                for start in range(0, n, self.chunk_size)]


# --- what one forward pass gives -------------------------------------------------------------------

def text_tokens_of(backend: BaseVLMBackend, question: str) -> int:
    """The prompt's text tokens as the profiler counts them: BOS, the question's words, ANS."""
    return len(backend.model.question_ids(question)) + 2


def _full_at(space: KnobSpace, tier: str) -> KnobConfig:
    full = space.full()
    return KnobConfig(tier, full.top_k, full.num_active_blocks)


def _groups(keys: Sequence[tuple], batch_size: int) -> list[list[int]]:
    """Indices with equal keys, in batches of at most `batch_size` (equal keys need no padding)."""
    by_key: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    return [idx[s:s + batch_size] for idx in by_key.values() for s in range(0, len(idx), batch_size)]


def sample_features(backend: StagedVLM, samples: Sequence[VQASample], batch_size: int = 128) -> pd.DataFrame:
    """One row per sample, in order: SAMPLE_COLUMNS, crops_<tier> / vision_tokens_<tier>, q_emb_* (the
    mean of the decoder's input embeddings of the question's words) and gv_* (the mean over the global
    view's vision tokens as `encode_crops` emits them: the view is the same crop at every tier, so a
    controller knows it before the tier decision). Float features are float32. The base VLM is batched here; any other backend gives
    its `request_features` one request at a time (what adaptive inference reads)."""
    if not isinstance(backend, BaseVLMBackend):
        return _staged_features(backend, samples)
    model, space = backend.model, backend.space
    n, d, per_crop = len(samples), model.config.d_model, space.tokens_per_crop
    question_ids = [model.question_ids(s.question) for s in samples]
    gv = np.zeros((n, d), dtype=np.float32)
    q_emb = np.zeros((n, d), dtype=np.float32)
    crops = {tier: np.zeros(n, dtype=np.int64) for tier in TIERS}
    embed = model.decoder.model.embed_tokens
    with torch.inference_mode():
        for tier in TIERS:
            with apply_knobs(model, _full_at(space, tier), space, backend.drop_order):
                prepared = [model.preprocess(s.image) for s in samples]
            crops[tier][:] = [c.shape[0] - 1 for c, _ in prepared]
            if tier != TIERS[0]:
                continue
            # The lowest tier has the fewest tiles to encode with the global view.
            for idx in _groups([(g,) for _, g in prepared], batch_size):
                batch = torch.stack([prepared[i][0] for i in idx]).to(model.device)
                tokens = model.encode_crops(batch, prepared[idx[0]][1])[:, :per_crop]  # the global view comes first
                gv[idx] = tokens.mean(1).float().cpu().numpy()
        for idx in _groups([(len(q),) for q in question_ids], batch_size):
            ids = torch.tensor([question_ids[i] for i in idx], dtype=torch.long, device=model.device)
            q_emb[idx] = embed(ids).mean(1).float().cpu().numpy()
    return _features_frame(samples, [len(q) + 2 for q in question_ids], crops, per_crop, q_emb, gv)


def _features_frame(samples: Sequence[VQASample], text_tokens: Sequence[int],
                    crops: dict[str, np.ndarray], per_crop: int, q_emb: np.ndarray, gv: np.ndarray) -> pd.DataFrame:
    d = q_emb.shape[1]
    frame = pd.DataFrame({
        "sample_id": [s.sample_id for s in samples], "dataset": [s.dataset for s in samples],
        "split": [s.sample_id.split(":")[1] for s in samples],
        "task": [s.task for s in samples], "question": [s.question for s in samples], "text_tokens": list(text_tokens),
    })
    for tier in TIERS:
        frame[f"crops_{tier}"] = crops[tier]
        frame[f"vision_tokens_{tier}"] = (crops[tier] + 1) * per_crop
    features = pd.DataFrame(np.concatenate([q_emb, gv], axis=1),
                            columns=[f"{QUESTION_PREFIX}{j}" for j in range(d)] + [f"{GLOBAL_VIEW_PREFIX}{j}" for j in range(d)])
    return pd.concat([frame, features], axis=1)


def _staged_features(backend: StagedVLM, samples: Sequence[VQASample]) -> pd.DataFrame:
    rows = [backend.request_features(s) for s in samples]
    q_emb = np.stack([r.question_embedding for r in rows]).astype(np.float32)
    gv = np.stack([r.global_view_mean for r in rows]).astype(np.float32)
    crops = {tier: np.array([r.crops[tier] for r in rows], dtype=np.int64) for tier in TIERS}
    return _features_frame(samples, [r.text_tokens for r in rows], crops, backend.space.tokens_per_crop, q_emb, gv)


def _greedy(backend: BaseVLMBackend, embeds: torch.Tensor, max_new_tokens: Sequence[int]) -> list[list[int]]:
    """Greedy ids from prompt embeddings (B, T, d) under the knobs applied, as `BaseVLM.generate` makes
    them: up to and including the first EOS, at most each row's max_new_tokens."""
    decoder, eos = backend.model.decoder, backend.model.tokenizer.eos_token_id
    limits = torch.tensor(list(max_new_tokens), device=embeds.device)
    cache = DynamicCache(config=decoder.config)
    out = decoder(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens = out.logits[:, -1].argmax(-1)
    steps, done = [tokens], tokens == eos
    while not bool((done | (limits <= len(steps))).all()):
        out = decoder(input_ids=tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1].argmax(-1)
        steps.append(tokens)
        done |= tokens == eos
    ids = []
    for seq, limit in zip(torch.stack(steps, 1).tolist(), max_new_tokens):
        seq = seq[:limit]
        ids.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return ids


def accuracy_grid(backend: StagedVLM, samples: Sequence[VQASample], space: KnobSpace | None = None,
                  batch_size: int = 128, progress: bool = True, score_fn: ScoreFn = vqa_score) -> pd.DataFrame:
    """One row per (sample, config) of `space` (default the backend's): GRID_COLUMNS, sample-major in
    `samples` order, configs in `space.grid()` order, answers scored with `score_fn`. On the base VLM,
    greedy answers batched by (tile grid, question length) so no prompt is padded; on any other backend
    one request at a time through its stages. Each sample's vision tokens are encoded once per tier."""
    if not isinstance(backend, BaseVLMBackend):
        return _staged_grid(backend, samples, space or backend.space, progress, score_fn)
    model, space = backend.model, space or backend.space
    eos = model.tokenizer.eos_token_id
    configs = space.grid()
    question_ids = [model.question_ids(s.question) for s in samples]
    results: dict[tuple[int, KnobConfig], tuple[int, int, list[int]]] = {}  # (sample, config) -> crops, text tokens, ids
    bar = tqdm(total=len(samples) * len(configs), desc="accuracy grid", unit="answer", leave=False, disable=not progress)
    with torch.inference_mode():
        for tier in TIERS:
            with apply_knobs(model, _full_at(space, tier), space, backend.drop_order):
                prepared = [model.preprocess(s.image) for s in samples]
            batches = []
            for idx in _groups([(g, len(question_ids[i])) for i, (_, g) in enumerate(prepared)], batch_size):
                crops = torch.stack([prepared[i][0] for i in idx]).to(model.device)
                q = torch.tensor([question_ids[i] for i in idx], dtype=torch.long, device=model.device)
                # Neither the vision tower nor the token embeddings depend on top_k or the blocks.
                batches.append((idx, model.prompt_embeds(model.encode_crops(crops, prepared[idx[0]][1]), q)))
            for config in (c for c in configs if c.tier == tier):
                with apply_knobs(model, config, space, backend.drop_order):
                    for idx, embeds in batches:
                        ids = _greedy(backend, embeds, [samples[i].max_new_tokens for i in idx])
                        for i, seq in zip(idx, ids):
                            results[(i, config)] = (prepared[i][0].shape[0] - 1, len(question_ids[i]) + 2, seq)
                        bar.update(len(idx))
    bar.close()
    rows = []
    for i, s in enumerate(samples):
        split = s.sample_id.split(":")[1]
        for config in configs:
            crops, text_tokens, seq = results[(i, config)]
            prediction = model.decode(seq[:-1] if seq and seq[-1] == eos else seq)
            rows.append((s.sample_id, s.dataset, split, config.tier, config.top_k, config.num_active_blocks, crops,
                         space.vision_tokens(crops), text_tokens, len(seq), prediction, score_fn(prediction, s.answers)))
    return pd.DataFrame(rows, columns=list(GRID_COLUMNS))


def _staged_grid(backend: StagedVLM, samples: Sequence[VQASample], space: KnobSpace, progress: bool,
                 score_fn: ScoreFn) -> pd.DataFrame:
    """`accuracy_grid` through a backend's stages: what adaptive inference runs, config by config."""
    configs = space.grid()
    rows = []
    bar = tqdm(total=len(samples) * len(configs), desc="accuracy grid", unit="answer", leave=False, disable=not progress)
    with torch.inference_mode():
        for s in samples:
            features = backend.request_features(s)
            answers: dict[KnobConfig, list[int]] = {}
            for tier in TIERS:
                tier_configs = [c for c in configs if c.tier == tier]
                if not tier_configs:
                    continue
                vision = backend.encode_tier(s, tier, features.global_view)
                for config in tier_configs:
                    answers[config] = backend.generate_from_vision(vision, s, config, s.max_new_tokens,
                                                                   StageClock(backend.device))
                    bar.update(1)
            split = s.sample_id.split(":")[1]
            for config in configs:
                ids, crops = answers[config], features.crops[config.tier]
                prediction = backend.decode_answer(ids)
                rows.append((s.sample_id, s.dataset, split, config.tier, config.top_k, config.num_active_blocks, crops,
                             space.vision_tokens(crops), features.text_tokens, len(ids), prediction,
                             score_fn(prediction, s.answers)))
    bar.close()
    return pd.DataFrame(rows, columns=list(GRID_COLUMNS))


# --- latency from the estimator --------------------------------------------------------------------

def check_estimator_space(estimator: LatencyEstimator, space: KnobSpace) -> None:
    """ValueError (one line) when `space` has a top_k or block option the estimator never trained on:
    its predictions there would be extrapolations (e.g. an estimator of another backend's table)."""
    for knob, levels in zip(STEP_KNOBS, estimator.levels):
        trained = sorted(int(v) for v in levels if math.isfinite(v))
        options = space.top_k_options if knob == "top_k" else space.block_options
        if trained and not set(options) <= set(trained):
            raise ValueError(f"estimator was trained on {knob} values {trained}, but knob space {space.name!r} has "
                             f"{list(options)}: use an estimator trained on this backend's profiling table")


def add_estimator_latency(grid: pd.DataFrame, estimator: LatencyEstimator) -> pd.DataFrame:
    """`grid` with T_total_pred_ms (the estimator's median T_total) and T_total_p90_ms (its P90) for each
    row's config, sizes and own output_tokens."""
    predicted = estimator.predict_frame(grid[["vision_tokens", "text_tokens", "crops", *KNOBS, "output_tokens"]])
    out = grid.copy()
    out["T_total_pred_ms"] = predicted["T_total_ms"].to_numpy(dtype=np.float64)
    out["T_total_p90_ms"] = predicted["T_total_ms_p90"].to_numpy(dtype=np.float64)
    return out


# --- the schema gate -------------------------------------------------------------------------------

def _fail(source: str, message: str) -> None:
    raise ValueError(f"{source}: {message}")


def _first(df: pd.DataFrame, column: str, bad: pd.Series) -> object:
    """The first offending value, as a plain Python value (numpy scalars print as np.int64(5))."""
    value = df[column][bad].iloc[0]
    return value.item() if isinstance(value, np.generic) else value


def _numbers(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce")


def check_controller_data(df: pd.DataFrame, source: str, kind: str = "grid", space: KnobSpace | None = None,
                          require_latency: bool = True) -> pd.DataFrame:
    """Return `df` unchanged, or raise ValueError (one line naming `source` and the first bad field).

    kind="grid": GRID_COLUMNS (+ LATENCY_COLUMNS with `require_latency`) present; accuracy in [0, 1];
    output_tokens, text_tokens, vision_tokens >= 1 and crops >= 0; latency finite and >= 0; with
    `space`, every knob value in the space and every sample with each of its configs exactly once.
    kind="samples": SAMPLE_COLUMNS and the tier columns present, q_emb_* and gv_* numbered 0..d-1 and
    finite, one row per sample_id.
    """
    if kind not in ("grid", "samples"):
        raise ValueError(f"kind must be 'grid' or 'samples', got {kind!r}")
    if df is None or len(df) == 0:
        _fail(source, f"the controller-data {kind} table is empty")
    if kind == "samples":
        for column in (*SAMPLE_COLUMNS, *tier_columns()):
            if column not in df.columns:
                _fail(source, f"field {column} missing from the samples table")
        for prefix in (QUESTION_PREFIX, GLOBAL_VIEW_PREFIX):
            columns = feature_columns(df, prefix)
            if not columns or columns != [f"{prefix}{j}" for j in range(len(columns))]:
                _fail(source, f"fields {prefix}0..{prefix}{{d-1}} missing or not numbered from 0")
            if not np.isfinite(df[columns].to_numpy(dtype=np.float64)).all():
                _fail(source, f"field {prefix}* holds NaN or infinite values")
        if df["sample_id"].duplicated().any():
            _fail(source, f"field sample_id: {df['sample_id'][df['sample_id'].duplicated()].iloc[0]} appears twice")
        return df
    required = GRID_COLUMNS + (LATENCY_COLUMNS if require_latency else ())
    for column in required:
        if column not in df.columns:
            _fail(source, f"field {column} missing from the grid table")
    accuracy = _numbers(df, "accuracy")
    if (bad := ~accuracy.between(0, 1)).any():  # NaN is not between
        _fail(source, f"field accuracy must lie in [0, 1] ({_first(df, 'accuracy', bad)!r} at sample {_first(df, 'sample_id', bad)})")
    for column, low in (("output_tokens", 1), ("text_tokens", 1), ("vision_tokens", 1), ("crops", 0)):
        if (bad := ~(_numbers(df, column) >= low)).any():
            _fail(source, f"field {column} must be >= {low} ({_first(df, column, bad)!r} at sample {_first(df, 'sample_id', bad)})")
    for column in LATENCY_COLUMNS if require_latency else ():
        values = _numbers(df, column)
        if (bad := ~(np.isfinite(values) & (values >= 0))).any():
            _fail(source, f"field {column} is NaN or negative ({_first(df, column, bad)!r} at sample {_first(df, 'sample_id', bad)})")
    if space is not None:
        options = {"tier": set(TIERS), "top_k": set(space.top_k_options), "num_active_blocks": set(space.block_options)}
        for knob, allowed in options.items():
            if (bad := ~df[knob].isin(allowed)).any():
                _fail(source, f"{knob}={_first(df, knob, bad)!r} is outside knob space {space.name!r} (options: {sorted(allowed, key=str)})")
        keys = df[["sample_id", *KNOBS]]
        if keys.duplicated().any():
            row = keys[keys.duplicated()].iloc[0]
            _fail(source, f"field sample_id: {row['sample_id']} has config {row['tier']}-k{row['top_k']}-b{row['num_active_blocks']} twice")
        counts = keys["sample_id"].value_counts()
        if (short := counts[counts != len(space.grid())]).any():
            _fail(source, f"field sample_id: {short.index[0]} has {short.iloc[0]} configs, knob space {space.name!r} has {len(space.grid())}")
    return df


# --- the build -------------------------------------------------------------------------------------

def _weights(backend: StagedVLM) -> tuple[dict, dict[str, torch.nn.Module]]:
    """(architecture record, modules by name prefix) whose weights define the backend's answers."""
    if isinstance(backend, BaseVLMBackend):
        return asdict(backend.model.config), {"": backend.model}
    modules = {f"{name}.": getattr(backend, name) for name in ("lm", "vision")}
    if not all(isinstance(m, torch.nn.Module) for m in modules.values()):
        raise TypeError(f"backend {backend.name}: no lm / vision modules to digest")
    return {"backend": backend.name, "space": space_record(backend.space)}, modules


def model_digest(backend: StagedVLM) -> str:
    """Content hash of the backend's weights, architecture and drop order: the same model, wherever it was
    loaded from (a directory, a release or the registry), has the same digest."""
    record, modules = _weights(backend)
    h = hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode())
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            h.update((prefix + name).encode())
            # Raw bytes of any dtype (bfloat16 has no numpy type); float32 bytes are numpy's.
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(list(backend.drop_order)).encode())
    return h.hexdigest()[:16]


def space_record(space: KnobSpace) -> dict[str, object]:
    """The knob space as JSON-able values (stored in the manifest; `manifest_space` reads it back)."""
    return {"name": space.name, "tier_max_crops": dict(space.tier_max_crops), "top_k_options": list(space.top_k_options),
            "block_options": list(space.block_options), "num_blocks": space.num_blocks, "num_experts": space.num_experts,
            "tokens_per_crop": space.tokens_per_crop, "default_top_k": space.default_top_k}


def manifest_space(manifest: dict) -> KnobSpace:
    """The knob space a controller-data manifest was built on."""
    record = dict(manifest["build"]["space"])
    crops = record["tier_max_crops"]  # JSON keeps no key order; KnobSpace wants the tiers in TIERS order
    return KnobSpace(**{**record, "tier_max_crops": {t: crops[t] for t in TIERS if t in crops},
                        "top_k_options": tuple(record["top_k_options"]), "block_options": tuple(record["block_options"])})


def samples_digest(config: ControllerDataConfig) -> str:
    """Content hash of every sample the build covers (ids, questions, answers, pixels): a change of the
    suite's generator changes it, so parts of the old samples are never mixed with new ones (~0.2 ms a sample).
    With a data root: each data set's questions, answers and image files as read (`real_data.split_digest`)."""
    h = hashlib.sha256()
    if config.data_root:
        for dataset in config.dataset_names:
            indices = range(config.train_samples + config.val_samples)  # train, then val (`source_indices`)
            h.update(real_data.split_digest(config.data_root, dataset, "train", indices).encode())
        return h.hexdigest()[:16]
    for dataset, split, start, stop in config.chunks():
        for i in range(start, stop):
            s = make_sample(dataset, split, i)
            h.update("|".join((s.sample_id, s.question, *s.answers, str(s.max_new_tokens))).encode())
            h.update(s.image.tobytes())
    return h.hexdigest()[:16]


def build_identity(backend: StagedVLM, config: ControllerDataConfig) -> dict[str, object]:
    """What the parts depend on; a directory built with another identity is never resumed into."""
    # Parameters first: a rerun with other parameters is told which one, not that a digest differs.
    # backend and data_root only when not the defaults, so earlier suite builds still resume.
    extra = {"backend": backend.name} if backend.name != "base_vlm" else {}
    if config.data_root:
        extra["data_root"] = str(Path(config.data_root).resolve())
    return {**extra, "dataset_names": list(config.dataset_names), "train_samples": config.train_samples,
            "val_samples": config.val_samples, "chunk_size": config.chunk_size, "space": space_record(backend.space),
            "drop_order": list(backend.drop_order), "base_model_digest": model_digest(backend),
            "samples_digest": samples_digest(config)}


def read_manifest(directory: str | os.PathLike[str]) -> dict | None:
    """The manifest of a controller-data directory; None when there is none."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a controller-data manifest ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "build" not in manifest:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    return manifest


def check_output_dir(output_dir: str | os.PathLike[str], identity: dict[str, object]) -> None:
    """ValueError (one line) when `output_dir` is a file, or holds controller data of another identity
    (naming the first field that differs), or parts without a manifest."""
    directory = Path(output_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output_dir {directory} is a file, not a directory")
    manifest = read_manifest(directory)
    if manifest is None:
        if (directory / PARTS_DIR).exists():
            raise ValueError(f"output_dir {directory} holds {PARTS_DIR}/ but no {MANIFEST_FILE}: pass another output_dir")
        return
    for key, value in identity.items():
        if manifest["build"].get(key) != value:
            raise ValueError(f"output_dir {directory} holds controller data built with {key}={manifest['build'].get(key)!r}, "
                             f"this build has {key}={value!r}: pass another output_dir, or the same parameters to resume")


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)  # readers and resumes see the whole part or none
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def part_paths(output_dir: str | os.PathLike[str], dataset: str, split: str, start: int, stop: int) -> tuple[Path, Path]:
    """(features part, grid part) of one chunk."""
    folder = Path(output_dir) / PARTS_DIR / dataset / split
    return folder / f"features-{start:05d}-{stop:05d}.parquet", folder / f"grid-{start:05d}-{stop:05d}.parquet"


@dataclass
class BuildSummary:
    """What one build did."""

    chunks_written: int
    chunks_skipped: int  # done by an earlier build into the same directory
    samples: int
    grid_rows: int
    build_seconds: float
    parts_written: list[str] = field(default_factory=list)


def build_controller_data(backend: StagedVLM, output_dir: str | os.PathLike[str], config: ControllerDataConfig,
                          estimator: LatencyEstimator, sources: dict[str, str] | None = None,
                          progress: bool = True) -> BuildSummary:
    """Build (or resume) the controller data of `config` under `output_dir` (layout: module docstring).

    Chunks whose two parts exist are skipped; the others are answered and written. Then samples.parquet
    and grid.parquet (with the estimator's latency) are rewritten from the parts, validated, and the
    manifest records `sources` (e.g. the base-model and estimator references) and the row counts.
    """
    start_time = time.perf_counter()
    directory = Path(output_dir)
    identity = build_identity(backend, config)
    check_output_dir(directory, identity)
    check_estimator_space(estimator, backend.space)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(directory) or {"format": FORMAT, "build": identity}
    _atomic_json(manifest, directory / MANIFEST_FILE)  # before the first part: a later build can check it
    chunks = config.chunks()
    todo = [c for c in chunks if not all(p.is_file() for p in part_paths(directory, *c))]
    summary = BuildSummary(0, len(chunks) - len(todo), 0, 0, 0.0)
    score_fn = answer_score(config.data_root)
    for dataset, split, start, stop in tqdm(todo, desc="controller data", unit="chunk", disable=not progress):
        samples = config.samples(dataset, split, start, stop)
        features_path, grid_path = part_paths(directory, dataset, split, start, stop)
        # The controller's split, which with a data root is not the file's (both come from "train").
        _atomic_parquet(sample_features(backend, samples, config.batch_size).assign(split=split), features_path)
        _atomic_parquet(accuracy_grid(backend, samples, backend.space, config.batch_size, progress, score_fn)
                        .assign(split=split), grid_path)
        summary.chunks_written += 1
        summary.parts_written += [str(features_path), str(grid_path)]
    paths = [part_paths(directory, *c) for c in chunks]
    samples_frame = pd.concat([pd.read_parquet(f) for f, _ in paths], ignore_index=True)
    grid = add_estimator_latency(pd.concat([pd.read_parquet(g) for _, g in paths], ignore_index=True), estimator)
    check_controller_data(samples_frame, str(directory / SAMPLES_FILE), kind="samples")
    check_controller_data(grid, str(directory / GRID_FILE), space=backend.space)
    _atomic_parquet(samples_frame, directory / SAMPLES_FILE)
    _atomic_parquet(grid, directory / GRID_FILE)
    summary.samples, summary.grid_rows = len(samples_frame), len(grid)
    summary.build_seconds = time.perf_counter() - start_time
    manifest.update({"sources": dict(sources or {}), "rows": {"samples": len(samples_frame), "grid": len(grid)},
                     "estimator_meta": {k: v for k, v in estimator.meta.items() if isinstance(v, (str, int, float, bool))}})
    _atomic_json(manifest, directory / MANIFEST_FILE)
    return summary


def load_controller_data(directory: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(samples frame, grid frame) of a built controller-data directory, both validated against the
    schema and the manifest's knob space, every grid sample among the samples. ValueError (one line
    naming the file) otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"controller data directory {directory} does not exist (build it with build_controller_data)")
    manifest = read_manifest(directory)
    if manifest is None:
        raise ValueError(f"controller data directory {directory} has no {MANIFEST_FILE} (build it with build_controller_data)")
    frames = []
    for name in (SAMPLES_FILE, GRID_FILE):
        path = directory / name
        if not path.is_file():
            raise ValueError(f"controller data directory {directory} has no {name} (the build did not finish: rerun it)")
        try:
            frames.append(pd.read_parquet(path))
        except Exception as exc:  # pyarrow raises several types for a damaged file: one user error
            raise ValueError(f"{path}: cannot be read as Parquet ({type(exc).__name__})") from None
    samples, grid = frames
    check_controller_data(samples, str(directory / SAMPLES_FILE), kind="samples")
    check_controller_data(grid, str(directory / GRID_FILE), space=manifest_space(manifest))
    if (unknown := ~grid["sample_id"].isin(samples["sample_id"])).any():
        raise ValueError(f"{directory / GRID_FILE}: field sample_id {grid['sample_id'][unknown].iloc[0]} is not in {SAMPLES_FILE}")
    return samples, grid
