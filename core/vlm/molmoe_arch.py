"""MolmoE-1B-sized VLM with random weights, for GPU latency profiling of the three knobs.

Architecture (MolmoE-1B's published configuration), built from transformers components:
  image -> tiles (tier -> crop grid) + one global crop, each 336x336
        -> CLIP ViT-L/14 (23 of 24 layers run), features of layers -2 and -9 concatenated (2 x 1024)
        -> 2x2 attention pooling (query = mean of the window) -> 144 tokens per crop
        -> SwiGLU projector MLP -> d_model 2048
  [vision tokens ; text tokens] as inputs_embeds -> OLMoE decoder (OlmoeForCausalLM: 16 blocks,
        d_model 2048, 16 heads, 64 experts of intermediate 1024, top-8, vocab 50280 + 128)
  greedy decoding with a KV cache, one timed forward per output token after the first.

Knobs (`core.vlm.knob_application`, shared with the base VLM; applied inside `knobs_applied`, which
restores the model exactly afterwards):
  tier              -> crop grid within the tier's crop band (`select_grid`, `tier_crop_band`)
  top_k             -> the router's `top_k` in every block
  active blocks     -> `model.model.layers` swapped for a sub-ModuleList (block 0 always runs)

Engines: "eager" runs transformers' forward per token (DynamicCache), which is launch-bound and
host-jittery on a GPU; "graph" (`core.vlm.graph_engine`) replays vision, prefill and each decode step
as captured CUDA graphs over a StaticCache, which times the kernels alone; "fused" is the graph engine
with the image tiled and normalised on the device inside the vision graph (`device_crops`; the host
only uploads the image's bytes, timed apart in `last_vision_host_ms`) and each decode step run by
Triton kernels (`core.vlm.fused_decode`: fused MoE, attention over the filled cache) on CUDA. On a
CPU "fused" decodes with transformers (the reference), unless TRITON_INTERPRET=1 runs the kernels.

Latency only: weights are random, so answers are meaningless (accuracy is NaN in profiles). Text is
"tokenised" one token per whitespace-separated word (a stable hash into the vocabulary), so a
question of N words is N text tokens. Outputs are forced to a fixed length with
`force_output_tokens` so decode is timed on a known number of forwards.
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.knobs import MOLMOE_SPACE, TIERS, KnobConfig, KnobSpace, active_blocks, default_drop_order
from core.vlm.fused_decode import FusedDecoder, fused_available
from core.vlm.graph_engine import GraphedGenerator
from core.timing import StageClock
from core.vlm.backend import ENGINES, GenerationResult, RequestFeatures
from core.vlm.knob_application import cut_tiles, decoder_knobs, select_grid, tier_crop_band
from core.vqa.sample import VQASample

# CLIP image normalisation.
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class MolmoeArchDims:
    """Sizes of the architecture; `reference` is MolmoE-1B, `tiny` keeps the structure for CPU tests."""

    # vision tower
    image_size: int
    patch_size: int
    vit_hidden: int
    vit_heads: int
    vit_intermediate: int
    vit_depth: int  # layers of the full ViT
    vit_layers_used: int  # layers actually run (features never come from the last one)
    vit_feature_layers: tuple[int, ...]  # hidden-state indices relative to the full ViT (negative)
    pool_window: int  # 2 -> 2x2 pooling
    pool_dim: int
    projector_hidden: int
    # decoder
    d_model: int
    num_blocks: int
    num_heads: int
    num_experts: int
    top_k: int
    expert_intermediate: int
    text_vocab: int  # ordinary tokens
    extra_vocab: int  # special tokens on top (image markers etc. in Molmo)
    max_positions: int

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + self.extra_vocab

    @property
    def tokens_per_crop(self) -> int:
        side = self.image_size // self.patch_size
        return (side // self.pool_window) ** 2


SIZE_PRESETS: dict[str, MolmoeArchDims] = {
    "reference": MolmoeArchDims(
        image_size=336, patch_size=14, vit_hidden=1024, vit_heads=16, vit_intermediate=4096,
        vit_depth=24, vit_layers_used=23, vit_feature_layers=(-2, -9), pool_window=2, pool_dim=1024,
        projector_hidden=4096, d_model=2048, num_blocks=16, num_heads=16, num_experts=64, top_k=8,
        expert_intermediate=1024, text_vocab=50280, extra_vocab=128, max_positions=4096,
    ),
    # Same block count, experts and knob space as the reference; everything else shrunk.
    "tiny": MolmoeArchDims(
        image_size=56, patch_size=14, vit_hidden=32, vit_heads=2, vit_intermediate=64,
        vit_depth=4, vit_layers_used=3, vit_feature_layers=(-2, -3), pool_window=2, pool_dim=32,
        projector_hidden=64, d_model=64, num_blocks=16, num_heads=4, num_experts=64, top_k=8,
        expert_intermediate=16, text_vocab=500, extra_vocab=12, max_positions=2048,
    ),
}


# --- tiling ------------------------------------------------------------------------------------


def _to_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
    return (arr - _CLIP_MEAN) / _CLIP_STD  # (H, W, 3)


def global_view_pixels(image: Image.Image, crop_size: int) -> torch.Tensor:
    """(3, S, S): the whole image resized to one crop, CLIP-normalised (the same at every tier)."""
    return torch.from_numpy(_to_pixels(image, (crop_size, crop_size))).permute(2, 0, 1)


def image_crops(image: Image.Image, rows: int, cols: int, crop_size: int) -> torch.Tensor:
    """(1 + rows*cols, 3, S, S): the global view (whole image resized) then the tiles, row-major."""
    whole = global_view_pixels(image, crop_size)
    grid = torch.from_numpy(_to_pixels(image, (cols * crop_size, rows * crop_size))).permute(2, 0, 1)
    return torch.cat([whole[None], cut_tiles(grid, rows, cols, crop_size)])


def image_uint8(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 RGB: all the host does for the fused engine's vision stage."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


@functools.lru_cache(maxsize=4)
def _clip_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP mean and std as (3, 1, 1) tensors on `device`, made once (a graph capture cannot copy them)."""
    return (torch.tensor(_CLIP_MEAN, device=device).view(3, 1, 1), torch.tensor(_CLIP_STD, device=device).view(3, 1, 1))


