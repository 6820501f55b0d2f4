"""How the three knobs reach a Molmo-style MoE VLM: shared by both backends (`base_vlm`, `molmoe_arch`).

  tier              -> a tile grid: `select_grid` picks the (rows, cols) whose aspect ratio is closest
                       to the image's within the tier's crop band; `cut_tiles` cuts the resized image
                       into those tiles, row-major (each backend adds its own global view and pixel
                       normalisation around it).
  top_k             -> the `top_k` of every block's router (OlmoeTopKRouter.forward reads it on every
                       call; it softmaxes over all experts and does not renormalise the top-k weights,
                       as in MolmoE).
  active blocks     -> the decoder's `model.layers` swapped for a sub-ModuleList. Each kept block keeps
                       its own `layer_idx`, so a KV cache built for every block stores a kept block's
                       keys/values at its own index and a skipped block's slot stays empty; block 0
                       must run because the cache reads the sequence length from it.

`decoder_knobs` sets top_k and the blocks for the duration of a `with` block and restores the decoder
exactly afterwards, also when the block raises.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from core.knobs import TIERS, KnobSpace

# --- tier: the tile grid ---------------------------------------------------------------------------


def select_grid(width: int, height: int, max_crops: int, min_crops: int = 1) -> tuple[int, int]:
    """(rows, cols) with min_crops <= rows * cols <= max_crops whose aspect ratio (cols/rows) is closest
    to the image's.

    Closeness is measured on a log scale (2:1 and 1:2 are equally far from 1:1) and rounded to 9
    decimals, so mathematically equal distances tie whatever the float rounding; ties go to the grid
    with more tiles (a higher tier never sees fewer pixels), then to fewer rows.
    """
    if not 1 <= min_crops <= max_crops:
        raise ValueError(f"crop band [{min_crops}, {max_crops}] is empty (need 1 <= min_crops <= max_crops)")
    target = math.log(width / height)
    grids = [(r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops // r + 1) if r * c >= min_crops]
    return min(grids, key=lambda g: (round(abs(math.log(g[1] / g[0]) - target), 9), -g[0] * g[1], g[0]))


def tier_crop_band(space: KnobSpace, tier: str) -> tuple[int, int]:
    """(min, max) crops of a tier: above the next-lower tier's cap, up to this tier's cap.

    The floor keeps tiers distinct: without it an image whose aspect ratio one small grid already
    matches (e.g. 16:9 -> 1x2) would get the same crops at every tier. (`base_vlm` needs no floor:
    the suite's 2:1 images give a different grid at each of its caps.)
    """
    i = space.tier_index(tier)
    low = space.tier_max_crops[TIERS[i - 1]] + 1 if i > 0 else 1
    return low, space.max_crops(tier)


def cut_tiles(pixels: torch.Tensor, rows: int, cols: int, crop_px: int) -> torch.Tensor:
    """(C, rows * crop_px, cols * crop_px) image -> (rows * cols, C, crop_px, crop_px) tiles, row-major."""
    channels = pixels.shape[0]
    if tuple(pixels.shape[1:]) != (rows * crop_px, cols * crop_px):
        raise ValueError(f"pixels {tuple(pixels.shape)} do not fit a {rows}x{cols} grid of {crop_px}-px tiles")
    tiles = pixels.unfold(1, crop_px, crop_px).unfold(2, crop_px, crop_px)  # (C, rows, cols, S, S)
    return tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, channels, crop_px, crop_px)


# --- top_k and the active blocks -------------------------------------------------------------------


def moe_router(layer: nn.Module) -> nn.Module:
    """The module whose `top_k` the MoE forward reads (transformers 5: `mlp.gate`, an OlmoeTopKRouter)."""
    gate = getattr(layer.mlp, "gate", None)
    if gate is not None and hasattr(gate, "top_k"):
        return gate
    if hasattr(layer.mlp, "top_k"):  # older transformers kept top_k on the MoE block itself
        return layer.mlp
    raise AttributeError(f"cannot find the top_k of MoE block {type(layer.mlp).__name__}")


@contextmanager
def decoder_knobs(decoder: nn.Module, top_k: int, blocks: Sequence[int]) -> Iterator[None]:
    """Run only `blocks` of an OLMoE causal LM (`decoder.model.layers`) with `top_k` experts per token.

    Also sets the decoder's `num_experts_per_tok`, which the router load-balancing loss reads in
    training. Checks the arguments before touching the decoder; restores layers, every router's
    top_k and num_experts_per_tok on exit.
    """
    layers = decoder.model.layers
    blocks = tuple(int(b) for b in blocks)
    if list(blocks) != sorted(set(blocks)) or not blocks or blocks[0] != 0 or blocks[-1] >= len(layers):
        raise ValueError(f"active blocks must be ascending, unique, start with block 0 and lie below {len(layers)}: {blocks}")
    num_experts = decoder.config.num_experts
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must lie in [1, {num_experts}]")
    routers = [moe_router(layer) for layer in layers]
    saved_top_k = [router.top_k for router in routers]
    saved_per_token = decoder.num_experts_per_tok
    try:
        for router in routers:
            router.top_k = int(top_k)
        decoder.num_experts_per_tok = int(top_k)
        decoder.model.layers = nn.ModuleList([layers[i] for i in blocks])
        yield
    finally:
        decoder.model.layers = layers
        for router, k in zip(routers, saved_top_k):
            router.top_k = k
        decoder.num_experts_per_tok = saved_per_token
