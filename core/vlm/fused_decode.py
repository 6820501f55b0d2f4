"""One batch-1 decode step of a transformers OLMoE over its StaticCache, in Triton kernels.

Why: transformers' eager OLMoE stays the reference engine and the CPU path, but its decode step is
~80 small kernels per block, whose fixed cost (not the weight bytes) sets the step time at batch 1.
`FusedDecoder.step` runs the same function in 8 kernels per block (`core.vlm.fused_kernels`): the MoE is
two of them (router top-k + the selected experts' gate/up; their down projections + weighted sum), and
attention reads only the filled part of the cache, so decode cost grows with the context.

The step reads the next-token id from `step_ids` and the position from `pos` (both device tensors),
writes K/V into the StaticCache at `pos`, the greedy token back into `step_ids`, and advances `pos`:
a CUDA graph captured once per knob key (top_k, active blocks) replays at every position. Prefill
stays transformers' forward over the same cache; `start(length)` then points `pos` past the prompt.

Weights are the model's own tensors, read in place, except q/k/v, stacked once into one [3H, H]
matrix per block so one GEMV reads them (the extra ~25 MB a block is a copy, not extra bytes read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import nn

@dataclass(frozen=True)
class FusedLaunch:
    """Launch shapes: rows per program and K per load of each kernel. Defaults: the fastest of the
    variants `scripts/bench_fused_decode.py` timed per kernel on an H100 (2026-12-07; bench.json in
    data/profiles/h100-molmoe-arch-fused/)."""

    qkv_rows: int = 8
    o_rows: int = 4
    router_rows: int = 2
    router_k: int = 512
    head_rows: int = 32
    block_k: int = 256
    expert_rows: int = 16  # gate/up rows per program
    down_rows: int = 4
    down_k: int = 1024
    attn_chunk: int = 128  # cache slots per attention split
    attn_block: int = 64
    num_warps: int = 4


def fused_available(device: torch.device) -> bool:
    """True where the Triton kernels can run: a CUDA device, or CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _experts_layout(experts: nn.Module, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, H], down [E, H, I]) of a transformers OLMoE experts module, contiguous.

    transformers 5 stores both as F.linear weights (out, in). A version that stores x @ W (in, out)
    is told apart by down_proj alone: gate_up's shape cannot tell when 2I == H (MolmoE: 2048 both).
    """
    gate_up, down = experts.gate_up_proj, experts.down_proj
    transposed = bool(getattr(experts, "is_transposed", False)) or (
        hidden != inter and tuple(down.shape[1:]) == (inter, hidden))
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if tuple(gate_up.shape[1:]) != (2 * inter, hidden) or tuple(down.shape[1:]) != (hidden, inter):
        raise ValueError(f"unexpected expert shapes {tuple(experts.gate_up_proj.shape)} / {tuple(experts.down_proj.shape)}")
    return gate_up.contiguous(), down.contiguous()


class FusedDecoder:
    """Greedy decode steps of `lm` (an OlmoeForCausalLM) over `cache` (an initialised StaticCache)."""

    def __init__(self, lm: nn.Module, cache: object, step_ids: torch.Tensor, max_cache_len: int,
                 launch: FusedLaunch | None = None) -> None:
        from core.vlm import fused_kernels  # imports triton: only where fused_available()

        self.k = fused_kernels
        self.launch = launch or FusedLaunch()
        cfg = lm.config
        self.lm, self.cache, self.step_ids = lm, cache, step_ids
        if getattr(cfg, "clip_qkv", None) is not None:
            raise ValueError("the fused decoder does not clamp q/k/v (config.clip_qkv must be None)")
        self.hidden, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_dim = self.hidden // self.heads
        if cfg.num_key_value_heads != self.heads:
            raise ValueError("the fused decoder needs as many key/value heads as query heads")
        self.inter, self.num_experts = cfg.intermediate_size, cfg.num_experts
        self.max_cache_len = int(max_cache_len)
        layers = list(lm.model.layers)
        self.layers = layers
        dev, dt = step_ids.device, lm.model.embed_tokens.weight.dtype
        self.device, self.dtype = dev, dt
        with torch.no_grad():
            self.qkv_w = [torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
                                     l.self_attn.v_proj.weight]).contiguous() for l in layers]
            self.experts = [_experts_layout(l.mlp.experts, self.hidden, self.inter) for l in layers]
            # RoPE table as transformers builds it: fp32 angles, cos/sin cast to the activation dtype.
            rope = lm.model.rotary_emb
            angles = torch.arange(self.max_cache_len, device=dev, dtype=torch.float32)[:, None] * rope.inv_freq.float()[None]
            self.cos = (angles.cos() * rope.attention_scaling).to(dt).contiguous()
            self.sin = (angles.sin() * rope.attention_scaling).to(dt).contiguous()
        self.nsplit = -(-self.max_cache_len // self.launch.attn_chunk)
        z = lambda *shape, dtype=dt: torch.zeros(shape, device=dev, dtype=dtype)  # noqa: E731
        self.pos = z(1, dtype=torch.int32)
        self.x = z(self.hidden)
        self.xn = z(self.hidden)
        self.qkv = z(3 * self.hidden)
        self.q = z(self.hidden)
        self.attn = z(self.hidden)
        self.router_logits = z(self.num_experts)
        self.m = z(self.heads, self.nsplit, dtype=torch.float32)
        self.l = z(self.heads, self.nsplit, dtype=torch.float32)
        self.acc = z(self.heads, self.nsplit, self.head_dim, dtype=torch.float32)
        self.act = z(self.num_experts, self.inter)  # rows 0..top_k-1 used
        self.topi = z(self.num_experts, dtype=torch.int32)
        self.topw = z(self.num_experts)
        self.logits = z(lm.lm_head.weight.shape[0])

    def start(self, length: int) -> None:
        """Point the next step at cache slot `length` (the prompt's length)."""
        self.pos.fill_(int(length))

    def _kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers = getattr(self.cache, "layers", None)
        if layers is not None:
            return layers[layer_idx].keys, layers[layer_idx].values
        return self.cache.key_cache[layer_idx], self.cache.value_cache[layer_idx]  # older transformers

    def _gemv(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, rows: int, norm: nn.Module | None = None,
              residual: torch.Tensor | None = None, xn: torch.Tensor | None = None, block_k: int | None = None) -> None:
        n, kdim = w.shape
        block_k = min(block_k or self.launch.block_k, kdim)
        self.k.gemv[(-(-n // rows),)](
            x, w, out, norm.weight if norm is not None else x, residual if residual is not None else x,
            xn if xn is not None else x, n, float(norm.variance_epsilon) if norm is not None else 0.0,
            K=kdim, BLOCK_N=rows, BLOCK_K=block_k, HAS_NORM=norm is not None, HAS_RES=residual is not None,
            WRITE_XN=xn is not None, num_warps=self.launch.num_warps,
        )

    def block(self, idx: int, top_k: int) -> None:
        """Block `idx` on the hidden state in `self.x` (in place), at position `self.pos`."""
        L, k, lay = self.launch, self.k, self.layers[idx]
        att = lay.self_attn
        keys, values = self._kv(att.layer_idx)
        H, NH, HD = self.hidden, self.heads, self.head_dim
        self._gemv(self.x, self.qkv_w[idx], self.qkv, L.qkv_rows, norm=lay.input_layernorm)
        k.qk_rope[(1,)](self.qkv, att.q_norm.weight, att.k_norm.weight, self.cos, self.sin, self.pos, self.q,
                        keys, values, float(att.q_norm.variance_epsilon), keys.stride(1), keys.stride(2),
                        NH=NH, HD=HD, num_warps=L.num_warps)
        k.attn_split[(NH, self.nsplit)](self.q, keys, values, self.pos, self.m, self.l, self.acc, float(att.scaling),
                                        keys.stride(1), keys.stride(2), HD=HD, CHUNK=L.attn_chunk,
                                        BLOCK_S=min(L.attn_block, L.attn_chunk), NSPLIT=self.nsplit, num_warps=L.num_warps)
        k.attn_combine[(NH,)](self.m, self.l, self.acc, self.pos, self.attn, HD=HD, CHUNK=L.attn_chunk,
                              NSPLIT=self.nsplit, NSPLIT_P2=max(2, 1 << (self.nsplit - 1).bit_length()),
                              num_warps=L.num_warps)
        self._gemv(self.attn, att.o_proj.weight, self.x, L.o_rows, residual=self.x)
        self._gemv(self.x, lay.mlp.gate.weight, self.router_logits, L.router_rows, norm=lay.post_attention_layernorm,
                   xn=self.xn, block_k=L.router_k)
        gate_up, down = self.experts[idx]
        rows = min(L.expert_rows, self.inter)
        k.moe_gate_up[(top_k * (self.inter // rows),)](
            self.router_logits, self.xn, gate_up, self.act, self.topi, self.topw,
            E=self.num_experts, K=H, I=self.inter, TOP_K=top_k, BLOCK_I=rows, BLOCK_K=min(L.block_k, H),
            num_warps=L.num_warps)
        k.moe_down[(-(-H // L.down_rows),)](self.act, down, self.topi, self.topw, self.x, H=H, I=self.inter,
                                            TOP_K=top_k, BLOCK_H=L.down_rows, BLOCK_I=min(L.down_k, self.inter),
                                            num_warps=L.num_warps)

    def forward_token(self, top_k: int, blocks: Sequence[int]) -> None:
        """Embed `step_ids`, run `blocks` (original indices, block 0 first), final norm and LM head into
        `self.logits`; K/V land at `pos`. Neither `pos` nor `step_ids` moves."""
        torch.index_select(self.lm.model.embed_tokens.weight, 0, self.step_ids.view(-1), out=self.x.view(1, -1))
        for idx in blocks:
            self.block(int(idx), int(top_k))
        self._gemv(self.x, self.lm.lm_head.weight, self.logits, self.launch.head_rows, norm=self.lm.model.norm)

    def step(self, knob_key: Hashable) -> None:
        """One greedy decode step for knob key (top_k, blocks): token in `step_ids` -> next token there."""
        top_k, blocks = knob_key  # type: ignore[misc]
        self.forward_token(top_k, blocks)
        # argmax of the rounded logits: the first index among equal maxima, as torch's argmax picks
        torch.argmax(self.logits, dim=0, keepdim=True, out=self.step_ids.view(-1))
        self.pos.add_(1)


__all__ = ["FusedDecoder", "FusedLaunch", "fused_available"]