def device_crops(image_u8: torch.Tensor, rows: int, cols: int, crop_size: int) -> torch.Tensor:
    """`image_crops` as tensor ops on `image_u8`'s device: (H, W, 3) uint8 -> (1 + rows*cols, 3, S, S) fp32.

    Antialiased bicubic resampling is PIL's filter (a = -0.5); the result is rounded and clipped to
    8 bits as PIL's is, then CLIP-normalised. Matches `image_crops` to within a grey level on average.
    """
    x = image_u8.permute(2, 0, 1)[None].float()
    mean, std = _clip_stats(x.device)

    def resized(height: int, width: int) -> torch.Tensor:
        y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
        return (y.round().clamp(0, 255) / 255.0 - mean) / std

    whole = resized(crop_size, crop_size)
    grid = resized(rows * crop_size, cols * crop_size)
    return torch.cat([whole[None], cut_tiles(grid, rows, cols, crop_size)])


# --- text ------------------------------------------------------------------------------------


def prompt_token_ids(question: str, text_vocab: int) -> list[int]:
    """One token per whitespace-separated word, by a stable hash (no tokenizer needed for latency)."""
    return [zlib.crc32(w.encode("utf-8")) % text_vocab for w in question.split()]


class PromptTokenizer(Protocol):
    """A real checkpoint's tokenizer (`core.vlm.molmoe_checkpoint.MolmoeTokenizer`): question -> prompt ids, ids -> text."""

    eos_token_id: int

    def prompt_ids(self, question: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# --- vision modules ------------------------------------------------------------------------


class AttentionPool2d(nn.Module):
    """Pools each `w x w` window of patch features into one token; the query is the window mean."""

    def __init__(self, in_dim: int, inner_dim: int, out_dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.q = nn.Linear(in_dim, inner_dim)
        self.k = nn.Linear(in_dim, inner_dim)
        self.v = nn.Linear(in_dim, inner_dim)
        self.out = nn.Linear(inner_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, side*side, C) -> (N, (side/w)^2, out)
        n, p, c = x.shape
        side, w = int(math.isqrt(p)), self.window
        x = x.view(n, side // w, w, side // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        q = self.q(x.mean(dim=1, keepdim=True))
        k, v = self.k(x), self.v(x)
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(q.shape[0], -1)
        return self.out(o).view(n, (side // w) ** 2, -1)


class SwiGLUProjector(nn.Module):
    """Image projector: pooled features -> d_model."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoeVision(nn.Module):
    """ViT features (two layers concatenated) -> attention pooling -> projector."""

    def __init__(self, dims: MolmoeArchDims) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(
            hidden_size=dims.vit_hidden, intermediate_size=dims.vit_intermediate,
            num_hidden_layers=dims.vit_layers_used, num_attention_heads=dims.vit_heads,
            image_size=dims.image_size, patch_size=dims.patch_size, hidden_act="quick_gelu",
        )
        self.vit = CLIPVisionModel(cfg)
        # hidden_states[i] of the full ViT is the output of layer i (0 = embeddings); a negative
        # index f means full_depth + 1 + f, which must be among the layers actually run.
        self.feature_index = [dims.vit_depth + 1 + f for f in dims.vit_feature_layers]
        if max(self.feature_index) > dims.vit_layers_used:
            raise ValueError(f"feature layers {dims.vit_feature_layers} need more than {dims.vit_layers_used} ViT layers")
        feat_dim = dims.vit_hidden * len(dims.vit_feature_layers)
        self.pool = AttentionPool2d(feat_dim, dims.vit_hidden, dims.pool_dim, dims.vit_heads, dims.pool_window)
        self.projector = SwiGLUProjector(dims.pool_dim, dims.projector_hidden, dims.d_model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, tokens_per_crop, d_model)
        hidden = self.vit(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[i][:, 1:] for i in self.feature_index], dim=-1)  # drop CLS
        return self.projector(self.pool(feats))


# --- the backend -----------------------------------------------------------------------------


class MolmoeArchBackend:
    """VLMBackend `molmoe_arch`: MolmoE-1B-sized, random weights, latency only."""

    name: str = "molmoe_arch"
    space: KnobSpace = MOLMOE_SPACE
    last_vision_host_ms: float = float("nan")  # fused engine: the last request's image conversion + upload

    def __init__(
        self,
        size: str = "reference",
        device: str | torch.device | None = None,
        seed: int = 0,
        experts_implementation: str | None = None,
        dims: MolmoeArchDims | None = None,
        engine: str = "eager",
    ) -> None:
        """`size`: "reference" (MolmoE-1B dims) or "tiny" (CPU tests); `device` defaults to CUDA if present.

        bf16 on a GPU, fp32 on a CPU. `experts_implementation` is passed to transformers
        (None = its default, "grouped_mm" where available); the one in use is `self.experts_implementation`.
        `engine`: "eager" (DynamicCache, one Python-dispatched forward per token) or "graph" (StaticCache,
        vision / prefill / decode replayed as CUDA graphs: `core.vlm.graph_engine`; on a CPU the same
        static-cache path runs eagerly).
        """
        from transformers import OlmoeConfig, OlmoeForCausalLM

        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is unknown (choose from: {', '.join(ENGINES)})")
        if dims is None:
            if size not in SIZE_PRESETS:
                raise ValueError(f"size={size!r} is not a molmoe_arch preset (options: {sorted(SIZE_PRESETS)})")
            dims = SIZE_PRESETS[size]
        if dims.num_blocks != self.space.num_blocks or dims.num_experts != self.space.num_experts:
            raise ValueError("molmoe_arch dims must keep the knob space's 16 blocks and 64 experts")
        self.size, self.dims = size, dims
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._drop_order: list[int] = default_drop_order(dims.num_blocks)

        cfg = OlmoeConfig(
            vocab_size=dims.vocab_size, hidden_size=dims.d_model, intermediate_size=dims.expert_intermediate,
            num_hidden_layers=dims.num_blocks, num_attention_heads=dims.num_heads, num_experts=dims.num_experts,
            num_experts_per_tok=dims.top_k, norm_topk_prob=False, max_position_embeddings=dims.max_positions,
            pad_token_id=1, eos_token_id=dims.text_vocab - 1, tie_word_embeddings=False,
        )
        self.eos_token_id = dims.text_vocab - 1
        torch.manual_seed(seed)
        kwargs = {"dtype": self.dtype}
        if experts_implementation is not None:
            kwargs["experts_implementation"] = experts_implementation
        with torch.device(self.device):  # build the weights where they run (the reference LM is ~13 GB in bf16)
            self.lm = OlmoeForCausalLM._from_config(cfg, **kwargs).eval()
            self.vision = MolmoeVision(dims).to(self.dtype).eval()
        self.experts_implementation = str(getattr(self.lm.config, "_experts_implementation", "eager"))
        self.engine = engine
        self._generator: GraphedGenerator | None = None
        # None: hash tokenisation (random weights); a loaded checkpoint sets its own tokenizer here.
        self.tokenizer: PromptTokenizer | None = None

    # --- knobs -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.dims.num_blocks

    @property
    def drop_order(self) -> list[int]:
        return list(self._drop_order)

    def set_drop_order(self, drop_order: Sequence[int]) -> None:
        """Middle blocks in ascending importance (dropped first to last)."""
        active_blocks(self.num_blocks, self.num_blocks, drop_order)  # validates the permutation
        self._drop_order = [int(i) for i in drop_order]

    def blocks_for(self, config: KnobConfig) -> tuple[int, ...]:
        return active_blocks(self.num_blocks, config.num_active_blocks, self._drop_order)

    def crops_for(self, image: Image.Image, tier: str) -> tuple[int, int]:
        """(rows, cols) tile grid for `image` at `tier`."""
        lo, hi = tier_crop_band(self.space, tier)
        return select_grid(image.width, image.height, hi, min_crops=lo)

    @contextmanager
    def knobs_applied(self, top_k: int, blocks: Sequence[int]) -> Iterator[None]:
        """Run only `blocks` with `top_k` experts per token; restores layers and top_k on exit."""
        with decoder_knobs(self.lm, top_k, blocks):
            yield

    # --- inference ---------------------------------------------------------------------------
    def _new_cache(self) -> object:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.lm.config)  # one slot per block; skipped blocks stay empty
        except TypeError:
            return DynamicCache()

    @torch.inference_mode()
    def answer(
        self,
        sample: VQASample,
        config: KnobConfig,
        max_new_tokens: int | None = None,
        force_output_tokens: int | None = None,
        active_blocks_override: Sequence[int] | None = None,
    ) -> GenerationResult:
        """Greedy answer under `config`, timed per stage (vision incl. tiling, prefill, each decode step).

        `active_blocks_override` runs exactly those blocks instead of the ones `config.num_active_blocks`
        and the drop order select (block importance needs arbitrary removal sets); it must include block 0.
        `force_output_tokens` ignores EOS and generates exactly that many tokens.
        """
        self.space.validate(config)
        blocks = tuple(active_blocks_override) if active_blocks_override is not None else self.blocks_for(config)
        n_new = int(force_output_tokens or max_new_tokens or sample.max_new_tokens)
        if n_new < 1:
            raise ValueError(f"need at least one output token, got {n_new}")
        rows, cols = self.crops_for(sample.image, config.tier)
        ids = self.prompt_ids(sample.question)
        clock = StageClock(self.device)
        if self.engine in ("graph", "fused"):
            token_ids, vision_tokens = self._generate_graphed(sample, config.top_k, blocks, rows, cols, ids, n_new,
                                                               force_output_tokens is None, clock)
        else:
            token_ids, vision_tokens = self._generate_eager(sample, config.top_k, blocks, rows, cols, ids, n_new,
                                                            force_output_tokens is None, clock)
        ms = clock.durations_ms()
        text_ids = [t for t in token_ids if t != self.eos_token_id]
        crops = rows * cols
        return GenerationResult(
            text=self.tokenizer.decode(text_ids) if self.tokenizer is not None else " ".join(f"t{t}" for t in text_ids),
            output_tokens=len(token_ids),
            crops=crops,
            vision_tokens=vision_tokens,
            text_tokens=len(ids),
            active_blocks=blocks,
            T_vision_ms=sum(ms["vision"]),
            T_prefill_ms=sum(ms["prefill"]),
            T_decode_ms=sum(ms.get("decode", [])),
            decode_step_ms=list(ms.get("decode", [])),
        )

    def _generate_eager(
        self, sample: VQASample, top_k: int, blocks: tuple[int, ...], rows: int, cols: int, ids: list[int],
        n_new: int, stop_at_eos: bool, clock: StageClock,
    ) -> tuple[list[int], int]:
        with self.knobs_applied(top_k, blocks):
            with clock.stage("vision"):
                pixels = image_crops(sample.image, rows, cols, self.dims.image_size)
                vision = self.vision(pixels.to(self.device, self.dtype)).reshape(1, -1, self.dims.d_model)
            return self._decode_eager(vision, ids, n_new, stop_at_eos, clock), int(vision.shape[1])

    def _decode_eager(self, vision: torch.Tensor, ids: list[int], n_new: int, stop_at_eos: bool,
                      clock: StageClock) -> list[int]:
        """Prefill [vision ; text] and decode greedily under the knobs applied (DynamicCache)."""
        tokens: list[torch.Tensor] = []
        with clock.stage("prefill"):
            text = self.lm.get_input_embeddings()(torch.tensor([ids], dtype=torch.long, device=self.device))
            cache = self._new_cache()
            out = self.lm(
                inputs_embeds=torch.cat([vision, text], dim=1), past_key_values=cache, use_cache=True, logits_to_keep=1
            )
            token = out.logits[:, -1].argmax(dim=-1)
        tokens.append(token)
        for _ in range(n_new - 1):
            # Only an unforced run needs the token on the host (an EOS check syncs the GPU).
            if stop_at_eos and int(token.item()) == self.eos_token_id:
                break
            with clock.stage("decode"):
                out = self.lm(input_ids=token[:, None], past_key_values=cache, use_cache=True)
                token = out.logits[:, -1].argmax(dim=-1)
            tokens.append(token)
        return torch.cat(tokens).tolist()

    # --- stage by stage (core.vlm.backend.StagedVLM: controller features, adaptive inference) ------
    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's token ids: the loaded tokenizer's template, else one hashed id per word."""
        return (self.tokenizer.prompt_ids(question) if self.tokenizer is not None
                else prompt_token_ids(question, self.dims.text_vocab))

    @torch.inference_mode()
    def request_features(self, sample: VQASample) -> RequestFeatures:
        """Mean input embedding of the prompt's tokens, the global view (the whole image at crop size)
        encoded alone, the prompt's text tokens and each tier's tiles from the image size."""
        ids = self.prompt_ids(sample.question)
        embedded = self.lm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))
        whole = global_view_pixels(sample.image, self.dims.image_size)[None]
        global_view = self._encode_crops(whole.to(self.device, self.dtype))
        crops = {tier: int(np.prod(self.crops_for(sample.image, tier))) for tier in TIERS}
        return RequestFeatures(embedded.mean(0).float().cpu().numpy(), global_view, len(ids), crops)

    @torch.inference_mode()
    def encode_tier(self, sample: VQASample, tier: str, global_view: torch.Tensor) -> torch.Tensor:
        """`global_view` then the tier's tiles, encoded eagerly (the ViT sees each crop on its own, so
        this equals encoding the global view with the tiles)."""
        rows, cols = self.crops_for(sample.image, tier)
        tiles = image_crops(sample.image, rows, cols, self.dims.image_size)[1:]
        return torch.cat([global_view, self._encode_crops(tiles.to(self.device, self.dtype))], dim=1)

    @torch.inference_mode()
    def generate_from_vision(self, vision_tokens: torch.Tensor, sample: VQASample, config: KnobConfig,
                             max_new_tokens: int, clock: StageClock) -> list[int]:
        """Prefill and greedy decode under `config`'s top_k and blocks: replayed graphs on the graph and
        fused engines, transformers' forwards on eager. Stops at EOS."""
        self.space.validate(config)
        blocks, ids = self.blocks_for(config), self.prompt_ids(sample.question)
        if self.engine in ("graph", "fused"):
            generator = self.generator()  # before the knobs: initialisation needs every block
            with self.knobs_applied(config.top_k, blocks):
                text_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
                return generator.generate(vision_tokens, text_ids, max_new_tokens, (config.top_k, blocks), clock,
                                          eos_token_id=self.eos_token_id)
        with self.knobs_applied(config.top_k, blocks):
            return self._decode_eager(vision_tokens, ids, max_new_tokens, True, clock)

    def decode_answer(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        ids = ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(f"t{t}" for t in ids)

    @property
    def graph_cache_len(self) -> int:
        """Static-cache slots of the graph engine: the high tier's crops plus the global crop, and
        room for 512 text + output tokens."""
        return self.dims.tokens_per_crop * (self.space.max_crops(TIERS[-1]) + 1) + 512

    def generator(self) -> GraphedGenerator:
        """The graph engine's generator, built and initialised (every cache layer) on first use; for the
        fused engine its decode steps are the Triton decoder's where the kernels can run."""
        if self._generator is None:
            generator = GraphedGenerator(self.lm, self.device, self.graph_cache_len)
            with torch.inference_mode():
                generator.initialise(self.num_blocks)
                if self.engine == "fused" and fused_available(self.device):
                    generator.decoder = FusedDecoder(self.lm, generator.cache, generator.step_ids, self.graph_cache_len)
            self._generator = generator
        return self._generator

    def _encode_crops(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixels).reshape(1, -1, self.dims.d_model)

    def _vision_on_device(
        self, generator: GraphedGenerator, image: Image.Image, rows: int, cols: int, clock: StageClock
    ) -> torch.Tensor:
        """Fused engine: the host converts and uploads the image's bytes (timed on the host clock into
        `last_vision_host_ms`, outside every stage); tiling, normalisation, ViT and projector run as one
        graph per (image shape, grid), timed as the "vision" stage."""
        start = time.perf_counter_ns()
        image_u8 = image_uint8(image).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_vision_host_ms = (time.perf_counter_ns() - start) / 1e6
        size = self.dims.image_size

        def encode(buffer: torch.Tensor) -> torch.Tensor:
            return self._encode_crops(device_crops(buffer, rows, cols, size).to(self.dtype))

        with clock.stage("vision"):
            return generator.vision((tuple(image_u8.shape), rows, cols), encode, image_u8)

    def _generate_graphed(
        self, sample: VQASample, top_k: int, blocks: tuple[int, ...], rows: int, cols: int, ids: list[int],
        n_new: int, stop_at_eos: bool, clock: StageClock,
    ) -> tuple[list[int], int]:
        generator = self.generator()  # before the knobs: initialisation needs every block
        with self.knobs_applied(top_k, blocks):
            if self.engine == "fused":
                vision = self._vision_on_device(generator, sample.image, rows, cols, clock)
            else:
                with clock.stage("vision"):
                    pixels = image_crops(sample.image, rows, cols, self.dims.image_size).to(self.device, self.dtype)
                    vision = generator.vision(tuple(pixels.shape), self._encode_crops, pixels)
            text_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            token_ids = generator.generate(vision, text_ids, n_new, (top_k, blocks), clock,
                                           eos_token_id=self.eos_token_id if stop_at_eos else None)
        return token_ids, int(vision.shape[1])


# --- latency probe samples ---------------------------------------------------------------------


def synthetic_latency_samples(
    prompt_lengths: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    n: int,
    max_new_tokens: int = 32,
    seed: int = 0,
    dataset: str = "latency_probe",
    split: str = "test",
) -> list[VQASample]:
    """`n` probe requests cycling over every (prompt length, image size) pair.

    Sample i has a question of exactly `prompt_lengths[i % P]` words (= text tokens for molmoe_arch)
    and a random-noise image of `image_sizes[(i // P) % I]` (width, height); id '<dataset>:<split>:<i>'.
    """
    if n < 1 or not prompt_lengths or not image_sizes:
        raise ValueError("need n >= 1, at least one prompt length and one image size")
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(prompt_lengths[i % len(prompt_lengths)])
        width, height = image_sizes[(i // len(prompt_lengths)) % len(image_sizes)]
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        question = " ".join(f"w{int(x)}" for x in rng.integers(0, 10_000, size=length))
        samples.append(
            VQASample(
                sample_id=f"{dataset}:{split}:{i}", dataset=dataset, task="latency_probe",
                image=Image.fromarray(pixels), question=question, answers=(), max_new_tokens=max_new_tokens,
            )
        )
    return samples


__all__ = [
    "MolmoeArchBackend", "MolmoeArchDims", "SIZE_PRESETS", "synthetic_latency_samples", "image_crops", "prompt_token_ids",
    "device_crops", "image_uint8",
]
