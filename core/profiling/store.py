"""Profiling tables at rest: Parquet parts under `results_dir/<dataset>/part-<shard>-<n>.parquet`.

Every `append` writes a new part file (a tmp file named for this process, then os.replace), so a
killed sweep never leaves a half-written part. Concurrent writers (several `profile` processes on one
results directory, same shard or not) take an advisory lock (`fcntl.flock` on `<results_dir>/.lock`)
while they pick a part number and rename, so no writer replaces another's part. `load` reads all
parts, validates each against the schema (errors name the file) and drops duplicate row keys (keeping
the earliest), so an overlap from a rerun or from two sweeps of one shard never double-counts. A part
that cannot be read (a corrupt footer, or data pages failing their checksum) is moved aside as
`<part>.corrupt` with a one-line warning naming it; its rows are no longer "existing", so the next
sweep measures them again. `merge` compacts the parts into one per dataset.

Row key = (sample_id, KnobConfig.key, run_index).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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
LOCK_FILE = ".lock"  # the advisory lock writers of one results directory share
CORRUPT_SUFFIX = ".corrupt"  # a part that could not be read, moved aside (no longer matches _PART_RE)

_log = logging.getLogger(__name__)


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
    # The tmp name is this process's own: two writers never write into one tmp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        # Page checksums let a read detect corrupted data pages (verified in `_read_part`).
        df.to_parquet(tmp, index=False, write_page_checksum=True)
        os.replace(tmp, path)  # atomic on one filesystem: readers see the whole file or none
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(text: str, path: Path) -> None:
    """`path` replaced by `text` in one rename (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ProfileStore:
    """Parquet profile parts partitioned by dataset under `results_dir`."""

    def __init__(self, results_dir: str | os.PathLike[str]) -> None:
        self.results_dir = Path(results_dir)

    def check_writable(self) -> None:
        """ProfileStoreError (one line) when results_dir cannot become a directory this process writes:
        checked before a sweep starts, so no timed row is lost at its first flush."""
        path = self.results_dir.absolute()
        if path.exists() and not path.is_dir():
            raise ProfileStoreError(f"results_dir {self.results_dir} is a file, not a directory")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ProfileStoreError(f"results_dir {self.results_dir}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ProfileStoreError(f"results_dir {self.results_dir}: {existing} is not writable")

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """The results directory's advisory lock (exclusive; a second writer waits for it)."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with open(self.results_dir / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_part(self, path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
        """The part's rows; None (and the part moved aside with a one-line warning) when it is unreadable."""
        try:
            return pd.read_parquet(path, columns=list(columns) if columns else None, page_checksum_verification=True)
        except FileNotFoundError:
            return None  # moved aside or merged by another process meanwhile
        except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ArrowException... for damaged files
            aside = path.with_name(path.name + CORRUPT_SUFFIX)
            reason = " ".join(str(exc).split())[:200]
            try:
                with self.writer_lock():
                    if path.exists():
                        os.replace(path, aside)
            except OSError as move_error:  # e.g. a read-only table
                raise ProfileStoreError(f"corrupt profile part {path} ({type(exc).__name__}: {reason}); cannot move it "
                                        f"aside ({move_error.strerror}): delete or restore it") from None
            _log.warning("warning: corrupt profile part %s moved aside to %s (%s: %s); its rows will be measured again",
                         path, aside.name, type(exc).__name__, reason)
            return None

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
            # Whole parts, not only the key columns: every page's checksum is checked, so a part with a
            # damaged latency column does not count as measured.
            df = self._read_part(path)
            if df is None:
                continue
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
            if (part := self._read_part(path)) is not None:
                frames.append(validate_profile(part, source=str(path)))
        if not frames:
            raise ProfileStoreError(f"profile results directory {self.results_dir} holds no readable part files")
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
        with self.writer_lock():  # the part number is free until the rename: nobody else picks it meanwhile
            d.mkdir(parents=True, exist_ok=True)
            # Numbers of parts moved aside stay taken, so a new part never meets an old one's name.
            taken = [int(m["n"]) for p in d.iterdir() if (m := _PART_RE.match(p.name.removesuffix(CORRUPT_SUFFIX)))
                     and m["shard"] == shard]
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
