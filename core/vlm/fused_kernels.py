"""Triton kernels for batch-1 OLMoE decode: one token through one block in eight launches.

Why: under a CUDA graph, transformers' OLMoE decode step is ~80 small kernels per block (RMSNorms as
six elementwise ops, RoPE as slices and concatenations, the grouped-mm expert path's sort / gather /
scatter), and at batch 1 their fixed cost, not the weight bytes, sets the step time (4.1 ms against a
~0.55 ms bandwidth floor on the H200). These kernels fuse each stage so that a block is:

  gemv   RMSNorm(x) @ [Wq; Wk; Wv]            (norm recomputed per program: x is 4 KB, in L2)
  qk_rope q/k RMSNorm over all heads, RoPE from a cos/sin table, K/V written at cache slot `pos`
  attn_split / attn_combine  flash-decoding over cache slots [0, pos]: cost grows with the context
  gemv   attn @ Wo + x                        (residual added in the epilogue, in place)
  gemv   RMSNorm(x) @ Wrouter                 (writes the normed x for the experts)
  moe_gate_up  softmax + top-k of the router logits in every program, then the selected experts'
               gate/up rows and SiLU(gate) * up: only the k chosen experts' weights are read
  moe_down     the k experts' down rows, weighted by their router probabilities, summed, + x

`pos` is a device tensor, so one captured graph replays at every position. Intermediates are rounded
to the activation dtype where transformers' eager forward rounds them (bf16 on a GPU), so greedy
tokens match it; sums accumulate in fp32.

This module imports triton at its top: import it lazily (`core.vlm.fused_decode` does, only on CUDA
or under TRITON_INTERPRET=1, where the same kernels run on CPU tensors), since the CPU path and CI
have no triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemv(x_ptr, w_ptr, out_ptr, nw_ptr, res_ptr, xn_ptr, N, eps,
         K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, WRITE_XN: tl.constexpr):
    """out[N] = (RMSNorm(x) if HAS_NORM else x) @ W[N, K]^T (+ res); program 0 may write the normed x."""
    dt = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    inv = 1.0
    if HAS_NORM:
        xf = tl.load(x_ptr + tl.arange(0, K)).to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / K + eps)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + ks).to(tl.float32)
        if HAS_NORM:
            xv = (xv * inv).to(dt).to(tl.float32)
            xv = (xv * tl.load(nw_ptr + ks).to(tl.float32)).to(dt).to(tl.float32)
            if WRITE_XN:
                tl.store(xn_ptr + ks, xv.to(dt), mask=(ks < K) & (pid == 0))
        w = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=rmask[:, None], other=0.0)
        acc += tl.sum(w.to(tl.float32) * xv[None, :], 1)
    y = acc.to(dt).to(tl.float32)
    if HAS_RES:
        y = tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32) + y
    tl.store(out_ptr + rows, y.to(dt), mask=rmask)

@triton.jit
def _norm_rope(src_ptr, nw_ptr, i1, i2, cos, sin, eps, HS: tl.constexpr, dt: tl.constexpr):
    a = tl.load(src_ptr + i1).to(tl.float32)
    b = tl.load(src_ptr + i2).to(tl.float32)
    inv = tl.rsqrt((tl.sum(tl.sum(a * a, 1), 0) + tl.sum(tl.sum(b * b, 1), 0)) / HS + eps)
    a = ((a * inv).to(dt).to(tl.float32) * tl.load(nw_ptr + i1).to(tl.float32)).to(dt).to(tl.float32)
    b = ((b * inv).to(dt).to(tl.float32) * tl.load(nw_ptr + i2).to(tl.float32)).to(dt).to(tl.float32)
    # q*cos + rotate_half(q)*sin, each product rounded as transformers' elementwise ops round it
    o1 = ((a * cos).to(dt).to(tl.float32) - (b * sin).to(dt).to(tl.float32)).to(dt)
    o2 = ((b * cos).to(dt).to(tl.float32) + (a * sin).to(dt).to(tl.float32)).to(dt)
    return o1, o2

@triton.jit
def qk_rope(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, kc_ptr, vc_ptr, eps,
            stride_h, stride_s, NH: tl.constexpr, HD: tl.constexpr):
    """q, k RMSNorm (over all NH*HD), RoPE at `pos`; q -> q_out, k and v -> cache slot `pos`."""
    dt = q_out_ptr.dtype.element_ty
    HALF: tl.constexpr = HD // 2
    HS: tl.constexpr = NH * HD
    h = tl.arange(0, NH)[:, None]
    j = tl.arange(0, HALF)[None, :]
    i1 = h * HD + j
    i2 = i1 + HALF
    pos = tl.load(pos_ptr)
    cos = tl.load(cos_ptr + pos * HALF + j).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + j).to(tl.float32)
    slot = h * stride_h + pos * stride_s
    q1, q2 = _norm_rope(qkv_ptr, qn_ptr, i1, i2, cos, sin, eps, HS, dt)
    tl.store(q_out_ptr + i1, q1)
    tl.store(q_out_ptr + i2, q2)
    k1, k2 = _norm_rope(qkv_ptr + HS, kn_ptr, i1, i2, cos, sin, eps, HS, dt)
    tl.store(kc_ptr + slot + j, k1)
    tl.store(kc_ptr + slot + HALF + j, k2)
    tl.store(vc_ptr + slot + j, tl.load(qkv_ptr + 2 * HS + i1))
    tl.store(vc_ptr + slot + HALF + j, tl.load(qkv_ptr + 2 * HS + i2))

@triton.jit
def attn_split(q_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, scale, stride_h, stride_s,
               HD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, NSPLIT: tl.constexpr):
    """Partial softmax attention of head h over cache slots [s*CHUNK, (s+1)*CHUNK) ∩ [0, pos]."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    length = tl.load(pos_ptr) + 1
    start = s * CHUNK
    if start < length:  # splits past the filled part exit at once: cost follows the context
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + h * HD + d).to(tl.float32) * scale
        m = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), 0)
        l = tl.sum(tl.zeros((BLOCK_S,), tl.float32), 0)
        acc = tl.zeros((HD,), tl.float32)
        base = h * stride_h
        for b in range(0, CHUNK, BLOCK_S):
            t = start + b + tl.arange(0, BLOCK_S)
            tm = t < length
            k = tl.load(kc_ptr + base + t[:, None] * stride_s + d[None, :], mask=tm[:, None], other=0.0)
            sc = tl.where(tm, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new)
            v = tl.load(vc_ptr + base + t[:, None] * stride_s + d[None, :], mask=tm[:, None], other=0.0)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m = m_new
        tl.store(m_ptr + h * NSPLIT + s, m)
        tl.store(l_ptr + h * NSPLIT + s, l)
        tl.store(acc_ptr + (h * NSPLIT + s) * HD + d, acc)

