"""VQA answer scoring: the usual normalisation, the VQA score and exact match.

The normalisation follows the VQA v2 evaluation: lower-case, strip punctuation (keeping decimal
points and commas inside numbers), number words to digits, drop articles, fix spacing.
"""

from __future__ import annotations

import re
from typing import Sequence

_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$'")  # '.' and ':' handled separately
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    text = _COMMA_IN_NUMBER.sub(r"\1\3", text)  # 1,000 -> 1000
    out = []
    for ch in text:
        if ch in _PUNCTUATION or ch == ":":
            out.append(" ")
        else:
            out.append(ch)
    return _PERIOD_STRIP.sub("", "".join(out))


def normalize_answer(s: str) -> str:
    """VQA-normalised answer: 'The Two Dogs!' -> '2 dogs'."""
    text = _strip_punctuation(s.lower().replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """min(#reference answers equal to the prediction after normalisation / 3, 1)."""
    if not answers:
        raise ValueError("vqa_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    return min(matches / 3.0, 1.0)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer")
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) == pred for a in answers))
