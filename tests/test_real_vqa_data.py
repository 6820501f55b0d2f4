"""Real VQA readers: TextVQA 0.5.1, VQA v2 and OK-VQA from tiny files in their published layouts, one-line
errors for bad input, and the official leave-one-out VQA accuracy on hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from core.vqa.metrics import vqa_score
from core.vqa.real_data import (DEFAULT_MAX_NEW_TOKENS, RealDataError, load_real_split,
                                official_vqa_accuracy)

TEXT_VQA_ANSWERS = [["stop"] * 10, ["coca cola"] * 7 + ["coke"] * 3, ["nokia"] * 10]


def _write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def _write_image(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path, format="JPEG")
    return path


def _text_vqa(root: Path, split: str = "val") -> Path:
    """Three questions on images of widths 40, 50, 60 px; the test split without answers."""
    folder = root / "text_vqa"
    entries = []
    for i, answers in enumerate(TEXT_VQA_ANSWERS):
        entry = {"question_id": 100 + i, "question": f"what does sign {i} say?", "image_id": f"img{i:04x}",
                 "image_classes": ["sign"], "flickr_original_url": "", "set_name": split}
        if split != "test":
            entry["answers"] = answers
        entries.append(entry)
        image_dir = "test_images" if split == "test" else "train_images"
        _write_image(folder / image_dir / f"img{i:04x}.jpg", (40 + 10 * i, 30))
    return _write_json(folder / f"TextVQA_0.5.1_{split}.json",
                       {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": entries})


def _vqa_answers(answers: list[str]) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]


def _coco_vqa(root: Path, dataset: str = "coco_2014_vqa", split: str = "val", image_folder: str | None = None) -> None:
    """Three questions, two on image 42 and one on image 7; annotations listed in another order than questions."""
    prefix = "v2_" if dataset == "coco_2014_vqa" else ""
    questions = [
        {"question_id": 420, "image_id": 42, "question": "what color is the bus?"},
        {"question_id": 421, "image_id": 42, "question": "how many wheels?"},
        {"question_id": 70, "image_id": 7, "question": "is it raining?"},
    ]
    answers = {420: ["red"] * 8 + ["orange"] * 2, 421: ["4"] * 6 + ["6"] * 4, 70: ["no"] * 10}
    annotations = [{"question_id": q["question_id"], "image_id": q["image_id"],
                    "answers": _vqa_answers(answers[q["question_id"]]),
                    "multiple_choice_answer": answers[q["question_id"]][0], "answer_type": "other",
                    "question_type": "what"}
                   for q in reversed(questions)]
    _write_json(root / dataset / f"{prefix}OpenEnded_mscoco_{split}2014_questions.json",
                {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": f"{split}2014",
                 "questions": questions})
    _write_json(root / dataset / f"{prefix}mscoco_{split}2014_annotations.json",
                {"data_type": "mscoco", "data_subtype": f"{split}2014", "annotations": annotations})
    images = root / (image_folder or dataset) / f"{split}2014"
    _write_image(images / f"COCO_{split}2014_000000000042.jpg", (64, 48))
    _write_image(images / f"COCO_{split}2014_000000000007.jpg", (32, 24), mode="L")


def test_text_vqa_val_reads_questions_ten_answers_and_train_images_in_file_order(tmp_path):
    _text_vqa(tmp_path, "val")
    samples = load_real_split(tmp_path, "text_vqa", "val")
    assert [s.sample_id for s in samples] == ["text_vqa:val:0", "text_vqa:val:1", "text_vqa:val:2"]
    assert [s.question for s in samples] == ["what does sign 0 say?", "what does sign 1 say?", "what does sign 2 say?"]
    assert [list(s.answers) for s in samples] == TEXT_VQA_ANSWERS
    assert [s.image.size for s in samples] == [(40, 30), (50, 30), (60, 30)]
    assert all(s.dataset == s.task == "text_vqa" and s.max_new_tokens == DEFAULT_MAX_NEW_TOKENS for s in samples)


def test_text_vqa_train_split_reads_its_own_file(tmp_path):
    _text_vqa(tmp_path, "train")
    samples = load_real_split(tmp_path, "text_vqa", "train")
    assert [s.sample_id for s in samples] == ["text_vqa:train:0", "text_vqa:train:1", "text_vqa:train:2"]
    with pytest.raises(RealDataError, match="TextVQA_0.5.1_val.json: file not found"):
        load_real_split(tmp_path, "text_vqa", "val")


def test_text_vqa_test_split_has_no_answers_and_reads_test_images(tmp_path):
    _text_vqa(tmp_path, "test")
    samples = load_real_split(tmp_path, "text_vqa", "test")
    assert [s.answers for s in samples] == [(), (), ()]
    assert [s.image.size for s in samples] == [(40, 30), (50, 30), (60, 30)]


def test_coco_vqa_joins_annotations_by_question_id_and_names_coco_images(tmp_path):
    _coco_vqa(tmp_path)
    samples = load_real_split(tmp_path, "coco_2014_vqa", "val")
    assert [s.sample_id for s in samples] == ["coco_2014_vqa:val:0", "coco_2014_vqa:val:1", "coco_2014_vqa:val:2"]
    assert [s.question for s in samples] == ["what color is the bus?", "how many wheels?", "is it raining?"]
    assert samples[0].answers == ("red",) * 8 + ("orange",) * 2
    assert samples[1].answers == ("4",) * 6 + ("6",) * 4
    assert samples[2].answers == ("no",) * 10
    assert [s.image.size for s in samples] == [(64, 48), (64, 48), (32, 24)]
    assert samples[2].image.mode == "RGB"  # a greyscale COCO image comes converted
    assert samples[0].image is samples[1].image  # two questions on image 42 share one decoded image


def test_okvqa_reads_its_own_files_and_images(tmp_path):
    _coco_vqa(tmp_path, dataset="okvqa", split="train")
    samples = load_real_split(tmp_path, "okvqa", "train")
    assert [s.sample_id for s in samples] == ["okvqa:train:0", "okvqa:train:1", "okvqa:train:2"]
    assert all(s.task == "okvqa" for s in samples)
    assert [s.image.size for s in samples] == [(64, 48), (64, 48), (32, 24)]


def test_okvqa_falls_back_to_the_shared_coco_image_folder(tmp_path):
    _coco_vqa(tmp_path, dataset="okvqa", image_folder="coco_2014_vqa")
    assert not (tmp_path / "okvqa" / "val2014").exists()
    samples = load_real_split(tmp_path, "okvqa", "val")
    assert [s.image.size for s in samples] == [(64, 48), (64, 48), (32, 24)]


def test_limit_takes_a_prefix_and_opens_only_its_images(tmp_path):
    _coco_vqa(tmp_path)
    (tmp_path / "coco_2014_vqa" / "val2014" / "COCO_val2014_000000000007.jpg").unlink()  # the third question's
    samples = load_real_split(tmp_path, "coco_2014_vqa", "val", limit=2)
    assert [s.sample_id for s in samples] == ["coco_2014_vqa:val:0", "coco_2014_vqa:val:1"]
    assert load_real_split(tmp_path, "coco_2014_vqa", "val", limit=0) == []
    _text_vqa(tmp_path)
    assert len(load_real_split(tmp_path, "text_vqa", "val", limit=10)) == 3  # a limit beyond the split takes it all


def _error_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_json_file_names_the_path(tmp_path):
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, "coco_2014_vqa", "val")
    expected = tmp_path / "coco_2014_vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    assert _error_line(excinfo) == f"{expected}: file not found"


def test_invalid_json_names_the_path(tmp_path):
    path = _text_vqa(tmp_path)
    path.write_text('{"data": [')
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, "text_vqa", "val")
    assert _error_line(excinfo).startswith(f"{path}: invalid JSON (")


def test_missing_field_names_the_file_field_and_entry(tmp_path):
    path = _text_vqa(tmp_path)
    document = json.loads(path.read_text())
    del document["data"][2]["answers"]
    _write_json(path, document)
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, "text_vqa", "val", limit=1)  # checked even beyond the limit
    assert _error_line(excinfo) == f"{path}: field 'answers' missing in entry 2"


def test_missing_answer_in_a_vqa_annotation_names_the_field(tmp_path):
    _coco_vqa(tmp_path)
    path = tmp_path / "coco_2014_vqa" / "v2_mscoco_val2014_annotations.json"
    document = json.loads(path.read_text())
    del document["annotations"][1]["answers"][0]["answer"]
    _write_json(path, document)
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, "coco_2014_vqa", "val")
    assert _error_line(excinfo) == f"{path}: field 'answer' missing in entry 1"


def test_missing_image_names_the_image_path(tmp_path):
    _coco_vqa(tmp_path)
    image = tmp_path / "coco_2014_vqa" / "val2014" / "COCO_val2014_000000000007.jpg"
    image.unlink()
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, "coco_2014_vqa", "val")
    assert _error_line(excinfo) == f"{image}: image file not found (question_id 70)"


def test_okvqa_without_any_image_folder_names_both(tmp_path):
    _coco_vqa(tmp_path, dataset="okvqa", image_folder="elsewhere")
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, "okvqa", "val")
    assert _error_line(excinfo) == (f"{tmp_path / 'okvqa' / 'val2014'}: image folder not found "
                                    f"(nor the shared {tmp_path / 'coco_2014_vqa' / 'val2014'})")


def test_question_without_annotation_names_the_question(tmp_path):
    _coco_vqa(tmp_path)
    path = tmp_path / "coco_2014_vqa" / "v2_mscoco_val2014_annotations.json"
    document = json.loads(path.read_text())
    document["annotations"] = [a for a in document["annotations"] if a["question_id"] != 421]
    _write_json(path, document)
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, "coco_2014_vqa", "val")
    assert _error_line(excinfo) == (f"{path}: no annotation for question_id 421 "
                                    "(entry 1 of v2_OpenEnded_mscoco_val2014_questions.json)")


@pytest.mark.parametrize("dataset, split, limit, message", [
    ("vqav2", "val", None, "unknown dataset 'vqav2' (known: ['text_vqa', 'coco_2014_vqa', 'okvqa'])"),
    ("okvqa", "test", None, "unknown split 'test' of 'okvqa' (known: ['train', 'val'])"),
    ("text_vqa", "val", -1, "limit=-1 must be >= 0"),
])
def test_unknown_dataset_split_or_bad_limit_is_one_clear_error(tmp_path, dataset, split, limit, message):
    with pytest.raises(RealDataError) as excinfo:
        load_real_split(tmp_path, dataset, split, limit)
    assert _error_line(excinfo) == message
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("matches, accuracy", [
    (10, 1.0),
    (4, 1.0),  # every subset of nine keeps at least 3 matches
    (3, (7 * 1.0 + 3 * 2 / 3) / 10),  # 0.9: dropping one of the 3 matches leaves 2
    (2, (8 * 2 / 3 + 2 * 1 / 3) / 10),  # 0.6
    (1, (9 * 1 / 3 + 1 * 0.0) / 10),  # 0.3
    (0, 0.0),
])
def test_official_accuracy_is_the_leave_one_out_mean(matches, accuracy):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert official_vqa_accuracy("cat", answers) == pytest.approx(accuracy)


def test_official_accuracy_differs_from_vqa_score_with_three_matches():
    answers = ["cat"] * 3 + ["dog"] * 7
    assert vqa_score("cat", answers) == 1.0
    assert official_vqa_accuracy("cat", answers) == pytest.approx(0.9)


@pytest.mark.parametrize("prediction, answers, accuracy", [
    ("two", ["2"] * 10, 1.0),  # number words
    ("2", ["two"] * 10, 1.0),
    ("a dog", ["dog"] * 10, 1.0),  # articles
    ("The Dog", ["dog"] * 3 + ["cat"] * 7, 0.9),
    ("yes!", ["yes"] * 10, 1.0),  # punctuation
    ("yes", ["yes."] * 5 + ["no"] * 5, 1.0),
    ("1,000", ["1000"] * 10, 1.0),
    ("dogs", ["dog"] * 10, 0.0),  # no stemming
])
def test_official_accuracy_normalises_prediction_and_answers(prediction, answers, accuracy):
    assert official_vqa_accuracy(prediction, answers) == pytest.approx(accuracy)


def test_official_accuracy_needs_two_answers():
    with pytest.raises(ValueError, match="at least two human answers, got 1"):
        official_vqa_accuracy("cat", ["cat"])
