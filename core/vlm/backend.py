"""What every VLM backend offers the profiler, importance, evaluation and adaptive inference.

Backends: `base_vlm` (core/vlm/base_vlm.py, the trained embedded default) and `molmoe_arch`
(core/vlm/molmoe_arch.py, MolmoE-1B-sized random weights, latency only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

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


BACKENDS = ("base_vlm", "molmoe_arch")
ENGINES = ("eager", "graph", "fused")  # molmoe_arch generation: Python-dispatched forwards, CUDA-graph replay,
# or CUDA-graph replay with on-device tiling and Triton decode kernels (core/vlm/fused_decode.py)
