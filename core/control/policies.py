"""The learned controllers' networks: a budget encoding plus request features in, knob logits out.

  LatencyBudgetEncoder   sinusoidal features of the normalised budget f = B / L_full, then an MLP
                         (the seed's AdaLLaVA-style latency token)
  ControllerNet          budget encoding + question features (+ global-view features) -> a trunk ->
                         one head per knob: tier (3), top_k (5), num_active_blocks (5), each over the
                         knob space's options in order (TIERS, top_k_options, block_options)
  TierControllerNet      the stage-1 net of the two-stage controller: the same inputs, the tier head alone
  stage-2 net            a ControllerNet with per-tier top_k and blocks heads (`per_tier`): one set of
                         logits per tier, the one of the tier stage 1 picked applies
  StackedNumpyForward    stage 1 and stage 2 side by side in one chain of numpy calls (one request)

The inputs are what is known before the tiles are encoded: the question's pooled token embeddings
(`q_emb_*`) and the pooled global view (`gv_*`, which every tier encodes anyway). The feature scalers
are buffers fitted on the training samples (`fit_scalers`) and travel with the weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.linalg import block_diag
from scipy.special import expit
from torch import nn

from core.knobs import KNOBS, TIERS, KnobSpace

_BUDGET_TERM_CACHE = 1024  # distinct budget fractions whose first-layer term a single-request forward keeps


@dataclass
class ControllerConfig:
    """The shape of a controller net, with its defaults in one place."""

    question_dim: int
    global_view_dim: int = 0
    use_global_view: bool = True  # the ablation flag: False feeds the question and the budget only
    hidden_width: int = 128
    depth: int = 2  # trunk layers
    budget_frequencies: int = 8  # sinusoids of f at 2^0 .. 2^(n-1) x pi
    budget_dim: int = 32  # width of the budget encoding
    dropout: float = 0.1
    heads: tuple[str, ...] = KNOBS  # ("tier",) for the stage-1 net
    # Stage 2 of the two-stage controller: each head gives one set of logits per tier (the tier stage 1
    # picked selects its set), so top_k and blocks are conditioned on the tier.
    per_tier: bool = False
    options: dict[str, list] = field(default_factory=dict)  # knob -> its options, in the space's order

    def as_dict(self) -> dict:
        out = asdict(self)
        out["heads"] = list(self.heads)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "ControllerConfig":
        values = dict(values)
        values["heads"] = tuple(values.get("heads", KNOBS))
        return cls(**values)


def knob_options(space: KnobSpace) -> dict[str, list]:
    """Each knob's options in head order: tier names, top_k options, block options."""
    return {"tier": list(TIERS), "top_k": list(space.top_k_options), "num_active_blocks": list(space.block_options)}


class LatencyBudgetEncoder(nn.Module):
    """(N,) budget fractions f = B / L_full -> (N, out_dim): [f, sin(2^i pi f), cos(2^i pi f)] then an MLP."""

    def __init__(self, num_frequencies: int = 8, out_dim: int = 32) -> None:
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32))
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * num_frequencies, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, fraction: torch.Tensor) -> torch.Tensor:
        f = fraction.reshape(-1, 1).float()
        angles = f * self.frequencies
        return self.mlp(torch.cat([f, torch.sin(angles), torch.cos(angles)], dim=1))


