"""Dense supervision for the base VLM's vision tokens from what the suite's generator drew.

A VQA answer gives one word of signal per image; the vision tower, trained from scratch, needs more
to learn to read glyphs and tell colours and shapes (as Molmo pre-trains on dense captions). The
generator knows every region it drew (`core.vqa.suite.Annotations.regions`), so a training-only
reader head classifies the vision tokens into three groups of visual words, each with a "none"
class:

  colour, shape  per token: the object covering most of the token (objects are drawn in a 16-px
                 cell grid that the high tier's tokens match, so there a token sees one object);
  sign word      per word region, multiple-instance: the class scores maxed over the tokens that
                 overlap the word, then cross-entropy, so any one token of the word may carry it
                 (a token sees only part of the glyphs); tokens touching no word are "none".

A reading probe on 32-px high-tier tiles showed the vision tower learns the words this way within a
few hundred steps, where a per-token binary loss over all words stalled near chance. Two findings
shape `reader_loss`: "none" targets that carry no object information must not reach the tower (see
there), and reading is learnt first, alone (`core.vlm.elastic_training.train_reader`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.vqa.suite import COLORS, SHAPES, SIGN_WORDS, Region

READER_GROUPS: dict[str, tuple[str, ...]] = {
    "word": SIGN_WORDS,
    "color": tuple(COLORS),
    "shape": SHAPES,
}
NONE = 0  # class 0 of every group; word i of a group is class i + 1
IGNORE = -100


@dataclass
class ReaderTargets:
    """Targets of one batch of N vision tokens per image.

    color, shape: (B, N) class per token (NONE where no object). word_tokens: (B, R, N) bool, the
    tokens overlapping each of up to R word regions; word_labels: (B, R) class or IGNORE (padding);
    word_free: (B, N) bool, tokens that touch no word (trained towards NONE).
    """

    color: torch.Tensor
    shape: torch.Tensor
    word_tokens: torch.Tensor
    word_labels: torch.Tensor
    word_free: torch.Tensor

    def to(self, device: torch.device | str) -> "ReaderTargets":
        return ReaderTargets(*(t.to(device) for t in (self.color, self.shape, self.word_tokens, self.word_labels, self.word_free)))


def _overlap(boxes: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    x0, y0, x1, y1 = box
    iw = (boxes[:, 2].clamp(max=x1) - boxes[:, 0].clamp(min=x0)).clamp(min=0)
    ih = (boxes[:, 3].clamp(max=y1) - boxes[:, 1].clamp(min=y0)).clamp(min=0)
    return iw * ih


def token_targets(
    regions: Sequence[Region],
    boxes: torch.Tensor,
    readable: torch.Tensor | None = None,
    min_object_share: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, int]], torch.Tensor]:
    """Targets of one image from its regions and the (N, 4) pixel boxes its vision tokens see.

    Returns (color (N,), shape (N,), [(token mask (N,), word class), ...], word-free mask (N,)). A
    token gets an object's colour and shape when the object covers at least `min_object_share` of the
    token or of the object, the largest such object winning. A word's bag is the `readable` tokens
    (default: all) that overlap it; readable tokens touching no word are word-free. Tokens outside
    `readable` (the global view, whose quarter resolution no text survives) get no word target:
    with them in the bags, the one token every tier shares took the max and reading stalled.
    """
    n = boxes.shape[0]
    readable = torch.ones(n, dtype=torch.bool) if readable is None else readable
    touched = torch.zeros(n, dtype=torch.bool)
    token_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    best = torch.zeros(n)
    labels = {"color": torch.full((n,), NONE, dtype=torch.long), "shape": torch.full((n,), NONE, dtype=torch.long)}
    words: list[tuple[torch.Tensor, int]] = []
    # Objects come as (colour, box), (shape, box) pairs with the same box.
    for word, box in regions:
        inter = _overlap(boxes, box)
        if word in SIGN_WORDS:
            touched |= inter > 0
            mask = (inter > 0) & readable
            if bool(mask.any()):
                words.append((mask, SIGN_WORDS.index(word) + 1))
            continue
        group = "color" if word in COLORS else "shape"
        area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
        share = torch.maximum(inter / token_area, inter / area)
        hit = share >= min_object_share
        if group == "color":
            take = hit & (share > best)
            best = torch.where(take, share, best)
        else:  # the shape follows the colour of the same object
            take = hit & (share >= best)
        labels[group][take] = READER_GROUPS[group].index(word) + 1
    return labels["color"], labels["shape"], words, readable & ~touched


ImageTargets = tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, int]], torch.Tensor]


def batch_targets(per_image: Sequence[ImageTargets]) -> ReaderTargets:
    """Stack `token_targets` of a batch of images with equal token counts."""
    b, n = len(per_image), per_image[0][0].shape[0]
    r = max(1, max(len(w) for _, _, w, _ in per_image))
    word_tokens = torch.zeros((b, r, n), dtype=torch.bool)
    word_labels = torch.full((b, r), IGNORE, dtype=torch.long)
    for i, (_, _, words, _) in enumerate(per_image):
        for j, (mask, label) in enumerate(words):
            word_tokens[i, j], word_labels[i, j] = mask, label
    return ReaderTargets(
        color=torch.stack([c for c, *_ in per_image]),
        shape=torch.stack([s for _, s, *_ in per_image]),
        word_tokens=word_tokens,
        word_labels=word_labels,
        word_free=torch.stack([f for *_, f in per_image]),
    )


class RegionReader(nn.Module):
    """Training-only head: vision token (d_model) -> class scores of each reader group."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({g: nn.Linear(d_model, len(words) + 1) for g, words in READER_GROUPS.items()})

    def forward(self, vision: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, N, d) -> {group: (B, N, classes)}."""
        return {g: head(vision) for g, head in self.heads.items()}


def reader_loss(reader: RegionReader, vision: torch.Tensor, targets: ReaderTargets) -> torch.Tensor:
    """Sum over the groups of their mean cross-entropy (see the module docstring).

    "None" targets of word-free tokens, and of images without any object, are scored on detached
    features: they train the head's boundary only. Back-propagated into the vision tower, that one
    shared target pushed every token the same way, which Adam's normalised steps turn into
    full-size updates: features collapsed and reading stalled (held-out word accuracy 0.02-0.2
    instead of 0.89 after 200 steps of a reading probe).
    """
    live = reader(vision)
    frozen = reader(vision.detach())
    total = vision.new_zeros(())
    for group in ("color", "shape"):
        t = getattr(targets, group)
        obj = t != NONE
        # Background tokens of an image with objects train the tower too, so objects and background
        # separate (counting needs that); the tokens of an image without objects train the head only.
        with_objects = obj.any(1, keepdim=True).expand_as(obj)
        none_scores = torch.where(with_objects[..., None], live[group], frozen[group])
        if bool(obj.any()):
            total = total + F.cross_entropy(live[group][obj], t[obj])
        if bool((~obj).any()):
            total = total + F.cross_entropy(none_scores[~obj], t[~obj])
    masked = live["word"][:, None].masked_fill(~targets.word_tokens[..., None], float("-inf"))  # (B, R, N, C)
    pooled = masked.max(2).values  # (B, R, C); padding rows are all -inf and ignored below
    valid = targets.word_labels != IGNORE
    if bool(valid.any()):
        total = total + F.cross_entropy(pooled[valid], targets.word_labels[valid])
    free = frozen["word"][targets.word_free]
    if free.shape[0]:
        total = total + F.cross_entropy(free, torch.full((free.shape[0],), NONE, dtype=torch.long, device=free.device))
    return total


@torch.no_grad()
def reader_accuracy(scores: dict[str, torch.Tensor], targets: ReaderTargets) -> dict[str, float]:
    """Share of word regions read right (pooled argmax) and of object tokens whose colour / shape is right."""
    out: dict[str, float] = {}
    word = scores["word"][:, None].masked_fill(~targets.word_tokens[..., None], float("-inf")).max(2).values
    valid = targets.word_labels != IGNORE
    if bool(valid.any()):
        out["word"] = (word[valid].argmax(-1) == targets.word_labels[valid]).float().mean().item()
    for g in ("color", "shape"):
        t = getattr(targets, g)
        obj = t != NONE
        if bool(obj.any()):
            out[g] = (scores[g].argmax(-1)[obj] == t[obj]).float().mean().item()
        out[g + "_none"] = (scores[g].argmax(-1)[~obj] == NONE).float().mean().item()
    return out
