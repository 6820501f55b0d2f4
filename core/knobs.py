"""The one place that knows knob option values.

Three knobs trade accuracy for latency:
  tier              -> how many image crops feed the vision tower (each tier has a maximum crop count)
  top_k             -> experts per token in every MoE block
  num_active_blocks -> how many decoder blocks run; the first and last always run, the rest are
                       dropped least-important first.

Every backend declares a `KnobSpace` of the same shape (3 tiers, 5 top_k options, 5 block options).
The profiler, estimator, controllers, lookup tables and inference all import this module, so knob
options can never drift apart between them (a pitfall of the original study).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Iterable, Sequence

TIERS: tuple[str, ...] = ("low", "medium", "high")
# The knob names, as columns of every table (profile rows, controller data, estimator inputs).
KNOBS: tuple[str, ...] = ("tier", "top_k", "num_active_blocks")


class KnobOutOfSpaceError(ValueError):
    """A knob value that the backend's knob space does not contain."""


@dataclass(frozen=True, order=True)
class KnobConfig:
    """One point of the knob grid."""

    tier: str
    top_k: int
    num_active_blocks: int

    def as_dict(self) -> dict[str, object]:
        return {"tier": self.tier, "top_k": self.top_k, "num_active_blocks": self.num_active_blocks}

    @property
    def key(self) -> str:
        """Stable, filename-safe identifier, e.g. 'high-k8-b16'."""
        return f"{self.tier}-k{self.top_k}-b{self.num_active_blocks}"