@triton.jit
def attn_combine(m_ptr, l_ptr, acc_ptr, pos_ptr, out_ptr,
                 HD: tl.constexpr, CHUNK: tl.constexpr, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr):
    """Merge the filled splits of head h (log-sum-exp weights) into out[h*HD:(h+1)*HD]."""
    h = tl.program_id(0)
    length = tl.load(pos_ptr) + 1
    s = tl.arange(0, NSPLIT_P2)
    sm = s * CHUNK < length
    m = tl.load(m_ptr + h * NSPLIT + s, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + h * NSPLIT + s, mask=sm, other=0.0)
    w = tl.where(sm, tl.exp(m - tl.max(m, 0)), 0.0)
    d = tl.arange(0, HD)
    acc = tl.load(acc_ptr + (h * NSPLIT + s)[:, None] * HD + d[None, :], mask=sm[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + h * HD + d, o.to(out_ptr.dtype.element_ty))

@triton.jit
def moe_gate_up(logits_ptr, xn_ptr, wgu_ptr, act_ptr, topi_ptr, topw_ptr,
                E: tl.constexpr, K: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (j, tile): router softmax + top-k (ties to the lower index, as torch.topk on CUDA),
    then rows [tile] of expert top_j's gate and up projections and SiLU(gate) * up -> act[j]."""
    dt = act_ptr.dtype.element_ty
    TILES: tl.constexpr = I // BLOCK_I
    pid = tl.program_id(0)
    j = pid // TILES
    tile = pid % TILES
    offs_e = tl.arange(0, E)
    lg = tl.load(logits_ptr + offs_e).to(tl.float32)
    p = tl.exp(lg - tl.max(lg, 0))
    p = p / tl.sum(p, 0)
    expert = tl.argmax(p, 0)
    weight = tl.max(p, 0)
    q = p
    for t in tl.static_range(TOP_K):
        idx = tl.argmax(q, 0)
        val = tl.max(q, 0)
        expert = tl.where(j == t, idx, expert)
        weight = tl.where(j == t, val, weight)
        q = tl.where(offs_e == idx, -1.0, q)
    tl.store(topi_ptr + j, expert, mask=tile == 0)
    tl.store(topw_ptr + j, weight.to(dt), mask=tile == 0)
    rows = tile * BLOCK_I + tl.arange(0, BLOCK_I)
    base = wgu_ptr + expert.to(tl.int64) * (2 * I * K)
    acc_g = tl.zeros((BLOCK_I,), tl.float32)
    acc_u = tl.zeros((BLOCK_I,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(xn_ptr + ks).to(tl.float32)[None, :]
        wg = tl.load(base + rows[:, None] * K + ks[None, :])
        wu = tl.load(base + (I + rows)[:, None] * K + ks[None, :])
        acc_g += tl.sum(wg.to(tl.float32) * xv, 1)
        acc_u += tl.sum(wu.to(tl.float32) * xv, 1)
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    a = ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt)
    tl.store(act_ptr + j * I + rows, a)

@triton.jit
def moe_down(act_ptr, wd_ptr, topi_ptr, topw_ptr, x_ptr,
             H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    """x[rows] += sum_j w_j * (W_down[top_j][rows, :] @ act[j]), in place."""
    dt = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    total = tl.zeros((BLOCK_H,), tl.float32)
    for t in tl.static_range(TOP_K):
        e = tl.load(topi_ptr + t).to(tl.int64)
        w = tl.load(topw_ptr + t).to(tl.float32)
        acc = tl.zeros((BLOCK_H,), tl.float32)
        for i0 in range(0, I, BLOCK_I):
            cols = i0 + tl.arange(0, BLOCK_I)
            a = tl.load(act_ptr + t * I + cols).to(tl.float32)
            wd = tl.load(wd_ptr + e * (H * I) + rows[:, None] * I + cols[None, :])
            acc += tl.sum(wd.to(tl.float32) * a[None, :], 1)
        total += (acc.to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
    y = tl.load(x_ptr + rows).to(tl.float32) + total.to(dt).to(tl.float32)
    tl.store(x_ptr + rows, y.to(dt))


__all__ = ["gemv", "qk_rope", "attn_split", "attn_combine", "moe_gate_up", "moe_down"]
