"""VQA scoring: normalisation, the 3-match cap, number words, exact match."""

import pytest

from core.vqa.metrics import exact_match, normalize_answer, vqa_score


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The Cat!", "cat"),
        ("  a   Red  BALL. ", "red ball"),
        ("two", "2"),
        ("Three dogs", "3 dogs"),
        ("an apple, please?", "apple please"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("lamp bird", "lamp bird"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_score_counts_matches_over_three_and_caps_at_one():
    answers = ["red", "red", "blue", "green", "red", "red"]
    assert vqa_score("red", answers) == 1.0
    assert vqa_score("blue", answers) == pytest.approx(1 / 3)
    assert vqa_score("purple", answers) == 0.0
    assert vqa_score("green", ["green", "green", "x"]) == pytest.approx(2 / 3)


def test_vqa_score_normalises_number_words_and_articles():
    assert vqa_score("Two", ["2"] * 10) == 1.0
    assert vqa_score("the lamp bird", ["lamp bird"] * 10) == 1.0
    assert vqa_score("lamp", ["lamp bird"] * 10) == 0.0


def test_exact_match_is_any_normalised_match():
    assert exact_match("Four", ["4", "5"]) == 1.0
    assert exact_match("6", ["4", "5"]) == 0.0


def test_scores_need_references():
    with pytest.raises(ValueError):
        vqa_score("x", [])
