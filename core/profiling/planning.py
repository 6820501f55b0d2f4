"""What a profiling sweep answers, decided before it starts: its data sets and samples, the answer
length, how answers are scored; and the checks that it can run at all (engine and device for the
backend, an existing table whose rows ran the same blocks).

A backend with real weights (base_vlm, or molmoe_arch loaded from a MolmoE release directory) answers
VQA data sets, the synthetic suite's or, with a data root, the real benchmarks' (`core.vqa.sources`),
and is scored against their reference answers. A latency-only backend (random weights: molmoe_arch
without a checkpoint) answers synthetic probe requests of known prompt lengths with a forced answer
length, so decode is timed over a known number of forwards; its data set is named for that length
(`latency_probe_out8`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from core.knobs import active_blocks
from core.profiling.profiler import ProfileSweepConfig, ScoreFn
from core.profiling.schema import LATENCY_ONLY_BACKENDS, decode_list
from core.profiling.store import ProfileStore
from core.vlm.molmoe_arch import synthetic_latency_samples
from core.vqa import sources
from core.vqa.sample import VQASample

PROBE_OUTPUT_TOKENS = 8  # a latency probe's answer length unless one is forced
PROBE_IMAGE_SIZE: tuple[int, int] = (640, 480)  # (width, height): 4:3, 1 / 6 / 12 MolmoE crops by tier


def check_engine_and_device(backend: str, engine: str, device: str) -> None:
    """ValueError naming the parameter for an engine other than eager on a backend that has only that one
    (every backend but molmoe_arch), or a CUDA device on a machine without one. Unknown backend and
    engine names fail where the backend is built (`core.vlm.registry.load_backend`)."""
    if engine != "eager" and backend != "molmoe_arch":
        raise ValueError(f"engine={engine!r} applies to backend=molmoe_arch only")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available")


def latency_probe_name(output_tokens: int) -> str:
    """The data set name of latency probes answered with `output_tokens` tokens."""
    return f"latency_probe_out{output_tokens}"


def parse_prompt_lengths(items: Sequence[str]) -> tuple[int, ...]:
    """Probe prompt lengths (text tokens) from the items of the `prompt_lengths` list; ValueError naming
    the parameter for an empty list or an item that is not a whole number >= 1."""
    if not items:
        raise ValueError("prompt_lengths: give at least one prompt length (text tokens)")
    lengths = []
    for item in items:
        if not item.strip().isdigit() or int(item) < 1:
            raise ValueError(f"prompt_lengths: {item!r} is not a whole number of tokens >= 1")
        lengths.append(int(item))
    return tuple(lengths)


def is_latency_only(backend: str, model_path: str = "") -> bool:
    """Random weights answer probe requests, not VQA: a latency-only backend without a checkpoint."""
    return backend in LATENCY_ONLY_BACKENDS and not model_path


def sweep_datasets(
    backend: str, dataset_names: Sequence[str], force_output_tokens: int | None, model_path: str = ""
) -> tuple[tuple[str, ...], int | None]:
    """(data set names, forced answer length) of a sweep of `backend`.

    A latency-only backend answers one probe data set of `force_output_tokens` (default
    PROBE_OUTPUT_TOKENS) tokens and ignores `dataset_names`; any other backend answers `dataset_names`,
    each sample up to its own max_new_tokens unless `force_output_tokens` is given.
    """
    if is_latency_only(backend, model_path):
        forced = force_output_tokens or PROBE_OUTPUT_TOKENS
        return (latency_probe_name(forced),), forced
    return tuple(dataset_names), force_output_tokens or None


def latency_probe_samples(
    prompt_lengths: Sequence[int],
    output_tokens: int,
    num_samples: int,
    seed: int,
    image_sizes: Sequence[tuple[int, int]] = (PROBE_IMAGE_SIZE,),
) -> dict[str, list[VQASample]]:
    """{probe data set name: `num_samples` probe requests cycling over prompt length x image size}."""
    name = latency_probe_name(output_tokens)
    return {name: synthetic_latency_samples(prompt_lengths, image_sizes, num_samples, max_new_tokens=output_tokens,
                                            seed=seed, dataset=name)}


def sweep_samples(config: ProfileSweepConfig, split: str, prompt_lengths: Sequence[int], model_path: str = "",
                  data_root: str = "") -> dict[str, list[VQASample]]:
    """The samples of `config`'s data sets (see `sweep_datasets`): latency probes of `prompt_lengths` for a
    latency-only backend, else the first `num_samples` of `split` of each data set (the suite's, or the
    real files under `data_root`)."""
    if is_latency_only(config.backend, model_path):
        output_tokens = config.force_output_tokens or PROBE_OUTPUT_TOKENS
        return latency_probe_samples(prompt_lengths, output_tokens, config.num_samples, config.seed)
    return {name: sources.load_samples(name, split, config.num_samples, config.seed, data_root)
            for name in config.dataset_names}


def score_function(backend: str, model_path: str = "", data_root: str = "") -> ScoreFn | None:
    """How a row's answer is scored: VQA score against the references (the official VQA accuracy on the
    real benchmarks); None (accuracy NaN) for a latency-only backend, whose random weights answer nothing."""
    return None if is_latency_only(backend, model_path) else sources.answer_score(data_root)


def check_block_order(store: ProfileStore, dataset_names: Sequence[str], num_blocks: int,
                      drop_order: Sequence[int]) -> None:
    """ValueError naming the results directory when its rows of `dataset_names` ran other blocks than
    `drop_order` gives: resuming into them would mix two different knob grids in one table."""
    if not store.part_files(dataset_names):
        return
    existing = store.load(dataset_names)[["num_active_blocks", "active_blocks"]].drop_duplicates()
    for n, blocks in existing.itertuples(index=False):
        expected = list(active_blocks(num_blocks, int(n), drop_order))
        if decode_list(blocks) != expected:
            raise ValueError(
                f"results_dir {store.results_dir} holds rows with {n} active blocks = {decode_list(blocks)}, but the "
                f"current drop order gives {expected}: profile into a new results_dir"
            )
