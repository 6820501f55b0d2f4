"""Readers for the real VQA benchmarks of the original study, from local files in their published layouts.

The synthetic suite (`core.vqa.suite`) stands in for these data sets wherever the platform trains; this
module reads the real ones, when a person has downloaded them, into the same `VQASample` records, so every
study can run on either. Nothing is downloaded here: the files must already sit under one data root.

Data sets keep the names the original study used, each in its own folder under the root:

  text_vqa       TextVQA 0.5.1 (Singh et al., "Towards VQA Models That Can Read", CVPR 2019; files from
                 https://textvqa.org/dataset). `text_vqa/TextVQA_0.5.1_<split>.json` holds
                 {"data": [{"question_id", "question", "image_id", "answers": [10 strings], ...}]}.
                 Images are `text_vqa/train_images/<image_id>.jpg` for both train and val (val images are
                 drawn from the same Open Images train set) and `text_vqa/test_images/<image_id>.jpg` for
                 test, whose questions carry no answers.
  coco_2014_vqa  VQA v2 (Goyal et al., CVPR 2017; https://visualqa.org/download.html, formats in the README
                 of the VQA API, github.com/GT-Vision-Lab/VQA). Questions in
                 `coco_2014_vqa/v2_OpenEnded_mscoco_<split>2014_questions.json` as
                 {"questions": [{"question_id", "image_id", "question"}]}; answers in
                 `coco_2014_vqa/v2_mscoco_<split>2014_annotations.json` as {"annotations": [{"question_id",
                 "image_id", "answers": [{"answer", "answer_confidence", "answer_id"}, ...],
                 "multiple_choice_answer", "answer_type", "question_type"}]}, joined on question_id. Images
                 are COCO 2014: `coco_2014_vqa/<split>2014/COCO_<split>2014_<image_id:012d>.jpg`.
  okvqa          OK-VQA (Marino et al., CVPR 2019; https://okvqa.allenai.org): the VQA v2 layout under
                 `okvqa/`, files `OpenEnded_mscoco_<split>2014_questions.json` and
                 `mscoco_<split>2014_annotations.json`. Its images are the same COCO 2014 files, read from
                 `okvqa/<split>2014/` or, when that folder is absent, from the shared
                 `coco_2014_vqa/<split>2014/`, so COCO need not be stored twice.

Splits are `train` and `val` (TextVQA also `test`). Samples come in question-file order with sample_id
"<dataset>:<split>:<index>", as in the synthetic suite. Every question's JSON entry is checked before any
image is read; images are decoded, as RGB, only for the first `limit` questions, and questions on the same
image share one decoded image (VQA v2 asks about five questions per image).

Scoring: `core.vqa.metrics.vqa_score` is the common shortcut min(#matching answers / 3, 1) over all ten
answers. The official VQA accuracy (vqaEval.py of the VQA API) averages that over the ten leave-one-out
subsets of nine answers, which differs whenever 1 to 3 answers match (3 matches: 1.0 against 0.9), so
`official_vqa_accuracy` computes it here, on `normalize_answer`, applied to the prediction and to every
human answer alike. vqaEval.py normalises the human answers less (punctuation only, and only when they
disagree: the VQA v2 files come pre-normalised), keeps apostrophes and expands contractions ("dont" ->
"don't"), where `normalize_answer` turns apostrophes into spaces; on both sides alike, so matches rarely
differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError

from core.vqa.metrics import normalize_answer
from core.vqa.sample import VQASample

DATASETS: tuple[str, ...] = ("text_vqa", "coco_2014_vqa", "okvqa")
SPLITS: dict[str, tuple[str, ...]] = {
    "text_vqa": ("train", "val", "test"),
    "coco_2014_vqa": ("train", "val"),
    "okvqa": ("train", "val"),
}
# VQA answers are one to three words; TextVQA's are read-off strings that can run longer (brand names,
# phone numbers), so leave room beyond the synthetic suite's 4-8 tokens.
DEFAULT_MAX_NEW_TOKENS = 16
# The question and annotation files of the two COCO-based data sets differ only by a prefix.
_COCO_FILE_PREFIX: dict[str, str] = {"coco_2014_vqa": "v2_", "okvqa": ""}


class RealDataError(ValueError):
    """A real VQA file is missing, malformed or inconsistent; the one-line message names the file and field."""


@dataclass(frozen=True)
class _Question:
    question_id: int | str  # kept only to name the question in error messages
    question: str
    image_path: Path
    answers: tuple[str, ...]


def _read_json(path: Path, top_level_key: str) -> list[dict[str, Any]]:
    """The list of entries under `top_level_key` of the JSON file at `path`."""
    if not path.is_file():
        raise RealDataError(f"{path}: file not found")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RealDataError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(document, dict) or top_level_key not in document:
        raise RealDataError(f"{path}: field {top_level_key!r} missing at the top level")
    entries = document[top_level_key]
    if not isinstance(entries, list):
        raise RealDataError(f"{path}: field {top_level_key!r} is not a list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RealDataError(f"{path}: entry {index} of {top_level_key!r} is not an object")
    return entries


def _field(path: Path, entry: dict[str, Any], index: int, name: str, kind: type | tuple[type, ...]) -> Any:
    """entry[name], checked to be of `kind` (bool is never taken for an int)."""
    if name not in entry:
        raise RealDataError(f"{path}: field {name!r} missing in entry {index}")
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RealDataError(f"{path}: field {name!r} in entry {index} has the wrong type ({type(value).__name__})")
    return value


def _answer_strings(path: Path, answers: list[Any], index: int, answer_key: str | None) -> tuple[str, ...]:
    """The human answers as strings: TextVQA lists strings, VQA v2 lists {"answer": ...} objects."""
    if not answers:
        raise RealDataError(f"{path}: field 'answers' in entry {index} is empty")
    if answer_key is None:
        if not all(isinstance(a, str) for a in answers):
            raise RealDataError(f"{path}: field 'answers' in entry {index} holds a non-string")
        return tuple(answers)
    if not all(isinstance(a, dict) for a in answers):
        raise RealDataError(f"{path}: field 'answers' in entry {index} holds a non-object")
    return tuple(_field(path, a, index, answer_key, str) for a in answers)


def _text_vqa_questions(root: Path, split: str) -> list[_Question]:
    folder = root / "text_vqa"
    path = folder / f"TextVQA_0.5.1_{split}.json"
    image_dir = folder / ("test_images" if split == "test" else "train_images")
    questions = []
    for index, entry in enumerate(_read_json(path, "data")):
        answers: tuple[str, ...] = ()
        if split != "test":  # the test split's answers are held back by the benchmark's server
            answers = _answer_strings(path, _field(path, entry, index, "answers", list), index, None)
        image_id = _field(path, entry, index, "image_id", str)
        questions.append(_Question(_field(path, entry, index, "question_id", (int, str)),
                                   _field(path, entry, index, "question", str), image_dir / f"{image_id}.jpg", answers))
    return questions


def _coco_image_dir(root: Path, dataset: str, split: str) -> Path:
    own = root / dataset / f"{split}2014"
    shared = root / "coco_2014_vqa" / f"{split}2014"
    if own.is_dir() or dataset == "coco_2014_vqa":
        return own
    if shared.is_dir():
        return shared
    raise RealDataError(f"{own}: image folder not found (nor the shared {shared})")


def _coco_vqa_questions(root: Path, dataset: str, split: str) -> list[_Question]:
    prefix = _COCO_FILE_PREFIX[dataset]
    questions_path = root / dataset / f"{prefix}OpenEnded_mscoco_{split}2014_questions.json"
    annotations_path = root / dataset / f"{prefix}mscoco_{split}2014_annotations.json"
    question_entries = _read_json(questions_path, "questions")
    answers_by_question_id = {}
    for index, entry in enumerate(_read_json(annotations_path, "annotations")):
        question_id = _field(annotations_path, entry, index, "question_id", int)
        answer_list = _field(annotations_path, entry, index, "answers", list)
        answers_by_question_id[question_id] = _answer_strings(annotations_path, answer_list, index, "answer")
    image_dir = _coco_image_dir(root, dataset, split)
    questions = []
    for index, entry in enumerate(question_entries):
        question_id = _field(questions_path, entry, index, "question_id", int)
        if question_id not in answers_by_question_id:
            raise RealDataError(f"{annotations_path}: no annotation for question_id {question_id} "
                                f"(entry {index} of {questions_path.name})")
        image_id = _field(questions_path, entry, index, "image_id", int)
        image_path = image_dir / f"COCO_{split}2014_{image_id:012d}.jpg"
        questions.append(_Question(question_id, _field(questions_path, entry, index, "question", str), image_path,
                                   answers_by_question_id[question_id]))
    return questions


def _load_image(question: _Question) -> Image.Image:
    if not question.image_path.is_file():
        raise RealDataError(f"{question.image_path}: image file not found (question_id {question.question_id})")
    try:
        with Image.open(question.image_path) as image:
            return image.convert("RGB")  # COCO and TextVQA hold some greyscale and CMYK images
    except (UnidentifiedImageError, OSError) as err:
        raise RealDataError(f"{question.image_path}: unreadable image ({err})") from err


def _questions(root: Path, dataset: str, split: str) -> list[_Question]:
    if dataset not in DATASETS:
        raise RealDataError(f"unknown dataset {dataset!r} (known: {list(DATASETS)})")
    if split not in SPLITS[dataset]:
        raise RealDataError(f"unknown split {split!r} of {dataset!r} (known: {list(SPLITS[dataset])})")
    return _text_vqa_questions(root, split) if dataset == "text_vqa" else _coco_vqa_questions(root, dataset, split)


def split_size(data_root: str | Path, dataset: str, split: str) -> int:
    """How many questions `split` of `dataset` holds under `data_root` (its files checked, no image read)."""
    return len(_questions(Path(data_root), dataset, split))


def split_digest(data_root: str | Path, dataset: str, split: str, indices: Sequence[int]) -> str:
    """Content hash of those questions of `split`: their text, answers and image files' bytes (read raw, not
    decoded), so a changed annotation or image changes it."""
    questions = _questions(Path(data_root), dataset, split)
    h = hashlib.sha256()
    for index in indices:
        if not 0 <= int(index) < len(questions):
            raise RealDataError(f"{dataset}:{split}:{index} is not a question of {dataset} {split} (it has {len(questions)})")
        question = questions[int(index)]
        if not question.image_path.is_file():
            raise RealDataError(f"{question.image_path}: image file not found (question_id {question.question_id})")
        h.update("|".join((f"{dataset}:{split}:{index}", question.question, *question.answers)).encode())
        h.update(question.image_path.read_bytes())
    return h.hexdigest()[:16]


def load_real_split(data_root: str | Path, dataset: str, split: str, limit: int | None = None,
                    indices: Sequence[int] | None = None) -> list[VQASample]:
    """The first `limit` questions (default: all) of `split` of a real data set under `data_root`, in file order.

    `dataset` is one of DATASETS, laid out under `data_root` as the module docstring describes. Each sample's
    answers are the human answers as strings (none for TextVQA's test split), its task the data set's name.
    A `limit` beyond the split's size returns the whole split. `indices` (instead of `limit`) picks those
    questions of the file, in that order, and decodes only their images. Raises RealDataError for an unknown data set
    or split, a negative limit, a missing or malformed file or field, a question without an annotation, or
    a missing image among those loaded.
    """
    if limit is not None and limit < 0:
        raise RealDataError(f"limit={limit} must be >= 0")
    questions = _questions(Path(data_root), dataset, split)
    if indices is not None:
        if (bad := [i for i in indices if not 0 <= int(i) < len(questions)]):
            raise RealDataError(f"{dataset}:{split}:{bad[0]} is not a question of {dataset} {split} "
                                f"(it has {len(questions)})")
        chosen = [(int(i), questions[int(i)]) for i in indices]
    else:
        chosen = list(enumerate(questions[:limit]))
    images: dict[Path, Image.Image] = {}
    samples = []
    for index, question in chosen:
        if question.image_path not in images:
            images[question.image_path] = _load_image(question)
        samples.append(VQASample(
            sample_id=f"{dataset}:{split}:{index}",
            dataset=dataset,
            task=dataset,
            image=images[question.image_path],
            question=question.question,
            answers=question.answers,
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        ))
    return samples


def official_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of vqaEval.py: over the leave-one-out subsets of the human answers (nine of ten),
    the mean of min(#answers in the subset equal to the prediction / 3, 1), after `normalize_answer` on both.

    E.g. 3 matches among 10 answers: 7 subsets keep all 3 (1.0), 3 keep 2 (2/3), mean 0.9. Needs at least
    two answers, since with one every subset is empty.
    """
    if len(answers) < 2:
        raise ValueError(f"official_vqa_accuracy needs at least two human answers, got {len(answers)}")
    normalized_prediction = normalize_answer(prediction)
    matches = [normalize_answer(answer) == normalized_prediction for answer in answers]
    total = sum(matches)
    # Leaving answer i out removes one match exactly when answer i matched.
    return sum(min((total - matched) / 3.0, 1.0) for matched in matches) / len(matches)
