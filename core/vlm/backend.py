"""What every VLM backend offers the profiler, importance, evaluation and adaptive inference.

Backends: `base_vlm` (core/vlm/base_vlm.py, the trained embedded default) and `molmoe_arch`
(core/vlm/molmoe_arch.py, MolmoE-1B-sized random weights, latency only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from core.timing import StageClock

from core.knobs import KnobConfig, KnobSpace
from core.vqa.sample import VQASample


@dataclass
class GenerationResult:
    """One answered request with its latency components (ms).

    T_decode_per_token_ms divides decode time by the number of decode forwards
    (output_tokens - 1: the first token comes out of prefill), never by output_tokens.
    """

    text: str
    output_tokens: int
    crops: int
    vision_tokens: int
    text_tokens: int
    active_blocks: tuple[int, ...]
    T_vision_ms: float
    T_prefill_ms: float
    T_decode_ms: float
    decode_step_ms: list[float] = field(default_factory=list)

    @property
    def decode_forwards(self) -> int:
        return max(self.output_tokens - 1, 0)

    @property
    def T_decode_per_token_ms(self) -> float:
        return self.T_decode_ms / self.decode_forwards if self.decode_forwards else 0.0

    @property
    def T_total_ms(self) -> float:
        return self.T_vision_ms + self.T_prefill_ms + self.T_decode_ms


class VLMBackend(Protocol):
    """A model whose three knobs can be set per request."""

    name: str
    space: KnobSpace
    device: torch.device

    def set_drop_order(self, drop_order: Sequence[int]) -> None:
        """Middle blocks in ascending importance (dropped first to last)."""
        ...

    def answer(
        self,
        sample: VQASample,
        config: KnobConfig,
        max_new_tokens: int | None = None,
        force_output_tokens: int | None = None,
    ) -> GenerationResult:
        """Greedy answer under `config`, timed per stage; the model is restored afterwards.

        `force_output_tokens` makes generation run exactly that many tokens (latency profiling of
        random-weight models, where EOS would come at random).
        """
        ...


@dataclass
class RequestFeatures:
    """What a backend knows of a request before any knob is chosen (the controller's inputs): the mean
    input embedding of the question's tokens, the global view's vision tokens (the same crop at every
    tier, encoded once and reused by the vision stage), the prompt's text tokens and each tier's crops."""

    question_embedding: np.ndarray  # (d,) float32
    global_view: torch.Tensor  # (1, tokens_per_crop, d) on the backend's device
    text_tokens: int
    crops: dict[str, int]  # tier -> tiles without the global view

    @property
    def global_view_mean(self) -> np.ndarray:
        """(d,) float32: the mean over the global view's tokens."""
        return self.global_view[0].mean(0).float().cpu().numpy()


class StagedVLM(VLMBackend, Protocol):
    """A backend whose request can be answered stage by stage, so a decision can sit between the stages
    (adaptive inference: features -> tier -> vision -> top_k / blocks -> generate). Both backends are one."""

    def request_features(self, sample: VQASample) -> RequestFeatures:
        """The request's features (untimed here: the caller times them)."""
        ...

    def encode_tier(self, sample: VQASample, tier: str, global_view: torch.Tensor) -> torch.Tensor:
        """(1, V, d) vision tokens of `tier`: `global_view` followed by the tier's tiles encoded now."""
        ...

    def generate_from_vision(self, vision_tokens: torch.Tensor, sample: VQASample, config: KnobConfig,
                             max_new_tokens: int, clock: StageClock) -> list[int]:
        """Greedy ids (up to and including the first EOS, at most `max_new_tokens`) from the vision tokens
        under `config`'s top_k and blocks, prefill and each decode step timed on `clock`."""
        ...

    def decode_answer(self, ids: Sequence[int]) -> str:
        """The answer text of generated ids (EOS and what follows it dropped)."""
        ...


BACKENDS = ("base_vlm", "molmoe_arch")
ENGINES = ("eager", "graph", "fused")  # molmoe_arch generation: Python-dispatched forwards, CUDA-graph replay,
# or CUDA-graph replay with on-device tiling and Triton decode kernels (core/vlm/fused_decode.py)