@dataclass(frozen=True)
class KnobSpace:
    """The knob options of one backend.

    `tier_max_crops` maps each tier (in TIERS order) to its maximum number of image tiles; the global
    view comes on top, so vision tokens = (crops + 1) * tokens_per_crop.
    """

    name: str
    tier_max_crops: dict[str, int]
    top_k_options: tuple[int, ...]
    block_options: tuple[int, ...]
    num_blocks: int
    num_experts: int
    tokens_per_crop: int
    default_top_k: int
    _grid: tuple[KnobConfig, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(self.tier_max_crops) != TIERS:
            raise ValueError(f"knob space {self.name!r}: tiers must be {TIERS}, got {tuple(self.tier_max_crops)}")
        crops = list(self.tier_max_crops.values())
        if crops != sorted(crops) or len(set(crops)) != len(crops) or crops[0] < 1:
            raise ValueError(f"knob space {self.name!r}: tier crop caps must be increasing and >= 1, got {crops}")
        if len(self.top_k_options) != 5 or len(self.block_options) != 5:
            raise ValueError(f"knob space {self.name!r}: needs 5 top_k and 5 block options")
        if list(self.top_k_options) != sorted(set(self.top_k_options)) or self.top_k_options[0] < 1:
            raise ValueError(f"knob space {self.name!r}: top_k options must be increasing and >= 1")
        if self.top_k_options[-1] > self.num_experts:
            raise ValueError(f"knob space {self.name!r}: top_k {self.top_k_options[-1]} > {self.num_experts} experts")
        if list(self.block_options) != sorted(set(self.block_options)):
            raise ValueError(f"knob space {self.name!r}: block options must be increasing")
        if self.block_options[0] < 2 or self.block_options[-1] > self.num_blocks:
            raise ValueError(f"knob space {self.name!r}: block options must lie in [2, {self.num_blocks}]")
        if self.default_top_k not in self.top_k_options:
            raise ValueError(f"knob space {self.name!r}: default_top_k {self.default_top_k} not an option")
        grid = tuple(
            KnobConfig(t, k, b) for t, k, b in product(TIERS, self.top_k_options, self.block_options)
        )
        object.__setattr__(self, "_grid", grid)

    # --- validation -------------------------------------------------------------------------
    def validate(self, config: KnobConfig) -> KnobConfig:
        """Return `config` unchanged, or raise KnobOutOfSpaceError naming the offending knob."""
        if config.tier not in self.tier_max_crops:
            raise KnobOutOfSpaceError(
                f"tier={config.tier!r} is outside knob space {self.name!r} (options: {list(TIERS)})"
            )
        if config.top_k not in self.top_k_options:
            raise KnobOutOfSpaceError(
                f"top_k={config.top_k} is outside knob space {self.name!r} (options: {list(self.top_k_options)})"
            )
        if config.num_active_blocks not in self.block_options:
            raise KnobOutOfSpaceError(
                f"num_active_blocks={config.num_active_blocks} is outside knob space {self.name!r} "
                f"(options: {list(self.block_options)})"
            )
        return config

    def make(self, tier: str, top_k: int, num_active_blocks: int) -> KnobConfig:
        return self.validate(KnobConfig(str(tier), int(top_k), int(num_active_blocks)))

    # --- the grid and its named corners --------------------------------------------------------
    def grid(self) -> list[KnobConfig]:
        """All 3 x 5 x 5 = 75 configs, tier-major, ascending."""
        return list(self._grid)

    def full(self) -> KnobConfig:
        """The unreduced model: highest tier, the trained top_k, every block."""
        return KnobConfig(TIERS[-1], self.default_top_k, self.num_blocks if self.num_blocks in self.block_options else self.block_options[-1])

    def minimal(self) -> KnobConfig:
        """The cheapest config: lowest tier, fewest experts, fewest blocks."""
        return KnobConfig(TIERS[0], self.top_k_options[0], self.block_options[0])

    def max_crops(self, tier: str) -> int:
        if tier not in self.tier_max_crops:
            raise KnobOutOfSpaceError(f"tier={tier!r} is outside knob space {self.name!r} (options: {list(TIERS)})")
        return self.tier_max_crops[tier]

    def vision_tokens(self, crops: int) -> int:
        """Vision tokens for `crops` tiles plus the global view."""
        return (crops + 1) * self.tokens_per_crop

    def tier_index(self, tier: str) -> int:
        return TIERS.index(tier)


def default_drop_order(num_blocks: int) -> list[int]:
    """Middle blocks in the order they are dropped before importance is measured.

    Later middle blocks first: a neutral guess that keeps the early blocks, which the original study
    found the most important. The importance experiment replaces it with a measured order.
    """
    return list(range(num_blocks - 2, 0, -1))


def active_blocks(num_blocks: int, num_active: int, drop_order: Sequence[int] | None = None) -> tuple[int, ...]:
    """Indices of the blocks that run, ascending.

    The first and last block always run; middle blocks are dropped in `drop_order` (ascending
    importance, i.e. least important first) until `num_active` remain.
    """
    if not 2 <= num_active <= num_blocks:
        raise KnobOutOfSpaceError(f"num_active_blocks={num_active} must lie in [2, {num_blocks}]")
    order = list(drop_order) if drop_order is not None else default_drop_order(num_blocks)
    middle = set(range(1, num_blocks - 1))
    if sorted(order) != sorted(middle):
        raise ValueError(
            f"drop order must be a permutation of the middle blocks 1..{num_blocks - 2}, got {order}"
        )
    dropped = set(order[: num_blocks - num_active])
    return tuple(i for i in range(num_blocks) if i not in dropped)


def drop_order_from_importance(importance: dict[int, float], num_blocks: int) -> list[int]:
    """Ascending-importance order of the middle blocks from `{block_index: score}` (higher = more important)."""
    middle = range(1, num_blocks - 1)
    missing = [i for i in middle if i not in importance]
    if missing:
        raise ValueError(f"importance scores lack middle blocks {missing}")
    return sorted(middle, key=lambda i: (importance[i], i))


def configs_from_records(records: Iterable[dict[str, object]], space: KnobSpace) -> list[KnobConfig]:
    """Validated KnobConfigs from dict-like rows with tier/top_k/num_active_blocks."""
    return [space.make(r["tier"], r["top_k"], r["num_active_blocks"]) for r in records]  # type: ignore[arg-type]


# --- the spaces of the shipped backends --------------------------------------------------------

# MolmoE-1B reference: 16 blocks, 64 experts, top-8 trained, 144 tokens per crop.
MOLMOE_SPACE = KnobSpace(
    name="molmoe_arch",
    tier_max_crops={"low": 3, "medium": 6, "high": 12},
    top_k_options=(4, 6, 8, 10, 12),
    block_options=(8, 10, 12, 14, 16),
    num_blocks=16,
    num_experts=64,
    tokens_per_crop=144,
    default_top_k=8,
)

SPACES: dict[str, KnobSpace] = {MOLMOE_SPACE.name: MOLMOE_SPACE}


def register_space(space: KnobSpace) -> KnobSpace:
    """Make a backend's space known by name (backends call this at import)."""
    SPACES[space.name] = space
    return space


def get_space(name: str) -> KnobSpace:
    if name not in SPACES:
        raise KnobOutOfSpaceError(f"unknown backend knob space {name!r} (known: {sorted(SPACES)})")
    return SPACES[name]

# The embedded default: the small MoE VLM the platform trains itself (core/vlm/base_vlm.py).
# Values are owned by the base-VLM work; keep the shape (3 tiers, 5 top_k, 5 block options).
# Suite images are 2:1, so the caps 1 / 2 / 8 give 1x1, 1x2 and 2x4 tile grids: each tier doubles the
# resolution of the one below (small text is legible only at the high tier). The full config runs 6 of
# 8 experts per token; the options below it cost accuracy as MolmoE's lower top_k do.
BASE_VLM_SPACE = register_space(
    KnobSpace(
        name="base_vlm",
        tier_max_crops={"low": 1, "medium": 2, "high": 8},
        top_k_options=(1, 2, 3, 4, 6),
        block_options=(4, 5, 6, 7, 8),
        num_blocks=8,
        num_experts=8,
        tokens_per_crop=4,
        default_top_k=6,
    )
)
