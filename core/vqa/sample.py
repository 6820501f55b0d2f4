"""The request record every study passes around: an image, a question and its reference answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
from PIL import Image


@dataclass(frozen=True)
class VQASample:
    """One request: an image and a question, with the reference answers."""

    sample_id: str  # "<dataset>:<split>:<index>", stable across workers and runs
    dataset: str
    task: str
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    max_new_tokens: int


def dataset_of(sample_id: str) -> str:
    """The data set a sample id ("<dataset>:<split>:<index>") names."""
    return sample_id.split(":", 1)[0]


def samples_frame(samples: Sequence[VQASample]) -> pd.DataFrame:
    """One row per sample (sample_id, dataset, question, answers joined by "|"): a split as a table,
    e.g. for a run's dataset inputs."""
    return pd.DataFrame([{"sample_id": s.sample_id, "dataset": s.dataset, "question": s.question,
                          "answers": "|".join(s.answers)} for s in samples])
