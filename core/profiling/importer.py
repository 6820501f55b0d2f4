"""Import the original study's JSON profiling layout into the profile schema.

Layout read: a directory of JSON files, one per knob config. Each file holds the config (top level
or under "config") and a `per_sample_results` list:

    {"dataset": "textvqa", "split": "validation", "task": "vqa", "device": "NVIDIA H100 80GB HBM3",
     "tier": "low", "top_k": 8, "num_active_blocks": 16,          # or "max_crops": 3 instead of tier
     "per_sample_results": [
        {"sample_id": 0, "question": "...", "crops": 2, "text_tokens": 14,
         "T_vision_total": 40.1, "T_LLM_prefill": 120.3, "T_LLM_decode": 60.2, "T_decode_per_token": 20.1,
         "output_tokens": 3, "accuracy": 0.6, "prediction": "red", "answers": ["red", "..."]}, ...]}

What changes on the way in (each noted in `ImportResult.notes`):
  * sample ids: an integer (or digit-only) `sample_id` is a batch index, which collides across workers
    and runs; such rows get '<dataset>:<split>:<position in per_sample_results>' instead (the files list
    the same evaluation samples in the same order). String ids become '<dataset>:<split>:<id>' unless
    already of that form.
  * T_decode_per_token_ms is recomputed as T_decode_ms / (output_tokens - 1): the original divided by
    output_tokens, but the first output token comes out of prefill.
  * T_total_ms = T_vision_ms + T_prefill_ms + T_decode_ms (the budgeted end-to-end latency).
  * times are taken as ms (`time_unit="s"` or a file-level "time_unit": "s" scales them).
  * a (sample, config) listed more than once in a file gets run_index 0, 1, ... in order.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from core.knobs import TIERS, KnobOutOfSpaceError, get_space
from core.profiling.schema import ProfileRow, decode_per_token_ms, row_keys, rows_to_frame, validate_profile
from core.profiling.store import ProfileStore

_ALIASES: dict[str, tuple[str, ...]] = {
    "T_vision_ms": ("T_vision_total", "T_vision", "T_vision_ms"),
    "T_prefill_ms": ("T_LLM_prefill", "T_prefill", "T_prefill_ms"),
    "T_decode_ms": ("T_LLM_decode", "T_decode", "T_decode_ms"),
    "text_tokens": ("text_tokens", "prompt_tokens", "num_text_tokens"),
    "crops": ("crops", "num_crops"),
    "question": ("question", "prompt"),
    "prediction": ("prediction", "answer", "output_text"),
    "answers": ("answers", "gt_answers", "reference_answers"),
}
_TIME_SCALE = {"ms": 1.0, "s": 1000.0}
_STABLE_ID = re.compile(r"^[^:]+:[^:]+:.+$")


class OriginalStudyImportError(ValueError):
    """An original-study file that cannot be imported (one line naming the file and field)."""


@dataclass
class ImportResult:
    """Rows in the profile schema plus what was changed on the way in."""

    frame: pd.DataFrame
    files_read: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _get(record: Mapping[str, Any], name: str, where: str, default: Any = KeyError) -> Any:
    for alias in _ALIASES.get(name, (name,)):
        if alias in record and record[alias] is not None:
            return record[alias]
    if default is KeyError:
        raise OriginalStudyImportError(f"{where}: missing field {name} (also looked for {list(_ALIASES.get(name, (name,)))})")
    return default


def _tier_of(config: Mapping[str, Any], space_name: str, where: str) -> str:
    space = get_space(space_name)
    if "tier" in config:
        tier = str(config["tier"]).lower()
        if tier not in TIERS:
            raise OriginalStudyImportError(f"{where}: field tier={config['tier']!r} is not one of {list(TIERS)}")
        return tier
    if "max_crops" in config:
        by_crops = {v: k for k, v in space.tier_max_crops.items()}
        if int(config["max_crops"]) not in by_crops:
            raise OriginalStudyImportError(
                f"{where}: field max_crops={config['max_crops']} matches no tier of {space.name!r} {space.tier_max_crops}"
            )
        return by_crops[int(config["max_crops"])]
    raise OriginalStudyImportError(f"{where}: missing field tier (or max_crops)")


def _sample_id(raw: Any, dataset: str, split: str, position: int) -> tuple[str, bool]:
    """(stable id, whether it was rebuilt from the position)."""
    if isinstance(raw, bool) or raw is None:
        return f"{dataset}:{split}:{position}", True
    if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
        return f"{dataset}:{split}:{position}", True  # a batch index: not unique across workers
    text = str(raw)
    return (text if _STABLE_ID.match(text) else f"{dataset}:{split}:{text}"), False


def _read_file(path: Path, backend: str, dataset: str | None, split: str | None, time_unit: str) -> tuple[list[ProfileRow], dict[str, int]]:
    where = f"original study file {path}"
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OriginalStudyImportError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or "per_sample_results" not in doc:
        return [], {"skipped_file": 1}
    config = {**doc, **doc.get("config", {})}
    space = get_space(backend)
    tier = _tier_of(config, backend, where)
    try:
        top_k = int(_get(config, "top_k", where))
        blocks = int(_get(config, "num_active_blocks", where))
        space.make(tier, top_k, blocks)
    except KnobOutOfSpaceError as exc:
        raise OriginalStudyImportError(f"{where}: {exc}") from None
    ds = dataset or config.get("dataset")
    sp = split or config.get("split")
    if not ds or not sp:
        raise OriginalStudyImportError(f"{where}: missing field dataset/split (pass dataset= and split= to the importer)")
    unit = str(config.get("time_unit", time_unit))
    if unit not in _TIME_SCALE:
        raise OriginalStudyImportError(f"{where}: field time_unit={unit!r} is not one of {list(_TIME_SCALE)}")
    scale = _TIME_SCALE[unit]
    device = str(config.get("device", "unknown"))
    task = str(config.get("task", ds))
    counts = {"rebuilt_ids": 0, "per_token_changed": 0, "rows": 0}
    seen: dict[str, int] = {}
    rows: list[ProfileRow] = []
    for pos, rec in enumerate(doc["per_sample_results"]):
        here = f"{where}: per_sample_results[{pos}]"
        sid, rebuilt = _sample_id(rec.get("sample_id"), str(ds), str(sp), pos)
        counts["rebuilt_ids"] += int(rebuilt)
        vision = float(_get(rec, "T_vision_ms", here)) * scale
        prefill = float(_get(rec, "T_prefill_ms", here)) * scale
        decode = float(_get(rec, "T_decode_ms", here)) * scale
        out_tokens = int(_get(rec, "output_tokens", here))
        per_token = decode_per_token_ms(decode, out_tokens)
        original = rec.get("T_decode_per_token")
        if original is not None and not math.isclose(float(original) * scale, per_token, rel_tol=1e-6, abs_tol=1e-9):
            counts["per_token_changed"] += 1
        crops = _get(rec, "crops", here, default=None)
        vision_tokens = rec.get("vision_tokens")
        if crops is None and vision_tokens is None:
            raise OriginalStudyImportError(f"{here}: missing field crops (or vision_tokens)")
        crops = int(crops) if crops is not None else int(vision_tokens) // space.tokens_per_crop - 1
        vision_tokens = int(vision_tokens) if vision_tokens is not None else space.vision_tokens(crops)
        accuracy = _get(rec, "accuracy", here, default=math.nan)
        answers = _get(rec, "answers", here, default=[])
        if isinstance(answers, str):
            answers = [answers]
        run_index = int(rec.get("run_index", seen.get(sid, 0)))
        seen[sid] = run_index + 1
        rows.append(
            ProfileRow(
                sample_id=sid, dataset=str(ds), task=str(rec.get("task", task)), question=str(_get(rec, "question", here, "")),
                tier=tier, crops=crops, vision_tokens=vision_tokens, text_tokens=int(_get(rec, "text_tokens", here)),
                top_k=top_k, num_active_blocks=blocks,
                active_blocks=tuple(int(b) for b in rec.get("active_blocks", config.get("active_blocks", ()))),
                output_tokens=out_tokens, T_vision_ms=vision, T_prefill_ms=prefill, T_decode_ms=decode,
                T_decode_per_token_ms=per_token, T_total_ms=vision + prefill + decode,
                accuracy=float(accuracy), prediction=str(_get(rec, "prediction", here, "")),
                answers=tuple(str(a) for a in answers), run_index=run_index, device=str(rec.get("device", device)),
                backend=backend,
            )
        )
    counts["rows"] = len(rows)
    return rows, counts


def import_original_study(
    src_dir: str | Path,
    backend: str = "molmoe_arch",
    dataset: str | None = None,
    split: str | None = None,
    time_unit: str = "ms",
) -> ImportResult:
    """Read every per-config JSON file of `src_dir` into one validated profile table.

    `backend` names the knob space the configs must lie in (MolmoE-1B's options are molmoe_arch's);
    `dataset`/`split` override what the files say.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise OriginalStudyImportError(f"original study directory {src} does not exist")
    files = sorted(src.glob("*.json"))
    if not files:
        raise OriginalStudyImportError(f"original study directory {src} holds no *.json files")
    all_rows: list[ProfileRow] = []
    totals = {"rebuilt_ids": 0, "per_token_changed": 0, "rows": 0, "skipped_file": 0}
    result = ImportResult(frame=pd.DataFrame())
    for path in files:
        rows, counts = _read_file(path, backend, dataset, split, time_unit)
        if counts.get("skipped_file"):
            result.notes.append(f"skipped {path.name}: no per_sample_results")
            continue
        result.files_read.append(str(path))
        all_rows.extend(rows)
        for k, v in counts.items():
            totals[k] += v
    if not all_rows:
        raise OriginalStudyImportError(f"original study directory {src} has no file with per_sample_results")
    if totals["rebuilt_ids"]:
        result.notes.append(
            f"{totals['rebuilt_ids']} row(s) had a batch-index sample_id; ids rebuilt as <dataset>:<split>:<position>"
        )
    if totals["per_token_changed"]:
        result.notes.append(
            f"{totals['per_token_changed']} row(s): T_decode_per_token recomputed as T_decode / (output_tokens - 1) "
            "(the original divided by output_tokens)"
        )
    result.notes.append("T_total_ms recomputed as T_vision_ms + T_prefill_ms + T_decode_ms")
    result.frame = validate_profile(rows_to_frame(all_rows), source=str(src))
    return result


def import_into_store(src_dir: str | Path, store: ProfileStore, **kwargs: Any) -> ImportResult:
    """Import `src_dir` and append the rows to `store` (rows whose key is already there are skipped)."""
    result = import_original_study(src_dir, **kwargs)
    existing = store.existing_keys()
    df = result.frame
    keys = row_keys(df)
    fresh = df.loc[[(s, c, int(r)) not in existing for s, c, r in keys.itertuples(index=False)]]
    if len(fresh) < len(df):
        result.notes.append(f"{len(df) - len(fresh)} row(s) already in {store.results_dir}, not appended again")
    store.append(fresh, shard="import")
    return result
