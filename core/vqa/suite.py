"""The synthetic VQA suite the platform trains and evaluates its embedded base VLM on.

Three data sets mirror the seeds of the original study, each drawn with Pillow from templates whose
answers are exact:

  synth_textvqa   read a two-word sign (three-letter words, 8 / 10 / 12 px fonts). The low tier
                  sees the text at a quarter of its width: the small font is mostly illegible there
                  and the larger ones only partly (a model trained on 10-12 px fonts still read 70%
                  of them at the low tier); the medium tier's half resolution reads most, the high
                  tier reads all at full resolution. Multi-token answers ("key cup").
  synth_countvqa  how many objects (1-6) of a shape or a colour ("how many circles", with
                  distractors of other shapes or colours); small objects, single-token answers.
  synth_attrvqa   colour / shape / left-right position of one large object; the low tier suffices.

Every image is 128 x 64 px (2:1), so the tiling grid of each tier is the same for all samples
(1x1, 1x2, 2x4 tiles at the base VLM's tier caps 1 / 2 / 8) and each tier doubles the resolution
of the one below.

Samples are generated one by one from a random generator seeded by (seed, dataset, split, index), so
any prefix of a split is identical on every machine and worker, and `sample_id` is
"<dataset>:<split>:<index>". Splits use different seed streams and never share an index space.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from core.vqa.sample import VQASample

DATASETS: tuple[str, ...] = ("synth_textvqa", "synth_countvqa", "synth_attrvqa")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_SIZES: dict[str, int] = {"train": 8000, "val": 400, "test": 400}
IMAGE_SIZE: tuple[int, int] = (128, 64)  # (width, height)
NUM_REFERENCE_ANSWERS = 10  # as in VQA v2; all equal here since the generator knows the truth

TASKS: dict[str, str] = {
    "synth_textvqa": "text_reading",
    "synth_countvqa": "counting",
    "synth_attrvqa": "attributes",
}
MAX_NEW_TOKENS: dict[str, int] = {"synth_textvqa": 8, "synth_countvqa": 4, "synth_attrvqa": 4}

# Three-letter sign words: in every font size a word fits inside one 32-px column of the high tier's
# 2x4 tiling (words are placed in distinct columns), so each is read from one tile.
SIGN_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "box", "cup", "hat", "key", "pen", "ink", "egg", "ice", "jam",
    "bus", "car", "sky", "bee", "ant", "pig", "hen", "bat", "fig", "tea", "oak", "jar",
)
FONT_SIZES_PX: dict[str, int] = {"small": 8, "medium": 10, "large": 12}
TEXT_COLUMNS = 4  # columns of the high tier's tiling of a 128-px-wide image
# The sign sits at a fixed place (top half, middle columns; jittered within each column) so that the
# task measures reading, not search: each word is read from one high-tier tile.
SIGN_COLUMNS = (1, 2)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 50, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Counting is the one task whose answer the decoder computes (its MoE) rather than copies from a vision
# token (with every MoE output zeroed, a model trained on counts up to 4 still read every sign but
# counted 0.53 instead of 0.97). Counts up to 6 of one attribute (issue 13): counts up to 9 and
# colour+shape questions made counting too hard to learn in the training budget (0.42 at full after
# 4 epochs), which hid what the experts add instead of showing it.
MAX_COUNT = 6
# Which attribute a count question names: a shape or a colour ("both", a colour with a shape, is
# supported but not drawn; see above).
COUNT_MODES: tuple[str, ...] = ("shape", "color")
MAX_DISTRACTORS = 3

TEXT_QUESTIONS: tuple[str, ...] = (
    "what does the sign say ?",
    "what is written in the image ?",
    "what words are shown ?",
    "read the text in the image .",
)


@dataclass(frozen=True)
class _Canvas:
    image: Image.Image
    draw: ImageDraw.ImageDraw


def _rng(seed: int, dataset: str, split: str, index: int) -> random.Random:
    # A cryptographic hash, not hash(): Python salts str hashes per process.
    digest = hashlib.sha256(f"{seed}|{dataset}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _background(rng: random.Random) -> _Canvas:
    shade = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", IMAGE_SIZE, shade)  # type: ignore[arg-type]
    return _Canvas(image, ImageDraw.Draw(image))


@lru_cache(maxsize=None)
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: the same glyphs on every machine, no download.
    return ImageFont.load_default(size=size_px)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


Region = tuple[str, tuple[float, float, float, float]]  # (word, (x0, y0, x1, y1) in image pixels)


@dataclass(frozen=True)
class Annotations:
    """What the generator knows about one image beyond its VQA sample (training-time supervision).

    regions: (word, pixel box) per sign word and (colour, box), (shape, box) per object.
    qa_pairs: every templated question about the image with its exact answer, the sample's own first.
    """

    regions: list[Region]
    qa_pairs: list[tuple[str, str]]


@dataclass(frozen=True)
class _Drawn:
    image: Image.Image
    question: str
    answer: str
    annotations: Annotations


def _textvqa(rng: random.Random) -> _Drawn:
    canvas = _background(rng)
    size_name = rng.choice(tuple(FONT_SIZES_PX))
    font = _font(FONT_SIZES_PX[size_name])
    width, height = IMAGE_SIZE
    col_w = width // TEXT_COLUMNS
    words = rng.sample(SIGN_WORDS, 2)
    columns = list(SIGN_COLUMNS)
    boxes = [canvas.draw.textbbox((0, 0), w.upper(), font=font) for w in words]
    text_h = max(b[3] for b in boxes) - min(b[1] for b in boxes)
    row_h = height // 2  # and inside one of the tiling's two rows
    row = 0  # the sign hangs in the top half
    y = rng.randint(row * row_h + 3, (row + 1) * row_h - 3 - text_h) - min(b[1] for b in boxes)
    xs = [rng.randint(c * col_w + 2 - b[0], (c + 1) * col_w - 2 - b[2]) for c, b in zip(columns, boxes)]
    placed = [(x + b[0], y + b[1], x + b[2], y + b[3]) for x, b in zip(xs, boxes)]
    # One sign plate behind both words, in a random light colour.
    plate = tuple(rng.randint(150, 255) for _ in range(3))
    top = min(p[1] for p in placed) - 2
    bottom = max(p[3] for p in placed) + 2
    canvas.draw.rectangle((placed[0][0] - 2, top, placed[1][2] + 2, bottom), fill=plate)  # type: ignore[arg-type]
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    for word, x in zip(words, xs):
        canvas.draw.text((x, y), word.upper(), fill=ink, font=font)  # type: ignore[arg-type]
    regions: list[Region] = [(w, p) for w, p in zip(words, placed)]
    question, answer = rng.choice(TEXT_QUESTIONS), " ".join(words)
    qa = [(question, answer)] + [(q, answer) for q in TEXT_QUESTIONS if q != question]
    qa += [("what is the first word ?", words[0]), ("what is the second word ?", words[1])]
    return _Drawn(canvas.image, question, answer, Annotations(regions, qa))


def _free_cells(rng: random.Random, cell_px: int, count: int) -> list[tuple[float, float]]:
    """`count` distinct grid cells (centre coordinates with a small jitter), so objects never overlap."""
    width, height = IMAGE_SIZE
    cols, rows = width // cell_px, height // cell_px
    cells = rng.sample([(c, r) for r in range(rows) for c in range(cols)], count)
    jitter = cell_px * 0.12
    return [
        ((c + 0.5) * cell_px + rng.uniform(-jitter, jitter), (r + 0.5) * cell_px + rng.uniform(-jitter, jitter))
        for c, r in cells
    ]


def _object_regions(shape: str, color: str, cx: float, cy: float, r: float) -> list[Region]:
    box = (cx - r, cy - r, cx + r, cy + r)
    return [(color, box), (shape, box)]


def _count_question(word: str, color: str | None = None) -> str:
    """ "how many circles", "how many red objects", or with both a colour and a shape "how many red circles"."""
    if color is not None:
        return f"how many {color} {SHAPE_PLURALS[word]} are there ?"
    return f"how many {SHAPE_PLURALS[word]} are there ?" if word in SHAPES else f"how many {word} objects are there ?"


def _countvqa(rng: random.Random) -> _Drawn:
    canvas = _background(rng)
    count = rng.randint(1, MAX_COUNT)
    num_distractors = rng.randint(0, MAX_DISTRACTORS)
    mode = rng.choice(COUNT_MODES)
    colors = tuple(COLORS)
    target_shape, target_color = rng.choice(SHAPES), rng.choice(colors)
    if mode == "shape":
        objects = [(target_shape, rng.choice(colors)) for _ in range(count)]
        objects += [(rng.choice([s for s in SHAPES if s != target_shape]), rng.choice(colors)) for _ in range(num_distractors)]
        question = _count_question(target_shape)
    elif mode == "color":
        objects = [(rng.choice(SHAPES), target_color) for _ in range(count)]
        objects += [(rng.choice(SHAPES), rng.choice([c for c in colors if c != target_color])) for _ in range(num_distractors)]
        question = _count_question(target_color)
    else:
        # Distractors share the colour or the shape, so neither attribute alone gives the count.
        objects = [(target_shape, target_color) for _ in range(count)]
        for _ in range(num_distractors):
            if rng.random() < 0.5:
                objects.append((target_shape, rng.choice([c for c in colors if c != target_color])))
            else:
                objects.append((rng.choice([s for s in SHAPES if s != target_shape]), target_color))
        question = _count_question(target_shape, target_color)
    rng.shuffle(objects)
    regions: list[Region] = []
    for (shape, color), (cx, cy) in zip(objects, _free_cells(rng, 16, len(objects))):
        r = rng.uniform(4.5, 6.0)
        _draw_shape(canvas.draw, shape, cx, cy, r, COLORS[color])
        regions += _object_regions(shape, color, cx, cy, r)
    qa = [(question, str(count))]
    # Every other count the image answers, zeros included (the tokenizer has single digits).
    for word in (*SHAPES, *colors):
        n = sum(word in obj for obj in objects)
        if _count_question(word) != question and n <= 9:
            qa.append((_count_question(word), str(n)))
    for shape in SHAPES:
        for color in colors:
            n = sum(obj == (shape, color) for obj in objects)
            if _count_question(shape, color) != question and n <= 9:
                qa.append((_count_question(shape, color), str(n)))
    return _Drawn(canvas.image, question, str(count), Annotations(regions, qa))


def _attrvqa(rng: random.Random) -> _Drawn:
    canvas = _background(rng)
    width, height = IMAGE_SIZE
    shape, color, side = rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(("left", "right"))
    cx = rng.uniform(18, width / 2 - 18) + (width / 2 if side == "right" else 0)
    cy = rng.uniform(18, height - 18)
    r = rng.uniform(11, 15)
    _draw_shape(canvas.draw, shape, cx, cy, r, COLORS[color])
    pairs = [
        ("what color is the object ?", color),
        ("what shape is the object ?", shape),
        ("is the object on the left or the right ?", side),
    ]
    own = pairs.pop(rng.randrange(3))
    return _Drawn(canvas.image, own[0], own[1], Annotations(_object_regions(shape, color, cx, cy, r), [own, *pairs]))


_GENERATORS: dict[str, Callable[[random.Random], _Drawn]] = {
    "synth_textvqa": _textvqa,
    "synth_countvqa": _countvqa,
    "synth_attrvqa": _attrvqa,
}


def make_sample(dataset: str, split: str, index: int, seed: int = 0) -> VQASample:
    """Sample `index` of `dataset`/`split`; identical for identical arguments on every machine."""
    _check(dataset, split)
    if not 0 <= index < SPLIT_SIZES[split]:
        raise ValueError(f"index {index} outside split {split!r} of size {SPLIT_SIZES[split]}")
    drawn = _GENERATORS[dataset](_rng(seed, dataset, split, index))
    return VQASample(
        sample_id=f"{dataset}:{split}:{index}",
        dataset=dataset,
        task=TASKS[dataset],
        image=drawn.image,
        question=drawn.question,
        answers=(drawn.answer,) * NUM_REFERENCE_ANSWERS,
        max_new_tokens=MAX_NEW_TOKENS[dataset],
    )


def sample_from_id(sample_id: str, seed: int = 0) -> VQASample:
    """The suite sample "<dataset>:<split>:<index>" (as measured tables and controller data name them).
    ValueError (one line) for an id the suite cannot rebuild."""
    parts = str(sample_id).split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"sample id {sample_id!r} is not <dataset>:<split>:<index>")
    return make_sample(parts[0], parts[1], int(parts[2]), seed)


def sample_annotations(sample_id: str, seed: int = 0) -> Annotations:
    """Regions and all question/answer pairs of sample "<dataset>:<split>:<index>" (see Annotations).

    Training uses them (dense targets for the vision tokens, several questions per image, as Molmo
    trains on several annotations per image); evaluation only ever sees the VQASample.
    """
    dataset, split, index = sample_id.split(":")
    _check(dataset, split)
    return _GENERATORS[dataset](_rng(seed, dataset, split, int(index))).annotations


def _check(dataset: str, split: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r} (known: {list(DATASETS)})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {list(SPLITS)})")


def load_split(dataset: str, split: str, num_samples: int | None = None, seed: int = 0) -> list[VQASample]:
    """The first `num_samples` samples (default: all) of a split, in index order.

    Raises ValueError naming an unknown data set or split, or a `num_samples` beyond the split size.
    """
    _check(dataset, split)
    size = SPLIT_SIZES[split]
    n = size if num_samples is None else int(num_samples)
    if not 0 <= n <= size:
        raise ValueError(f"num_samples={num_samples} outside [0, {size}] for split {split!r} of {dataset!r}")
    return [make_sample(dataset, split, i, seed) for i in range(n)]


def load_mixed_split(datasets: Sequence[str], split: str, num_samples: int, seed: int = 0) -> list[VQASample]:
    """The first `num_samples` of `split` of each data set in `datasets`, one data set after another."""
    return [s for dataset in datasets for s in load_split(dataset, split, num_samples, seed)]


VISUAL_WORDS: tuple[str, ...] = tuple(sorted(set(SIGN_WORDS) | set(COLORS) | set(SHAPES)))


def suite_vocabulary() -> list[str]:
    """Every word that can occur in a question or answer of the suite (for word-level tokenizers)."""
    words: set[str] = set(SIGN_WORDS) | set(COLORS) | set(SHAPES) | set(SHAPE_PLURALS.values())
    words |= {str(i) for i in range(10)} | {"left", "right", "object", "objects"}
    templates = list(TEXT_QUESTIONS) + [
        "how many are there ?",
        "what color is the object ?",
        "what shape is the object ?",
        "is the object on the left or the right ?",
        "what is the first word ?",
        "what is the second word ?",
    ]
    for template in templates:
        words |= set(template.split())
    return sorted(words)
