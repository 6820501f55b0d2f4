"""Greedy generation of a transformers decoder from captured CUDA graphs over one StaticCache.

Why: transformers' eager OLMoE at MolmoE-1B size is launch-bound on a GPU. A decode step is about
23 ms of Python dispatch around 4 ms of kernels, and the dispatch jitters (CV 0.1-0.2 on the lent
H200), which buries the knobs' effects and puts a floor under any estimator scored on such a table.
A replayed graph runs the same kernels without Python in between (measured CV 0.002), which is
also how serving engines run decode.

Layout:
- one `StaticCache` of `max_cache_len` slots, every layer allocated up front (`initialise`, full
  model), so no capture ever allocates cache memory; it is reset in place before each request. The
  cache's position counter is a device tensor that each K/V write advances, so a replayed step
  lands in the next slot and RoPE positions follow.
- decode: one graph per knob key (top_k, active blocks: both are baked into the kernels), captured
  on first use and kept; it reads the token buffer and writes the greedy next token back into it.
- prefill: the shapes change with every prompt, so each request captures its own graph (text
  embedding, concatenation with the vision tokens, decoder, argmax), replays it once and drops it.
- vision: one graph per crop count, fed through a static pixel buffer.
- a `decoder` (optional; `core.vlm.fused_decode.FusedDecoder` for the fused engine) replaces
  transformers' decode step inside the same graphs: `start(length)` after prefill, `step(knob_key)`
  per token, with its own device-side position, so its attention spans only the filled slots.
With `use_graphs=False` (always on a CPU) every "replay" runs the function eagerly, so the
static-cache code path is the same one the CPU tests check against the eager DynamicCache path.
Static-cache attention spans all `max_cache_len` slots (masked), so decode cost does not grow with
the prompt here: the table this engine writes measures that engine, and says so in its rows' backend.
"""

from __future__ import annotations

from typing import Callable, Hashable, Protocol

import torch
from torch import nn

from core.timing import StageClock


class CapturedCall:
    """A zero-argument function, captured as a CUDA graph (or run eagerly at each replay)."""

    def __init__(self, fn: Callable[[], object], use_graph: bool, warmup: int = 2) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        if use_graph:
            # Warm-up on a side stream first, as capture requires (lazy cuBLAS/allocator set-up).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn()
        else:
            self.output = None

    def replay(self) -> object:
        if self.graph is None:
            self.output = self.fn()
        else:
            self.graph.replay()
        return self.output


class DecodeStep(Protocol):
    """A decode step over the generator's cache that reads and writes its `step_ids`."""

    def start(self, length: int) -> None:
        """The next step writes cache slot `length` (the prompt has filled the slots before it)."""
        ...

    def step(self, knob_key: Hashable) -> None:
        """Token in step_ids -> greedy next token in step_ids; advances the decoder's own position."""
        ...


class GraphedGenerator:
    """Greedy decoding of `lm` (a transformers causal LM taking `inputs_embeds`) from replayed graphs."""

    def __init__(self, lm: nn.Module, device: torch.device, max_cache_len: int, use_graphs: bool | None = None) -> None:
        from transformers import StaticCache

        self.lm, self.device, self.max_cache_len = lm, torch.device(device), int(max_cache_len)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else bool(use_graphs)
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.cache = StaticCache(config=lm.config, max_cache_len=self.max_cache_len)
        self.step_ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._decode: dict[Hashable, CapturedCall] = {}
        self._vision: dict[Hashable, tuple[torch.Tensor, CapturedCall]] = {}
        self._initialised = False
        self.decoder: DecodeStep | None = None  # None: transformers' forward decodes

    @property
    def decode_graphs(self) -> int:
        return len(self._decode)

    def initialise(self, num_layers: int) -> None:
        """Allocate every cache layer with one eager token through the full model (call with all
        `num_layers` blocks in place, i.e. outside any knob that drops blocks)."""
        if self._initialised:
            return
        if len(self.lm.model.layers) != num_layers:
            raise ValueError(f"initialise needs all {num_layers} blocks in place, found {len(self.lm.model.layers)}")
        self.lm(input_ids=self.step_ids, past_key_values=self.cache, use_cache=True)
        self.cache.reset()
        self._initialised = True

    def _decode_step(self) -> None:
        out = self.lm(input_ids=self.step_ids, past_key_values=self.cache, use_cache=True)
        self.step_ids.copy_(out.logits[:, -1:].argmax(dim=-1))

    def vision(self, key: Hashable, encoder: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        """encoder(pixels) from the graph kept for `key` (one per pixel shape); the result is valid
        until this key's next call."""
        if key not in self._vision:
            buffer = torch.empty_like(pixels, device=self.device)
            buffer.copy_(pixels)
            self._vision[key] = (buffer, CapturedCall(lambda: encoder(buffer), self.use_graphs))
        buffer, call = self._vision[key]
        if buffer.shape != pixels.shape:
            raise ValueError(f"vision graph {key!r} was captured for pixels {tuple(buffer.shape)}, got {tuple(pixels.shape)}")
        buffer.copy_(pixels, non_blocking=True)
        return call.replay()  # type: ignore[return-value]

    @torch.inference_mode()
    def generate(
        self,
        prefix_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        num_tokens: int,
        knob_key: Hashable,
        clock: StageClock,
        eos_token_id: int | None = None,
    ) -> list[int]:
        """Greedy tokens after [prefix_embeds ; embed(text_ids)], at most `num_tokens` (fewer if
        `eos_token_id` is given and produced). Stages: one "prefill" (first token included) and one
        "decode" per further token, timed by `clock` around the replays only. The knobs (top_k,
        active blocks) must be applied by the caller and identified by `knob_key`."""
        if not self._initialised:
            raise RuntimeError("GraphedGenerator.initialise must run (with all blocks) before generate")
        length = prefix_embeds.shape[1] + text_ids.shape[1]
        if length + num_tokens - 1 > self.max_cache_len:
            raise ValueError(f"a prompt of {length} tokens plus {num_tokens} output tokens exceeds the static cache's "
                             f"{self.max_cache_len} slots")
        embed = self.lm.get_input_embeddings()

        def prefill() -> None:
            embeds = torch.cat([prefix_embeds, embed(text_ids)], dim=1)
            out = self.lm(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.step_ids.copy_(out.logits[:, -1:].argmax(dim=-1))

        # Captures run warm-up steps that write into the cache: every capture comes before the reset
        # that starts this request.
        if knob_key not in self._decode:
            self.cache.reset()
            if self.decoder is None:
                step: Callable[[], None] = self._decode_step
            else:
                decoder = self.decoder
                decoder.start(0)  # warm-up steps must write inside the cache
                step = lambda: decoder.step(knob_key)  # noqa: E731
            self._decode[knob_key] = CapturedCall(step, self.use_graphs)
        decode = self._decode[knob_key]
        self.cache.reset()
        prefill_call = CapturedCall(prefill, self.use_graphs, warmup=1)
        self.cache.reset()

        with clock.stage("prefill"):
            prefill_call.replay()
        if self.decoder is not None:
            self.decoder.start(length)  # between the stages: in neither's time
        tokens = [self.step_ids.clone()]
        for _ in range(num_tokens - 1):
            if eos_token_id is not None and int(tokens[-1].item()) == eos_token_id:
                break
            with clock.stage("decode"):
                decode.replay()
            tokens.append(self.step_ids.clone())
        del prefill_call  # frees its graph's memory pool
        return torch.cat(tokens, dim=1)[0].tolist()


__all__ = ["CapturedCall", "GraphedGenerator"]
