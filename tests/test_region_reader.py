"""Region-reader targets and loss: what each vision token is taught, and what reaches the vision tower."""

from __future__ import annotations

import torch

from core.vlm.base_vlm import BaseVLMConfig, image_to_crops, token_boxes
from core.vlm.region_reader import (
    IGNORE, NONE, READER_GROUPS, RegionReader, batch_targets, reader_accuracy, reader_loss, token_targets,
)
from core.vqa.suite import COLORS, SHAPES, SIGN_WORDS, load_split, sample_annotations

CONFIG = BaseVLMConfig()


def _targets(sample_id: str, max_crops: int = 8):
    sample = load_split(sample_id.split(":")[0], "train", int(sample_id.split(":")[2]) + 1)[-1]
    _, grid = image_to_crops(sample.image, max_crops, CONFIG.crop_px)
    boxes = token_boxes(sample.image.size, grid, CONFIG)
    readable = torch.arange(boxes.shape[0]) >= CONFIG.tokens_per_crop  # not the global view
    return token_targets(sample_annotations(sample_id).regions, boxes, readable), boxes


def test_each_counted_object_labels_one_high_tier_token_with_its_colour_and_shape():
    sample_id = "synth_countvqa:train:3"
    (color, shape, words, _), _ = _targets(sample_id)
    objects = sample_annotations(sample_id).regions[::2]  # (colour, box), (shape, box) per object
    tile_tokens = slice(CONFIG.tokens_per_crop, None)
    # 16-px objects cells match the high tier's 16-px tokens: one labelled tile token per object.
    assert int((color[tile_tokens] != NONE).sum()) == len(objects)
    assert sorted(READER_GROUPS["color"][c - 1] for c in color[tile_tokens] if c != NONE) == sorted(w for w, _ in objects)
    assert ((color != NONE) == (shape != NONE)).all() and not words


def test_word_bags_skip_the_global_view_and_word_free_tokens_touch_no_word():
    (color, shape, words, free), boxes = _targets("synth_textvqa:train:0")
    assert [SIGN_WORDS[label - 1] for _, label in words] == [w for w, _ in sample_annotations("synth_textvqa:train:0").regions]
    for mask, _ in words:
        assert mask.any() and not mask[: CONFIG.tokens_per_crop].any()
        assert not (mask & free).any()
    assert not free[: CONFIG.tokens_per_crop].any()  # the global view gets no word target at all
    assert (color == NONE).all() and (shape == NONE).all()


def test_none_targets_of_an_image_without_objects_do_not_reach_the_vision_tokens():
    (c, s, _, _), _ = _targets("synth_textvqa:train:0")
    no_words = (c, s, [], torch.ones_like(c, dtype=torch.bool))  # only "none" targets
    targets = batch_targets([no_words, no_words])
    vision = torch.randn(2, c.shape[0], CONFIG.d_model, requires_grad=True)
    reader = RegionReader(CONFIG.d_model)
    loss = reader_loss(reader, vision, targets)
    loss.backward()
    assert loss.item() > 0 and vision.grad is not None and torch.count_nonzero(vision.grad) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reader.heads["color"].parameters())


def test_object_and_word_targets_train_the_vision_tokens():
    per_image = [_targets("synth_countvqa:train:3")[0], _targets("synth_textvqa:train:0")[0]]
    targets = batch_targets(per_image)
    assert targets.word_labels[0].tolist() == [IGNORE, IGNORE] and (targets.word_labels[1] != IGNORE).all()
    vision = torch.randn(2, targets.color.shape[1], CONFIG.d_model, requires_grad=True)
    reader_loss(RegionReader(CONFIG.d_model), vision, targets).backward()
    assert vision.grad[0].abs().sum() > 0 and vision.grad[1].abs().sum() > 0


def test_accuracy_of_scores_that_match_the_targets_is_one():
    targets = batch_targets([_targets("synth_countvqa:train:3")[0], _targets("synth_textvqa:train:0")[0]])
    n = targets.color.shape[1]
    scores = {g: torch.zeros(2, n, len(words) + 1) for g, words in READER_GROUPS.items()}
    for g in ("color", "shape"):
        scores[g].scatter_(2, getattr(targets, g)[..., None], 10.0)
    for i in range(2):
        for mask, label in zip(targets.word_tokens[i], targets.word_labels[i]):
            if label != IGNORE:
                scores["word"][i, mask, label] = 10.0
    accuracy = reader_accuracy(scores, targets)
    assert accuracy["word"] == 1.0 and accuracy["color"] == 1.0 and accuracy["shape"] == 1.0
    heads = RegionReader(CONFIG.d_model).heads  # one class per colour / shape, plus "none"
    assert (heads["color"].out_features, heads["shape"].out_features) == (len(COLORS) + 1, len(SHAPES) + 1)