class ControllerNet(nn.Module):
    """Budget + request features -> {knob: logits (N, options)} for the knobs of `config.heads`."""

    def __init__(self, config: ControllerConfig) -> None:
        super().__init__()
        if config.question_dim < 1:
            raise ValueError(f"controller: question_dim must be >= 1, got {config.question_dim}")
        missing = [k for k in config.heads if k not in config.options]
        if missing:
            raise ValueError(f"controller: no options given for head(s) {missing}")
        self.config = config
        gv_dim = config.global_view_dim if config.use_global_view else 0
        in_dim = config.question_dim + gv_dim
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.budget = LatencyBudgetEncoder(config.budget_frequencies, config.budget_dim)
        layers: list[nn.Module] = []
        width_in = in_dim + config.budget_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width_in, config.hidden_width), nn.SiLU(), nn.Dropout(config.dropout)]
            width_in = config.hidden_width
        self.trunk = nn.Sequential(*layers)
        sets = len(TIERS) if config.per_tier else 1
        self.heads = nn.ModuleDict({k: nn.Linear(width_in, sets * len(config.options[k])) for k in config.heads})

    @property
    def uses_global_view(self) -> bool:
        return bool(self.config.use_global_view and self.config.global_view_dim > 0)

    def inputs(self, question: np.ndarray | torch.Tensor, global_view: np.ndarray | torch.Tensor | None) -> torch.Tensor:
        """The (N, in_dim) feature matrix the net reads, before standardising."""
        parts = [torch.as_tensor(np.array(question, dtype=np.float32))]
        if self.uses_global_view:
            if global_view is None:
                raise ValueError("controller: this net uses the global view; no gv_* features given")
            parts.append(torch.as_tensor(np.array(global_view, dtype=np.float32)))
        return torch.cat(parts, dim=1)

    def fit_scalers(self, features: torch.Tensor) -> "ControllerNet":
        """Standardise inputs by the training samples' mean and std (a constant feature keeps std 1)."""
        std = features.std(dim=0, unbiased=False)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))
        return self

    def forward(self, fraction: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """fraction (N,), features (N, in_dim) from `inputs` -> {knob: logits (N, options)}."""
        x = (features - self.feature_mean) / self.feature_std
        hidden = self.trunk(torch.cat([x, self.budget(fraction)], dim=1))
        return {knob: head(hidden) for knob, head in self.heads.items()}


    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self.__dict__.pop("_numpy_weights", None)  # new weights: the numpy copy is stale
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward_numpy(self, fraction: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        """`forward` in eval mode with numpy (float32, as torch): a small batch pays torch's per-op dispatch
        several times over the arithmetic. The weights are copied out once (call `refresh_numpy` after
        changing them), with the feature scaling folded into the first trunk layer and the heads into one
        matrix: on the live path, after the VLM has run through the caches, each numpy call costs
        several microseconds, so the decision's cost is its count of calls (0.59 ms a request with float64
        weights and a call per step, `benchmarks/bench_controller_decision.py`)."""
        weights = self.__dict__.get("_numpy_weights") or self.refresh_numpy()
        f = np.asarray(fraction, dtype=np.float32).reshape(-1, 1)
        x_weight, budget_weight, bias = weights["first"]
        if len(f) == 1:  # one request: the budget's term depends on the fraction alone, kept per exact value
            cache = weights["budget_terms"]
            key = f.tobytes()
            budget_term = cache.get(key)
            if budget_term is None:
                if len(cache) >= _BUDGET_TERM_CACHE:
                    cache.clear()
                budget_term = cache[key] = self._budget_term(f, weights)
        else:
            budget_term = self._budget_term(f, weights)
        hidden = np.asarray(features, dtype=np.float32) @ x_weight + budget_term
        hidden *= expit(hidden)  # SiLU in two calls
        for w, b in weights["trunk"]:
            hidden = hidden @ w + b
            hidden *= expit(hidden)
        logits = hidden @ weights["heads"][0] + weights["heads"][1]
        return {k: logits[:, start:stop] for k, (start, stop) in weights["head_slices"].items()}

    @staticmethod
    def _budget_term(f: np.ndarray, weights: dict) -> np.ndarray:
        """(N, 1) budget fractions -> (N, hidden) their contribution to the first trunk layer, its bias included."""
        angles = f * weights["frequencies"]
        budget = np.concatenate([f, np.sin(angles), np.cos(angles)], axis=1)
        for i, (w, b) in enumerate(weights["budget"]):
            budget = budget @ w + b
            if i < len(weights["budget"]) - 1:
                budget = budget * expit(budget)  # SiLU
        _, budget_weight, bias = weights["first"]
        return budget @ budget_weight + bias

    def refresh_numpy(self) -> dict:
        def pairs(modules) -> list[tuple[np.ndarray, np.ndarray]]:
            return [(m.weight.detach().cpu().float().numpy().T.copy(), m.bias.detach().cpu().float().numpy().copy())
                    for m in modules if isinstance(m, nn.Linear)]

        trunk = pairs(self.trunk)
        (w, b), in_dim = trunk[0], self.feature_mean.numel()
        mean, std = self.feature_mean.cpu().float().numpy(), self.feature_std.cpu().float().numpy()
        x_weight = w[:in_dim] / std[:, None]  # (x - mean) / std @ W = x @ (W / std) - (mean / std) @ W
        heads = [pairs([h])[0] for h in self.heads.values()]
        bounds = np.cumsum([0] + [hw.shape[1] for hw, _ in heads])
        weights = {"frequencies": self.budget.frequencies.cpu().float().numpy(), "budget": pairs(self.budget.mlp),
                   "first": (np.ascontiguousarray(x_weight), np.ascontiguousarray(w[in_dim:]), b - (mean / std) @ w[:in_dim]),
                   "trunk": trunk[1:],
                   "heads": (np.concatenate([hw for hw, _ in heads], axis=1), np.concatenate([hb for _, hb in heads])),
                   "head_slices": {k: (int(bounds[i]), int(bounds[i + 1])) for i, k in enumerate(self.heads)},
                   "budget_terms": {}}
        self.__dict__["_numpy_weights"] = weights
        return weights


class TierControllerNet(ControllerNet):
    """Stage 1 of the two-stage controller: ControllerNet with the tier head alone."""

    def __init__(self, config: ControllerConfig) -> None:
        config.heads = ("tier",)
        super().__init__(config)


STAGE2_HEADS: tuple[str, ...] = ("top_k", "num_active_blocks")


class StackedNumpyForward:
    """Several nets' eval forwards (`ControllerNet.forward_numpy`) on one request as one chain of numpy
    calls: the first layers' columns side by side over [question, global view] (a net without the
    global view reads zeros there), later layers block-diagonal. On the live path each numpy call costs
    microseconds, so a two-net controller (stage 1 + stage 2) pays one net's count of calls, not two."""

    def __init__(self, nets: Sequence[ControllerNet]) -> None:
        self.nets = list(nets)
        self.weights = [n.__dict__.get("_numpy_weights") or n.refresh_numpy() for n in self.nets]
        depths = {len(w["trunk"]) for w in self.weights}
        if len(depths) != 1:
            raise ValueError(f"stacked forward: the nets' trunks differ in depth ({sorted(depths)})")
        gv_dims = {n.config.global_view_dim for n in self.nets if n.uses_global_view}
        self.global_view_dim = max(gv_dims) if gv_dims else 0
        columns = []
        for net, w in zip(self.nets, self.weights):
            x_weight = w["first"][0]
            if self.global_view_dim and not net.uses_global_view:
                x_weight = np.vstack([x_weight, np.zeros((self.global_view_dim, x_weight.shape[1]), np.float32)])
            columns.append(x_weight)
        self.x_weight = np.ascontiguousarray(np.hstack(columns))
        self.trunk = [(block_diag(*[w["trunk"][i][0] for w in self.weights]).astype(np.float32),
                       np.concatenate([w["trunk"][i][1] for w in self.weights]))
                      for i in range(depths.pop())]
        self.heads = (block_diag(*[w["heads"][0] for w in self.weights]).astype(np.float32),
                      np.concatenate([w["heads"][1] for w in self.weights]))
        offsets = np.cumsum([0] + [w["heads"][0].shape[1] for w in self.weights])
        self.slices = [{k: (int(o + a), int(o + b)) for k, (a, b) in w["head_slices"].items()}
                       for o, w in zip(offsets, self.weights)]
        self._budget_terms: dict[bytes, np.ndarray] = {}

    def current(self) -> bool:
        """False once a net's numpy weights were refreshed (new weights loaded): build a new stack."""
        return all(n.__dict__.get("_numpy_weights") is w for n, w in zip(self.nets, self.weights))

    def __call__(self, fraction: np.ndarray, question: np.ndarray, global_view: np.ndarray | None) -> list[dict[str, np.ndarray]]:
        """One request: (1,) fraction, (1, q) question and (1, g) global-view features -> each net's logits."""
        f = np.asarray(fraction, dtype=np.float32).reshape(-1, 1)
        key = f.tobytes()
        budget_term = self._budget_terms.get(key)
        if budget_term is None:
            if len(self._budget_terms) >= _BUDGET_TERM_CACHE:
                self._budget_terms.clear()
            budget_term = self._budget_terms[key] = np.concatenate(
                [ControllerNet._budget_term(f, w) for w in self.weights], axis=1)
        features = np.hstack([question, global_view]) if self.global_view_dim else question
        hidden = np.asarray(features, dtype=np.float32) @ self.x_weight + budget_term
        hidden *= expit(hidden)
        for w, b in self.trunk:
            hidden = hidden @ w + b
            hidden *= expit(hidden)
        logits = hidden @ self.heads[0] + self.heads[1]
        return [{k: logits[:, a:b] for k, (a, b) in part.items()} for part in self.slices]


def stage2_config(stage1: ControllerConfig, hidden_width: int | None = None) -> ControllerConfig:
    """The stage-2 net of a two-stage controller: stage 1's inputs, per-tier top_k and blocks heads."""
    values = stage1.as_dict()
    values.update(heads=STAGE2_HEADS, per_tier=True, hidden_width=hidden_width or stage1.hidden_width)
    return ControllerConfig.from_dict(values)


def build_net(config: ControllerConfig) -> ControllerNet:
    """The net a config describes: TierControllerNet for heads ("tier",), else ControllerNet."""
    return TierControllerNet(config) if tuple(config.heads) == ("tier",) else ControllerNet(config)
