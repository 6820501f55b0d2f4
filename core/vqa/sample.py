"""The request record every study passes around: an image, a question and its reference answers."""

from __future__ import annotations

from dataclasses import dataclass

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
