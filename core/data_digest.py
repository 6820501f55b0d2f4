"""Content hash of a table: what a run's `data_digest` tag records, and what a resumed training
compares against the checkpoint's (so a resume never continues on other data)."""

from __future__ import annotations

import hashlib

import pandas as pd


def frame_digest(frame: pd.DataFrame) -> str:
    """Short content hash of a dataframe (values, index and column names)."""
    hashed = pd.util.hash_pandas_object(frame, index=True).values.tobytes()
    return hashlib.sha256(hashed + "|".join(map(str, frame.columns)).encode()).hexdigest()[:16]
