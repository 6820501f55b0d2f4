"""Where an experiment's VQA samples come from, and how their answers are scored.

Without a data root: the project's synthetic suite (`core.vqa.suite`), scored with `vqa_score` (its ten
reference answers are all equal, so the leave-one-out average would change nothing). With a data root:
the real benchmarks read from local files in their published layouts (`core.vqa.real_data`: text_vqa,
coco_2014_vqa, okvqa), scored with `official_vqa_accuracy`. The real test splits publish no answers
(VQA v2, OK-VQA) or none at all here, so a "test" request reads the val split, as the original study did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from core.vqa import real_data, suite
from core.vqa.metrics import vqa_score
from core.vqa.sample import VQASample

ScoreFn = Callable[[str, Sequence[str]], float]


def check_data_root(data_root: str) -> Path | None:
    """None for '' (the synthetic suite), else the directory; RealDataError naming the parameter otherwise."""
    if not data_root:
        return None
    root = Path(data_root)
    if not root.is_dir():
        raise real_data.RealDataError(f"data_root={data_root!r} is not a directory")
    return root


def dataset_choices(data_root: str) -> tuple[str, ...]:
    """The data set names an experiment may ask for: the real benchmarks' with a data root (checked: a
    directory), else the suite's."""
    return real_data.DATASETS if check_data_root(data_root) else suite.DATASETS


def real_split(split: str, dataset: str) -> str:
    """The real split read for `split`: 'test' -> 'val' (see the module docstring)."""
    return "val" if split == "test" else split


def load_samples(dataset: str, split: str, num_samples: int, seed: int, data_root: str) -> list[VQASample]:
    """The first `num_samples` of `split` of `dataset`: from the real files under `data_root` (question-file
    order; `seed` unused), else the synthetic suite drawn with `seed`."""
    root = check_data_root(data_root)
    if root is None:
        return suite.load_split(dataset, split, num_samples, seed=seed)
    return real_data.load_real_split(root, dataset, real_split(split, dataset), limit=num_samples)


def load_mixed(datasets: Sequence[str], split: str, num_samples: int, seed: int, data_root: str) -> list[VQASample]:
    """`load_samples` of each data set, one data set after another."""
    return [s for name in datasets for s in load_samples(name, split, num_samples, seed, data_root)]


def samples_from_ids(sample_ids: Sequence[str], data_root: str) -> list[VQASample]:
    """The samples "<dataset>:<split>:<index>" in `sample_ids` order, rebuilt from the suite or read from
    the real files under `data_root` (one file read per data set and split). ValueError (one line naming
    the id) for an id neither can give."""
    root = check_data_root(data_root)
    parsed = []
    for sample_id in sample_ids:
        parts = str(sample_id).split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"sample id {sample_id!r} is not <dataset>:<split>:<index>")
        parsed.append((parts[0], parts[1], int(parts[2])))
    if root is None:
        return [suite.make_sample(d, s, i) for d, s, i in parsed]
    by_file: dict[tuple[str, str], list[int]] = {}
    for dataset, split, index in parsed:
        by_file.setdefault((dataset, split), []).append(index)
    loaded = {}
    for (dataset, split), indices in by_file.items():
        unique = sorted(set(indices))
        for index, sample in zip(unique, real_data.load_real_split(root, dataset, split, indices=unique)):
            loaded[(dataset, split, index)] = sample
    return [loaded[key] for key in parsed]


def answer_score(data_root: str) -> ScoreFn:
    """How answers are scored: the official VQA accuracy on the real benchmarks, `vqa_score` on the suite."""
    return real_data.official_vqa_accuracy if data_root else vqa_score
