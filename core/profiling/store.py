"""Profiling tables at rest: Parquet parts under `results_dir/<dataset>/part-<shard>-<n>.parquet`.

Every `append` writes a new part file (tmp file, then os.replace), so a killed sweep never leaves a
half-written part and concurrent shards never write the same file. `load` reads all parts, validates
each against the schema (errors name the file) and drops duplicate row keys (keeping the earliest),
so an overlap from a rerun can never double-count. `merge` compacts the parts into one per dataset.

Row key = (sample_id, KnobConfig.key, run_index).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from core.profiling.schema import (
    PROFILE_COLUMNS,
    ROW_KEY_FIELDS,
    ProfileRow,
    ProfileSchemaError,
    config_keys,
    rows_to_frame,
    validate_profile,
)

RowKey = tuple[str, str, int]

_PART_RE = re.compile(r"^part-(?P<shard>[A-Za-z0-9_]+)-(?P<n>\d+)\.parquet$")
_MERGED_SHARD = "merged"


class ProfileStoreError(ValueError):
    """A results directory that cannot be read as a profile store (one-line message naming the path)."""


def _part_sort_key(path: Path) -> tuple[int, str, int]:
    m = _PART_RE.match(path.name)
    assert m is not None
    shard = m["shard"]
    # Merged parts first (they hold the earliest rows), then shards in numeric order, then by n.
    return (0 if shard == _MERGED_SHARD else 1, shard.zfill(8), int(m["n"]))


def _check_dataset_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ProfileStoreError(f"dataset name {name!r} cannot be used as a directory name")
    return name


def _atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)  # atomic on one filesystem: readers see the whole file or none


class ProfileStore:
    """Parquet profile parts partitioned by dataset under `results_dir`."""

    def __init__(self, results_dir: str | os.PathLike[str]) -> None:
        self.results_dir = Path(results_dir)

    # --- reading -------------------------------------------------------------------------------
    def part_files(self, dataset_names: Sequence[str] | None = None) -> list[Path]:
        """Part files (completed ones only; leftover tmp files are ignored), in write order."""
        if not self.results_dir.is_dir():
            return []
        dirs = sorted(p for p in self.results_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if dataset_names is not None:
            wanted = set(dataset_names)
            dirs = [d for d in dirs if d.name in wanted]
        files: list[Path] = []
        for d in dirs:
            files.extend(sorted((p for p in d.iterdir() if _PART_RE.match(p.name)), key=_part_sort_key))
        return files

    def datasets(self) -> list[str]:
        """Dataset names that have at least one part file."""
        return sorted({p.parent.name for p in self.part_files()})

    def existing_keys(self) -> set[RowKey]:
        """Row keys already stored; empty for a missing or empty results directory (a fresh sweep)."""
        keys: set[RowKey] = set()
        for path in self.part_files():
            df = pd.read_parquet(path, columns=list(ROW_KEY_FIELDS))
            keys.update(zip(df["sample_id"].astype(str), config_keys(df), df["run_index"].astype("int64").map(int)))
        return keys

    def load(self, dataset_names: Sequence[str] | None = None) -> pd.DataFrame:
        """All stored rows (of `dataset_names`, default all), validated, one row per row key.

        Raises ProfileStoreError for a missing/empty results directory or an unknown dataset name,
        ProfileSchemaError (naming the file) for a part that breaks the schema.
        """
        if not self.results_dir.is_dir():
            raise ProfileStoreError(f"profile results directory {self.results_dir} does not exist")
        known = self.datasets()
        if not known:
            raise ProfileStoreError(f"profile results directory {self.results_dir} holds no part files")
        if dataset_names is not None:
            unknown = [d for d in dataset_names if d not in known]
            if unknown:
                raise ProfileStoreError(
                    f"dataset(s) {unknown} not in profile results directory {self.results_dir} (has {known})"
                )
        frames = []
        for path in self.part_files(dataset_names):
            frames.append(validate_profile(pd.read_parquet(path), source=str(path)))
        df = pd.concat(frames, ignore_index=True)
        return self._dedupe(df)

    @staticmethod
    def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
        key = df["sample_id"] + "|" + config_keys(df) + "|" + df["run_index"].astype(str)
        return df.loc[~key.duplicated(keep="first")].reset_index(drop=True)

    # --- writing -------------------------------------------------------------------------------
    def append(self, rows: Sequence[ProfileRow] | pd.DataFrame, shard: int | str = 0) -> list[Path]:
        """Validate `rows` and write them as one new part file per dataset; returns the paths written."""
        df = rows if isinstance(rows, pd.DataFrame) else rows_to_frame(list(rows))
        if df.empty:
            return []
        df = validate_profile(df, source=f"rows appended to {self.results_dir}")
        written = []
        for dataset, part in df.groupby("dataset", sort=True):
            written.append(self._write_part(part[list(PROFILE_COLUMNS)], str(dataset), str(shard)))
        return written

    def _write_part(self, df: pd.DataFrame, dataset: str, shard: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_]+", shard):
            raise ProfileStoreError(f"shard label {shard!r} must be letters, digits or '_'")
        d = self.results_dir / _check_dataset_name(dataset)
        d.mkdir(parents=True, exist_ok=True)
        taken = [int(m["n"]) for p in d.iterdir() if (m := _PART_RE.match(p.name)) and m["shard"] == shard]
        path = d / f"part-{shard}-{max(taken, default=-1) + 1}.parquet"
        _atomic_write_parquet(df.reset_index(drop=True), path)
        return path

    def merge(self, out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
        """Compact every dataset's parts into one deduplicated file.

        With `out_dir`, writes `out_dir/<dataset>/part-merged-0.parquet` and leaves this store as is;
        without, rewrites this store in place (the merged file is in place before old parts go).
        """
        datasets = self.datasets()
        if not datasets:
            raise ProfileStoreError(f"profile results directory {self.results_dir} holds no part files")
        target = ProfileStore(out_dir) if out_dir is not None else self
        written = []
        for dataset in datasets:
            old = self.part_files([dataset])
            df = self.load([dataset])
            if out_dir is not None:
                dest_dir = target.results_dir / dataset
                dest_dir.mkdir(parents=True, exist_ok=True)
                for stale in dest_dir.glob("part-*.parquet"):
                    stale.unlink()
                path = dest_dir / f"part-{_MERGED_SHARD}-0.parquet"
                _atomic_write_parquet(df, path)
            else:
                path = self._write_part(df, dataset, _MERGED_SHARD)
                for p in old:
                    if p != path:
                        p.unlink()
            written.append(path)
        return written


def keys_of_rows(rows: Iterable[ProfileRow]) -> set[RowKey]:
    """Row keys of in-memory rows."""
    return {(r.sample_id, r.config_key, int(r.run_index)) for r in rows}


__all__ = ["ProfileStore", "ProfileStoreError", "ProfileSchemaError", "RowKey", "keys_of_rows"]
