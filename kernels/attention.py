"""Triton scaled-dot-product attention kernels (flash forward/backward, split-KV decode).

Layout (the lead's dispatch layer validates and flattens before calling here):
    q[N, Hq, Lq, D], k[N, Hk, Lk, D], v[N, Hk, Lk, Dv], bias[N, Hq, Lq, Lk] (optional, any strides, 0 allowed)
    Hq % Hk == 0; query head h reads kv head h // (Hq // Hk) (GQA handled in-kernel, no expand copy).
All inputs may be arbitrary strided views; outputs are freshly allocated contiguous tensors.

Conventions shared by forward and backward:
  * softmax is computed in base 2: s2 = (q.k * scale + bias) * log2(e); exp2 is cheaper than exp on GPU.
  * lse is stored in natural log units, float32, shape [N, Hq, Lq].
  * Fully masked rows (every key masked, including Lk == 0) follow the contract documented once in
    seqfast/reference/attention.py.  Here: the forward writes out = 0 and lse = -inf; the backward reads an lse of
    -inf as +inf, so its recomputed p = exp(s - lse) is exactly 0 for that row (zero gradients, never NaN).
  * NaN/Inf in q, k, v or a float mask propagate to the output as torch's (NaN): no score is clamped or dropped;
    only keys that are masked (-inf), out of range or above the causal diagonal get probability 0.
  * Every grid is one-dimensional (row block x batch*heads folded into axis 0): batch*heads past 65535 launches.
  * is_causal uses torch's top-left alignment: query i sees keys j <= i, also when Lq != Lk.  Key blocks entirely
    above the diagonal are never visited (forward, dq) and query blocks entirely above it are never visited (dk/dv).
  * fp32 accumulation everywhere; fp16/bf16 operands feed tl.dot directly on GPU.  For fp32 inputs tl.dot runs in
    TF32 when torch.backends.cuda.matmul.allow_tf32 is set (allow_tf32=None, the default) or allow_tf32=True, and
    exactly (input_precision="ieee") otherwise.
  * Under TRITON_INTERPRET=1 tl.dot on bf16 operands is wrong (DESIGN.md pitfall), so when interpreting (and only
    then) every dot operand is upcast to fp32.
"""
import math

import torch
import triton
import triton.language as tl

from .common import Launch, cdiv, check_dtypes, dot_precision, interpreting, on_device

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fold(pid, L, BLOCK: tl.constexpr):
    """Grid axis 0 carries (row block, batch*head) folded: batch*heads can pass CUDA's 65535 limit of axis 1.
    Adjacent programs share a head, so its K/V stay in L2."""
    n_blocks = tl.cdiv(L, BLOCK)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _query_block(pid, Hq, G, Lq, BLOCK_M: tl.constexpr):
    """(row of (n, head) = pid_bh, n, query head h, kv head hk, first query row, query rows, their mask) of a
    folded program id."""
    pid_m, pid_bh = _fold(pid, Lq, BLOCK_M)
    h = pid_bh % Hq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return pid_bh, (pid_bh // Hq).to(tl.int64), h.to(tl.int64), (h // G).to(tl.int64), start_m, offs_m, offs_m < Lq


@triton.jit
def _head_dims(HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    return offs_d, offs_d < HEAD_D, offs_dv, offs_dv < HEAD_DV


@triton.jit
def _finish(acc, l_i, m_i):
    """Normalised output and natural-log lse of an online softmax; rows that saw no key get 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    return acc / l_safe[:, None], lse


@triton.jit
def _add_bias2(s, b_ptrs, mask, HAS_BIAS: tl.constexpr):
    """Scores s (log2 units, for exp2) plus the additive mask block at b_ptrs, converted to log2 units; the forward,
    dK/dV and dQ passes build the same scores this way (b_ptrs is never read without HAS_BIAS)."""
    if HAS_BIAS:
        s += tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _load_lse2(ptrs, mask):
    """lse in log2 units for the backward's p = exp2(s - lse); a fully masked row (-inf) reads +inf so p is 0."""
    lse = tl.load(ptrs, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, m_mask, offs_d, d_mask, offs_dv, dv_mask,
                    s_kl, s_kd, s_vl, s_vd, s_bm, s_bl, Lk, qk_scale, lo, hi,
                    CAUSAL_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    # online-softmax over key blocks [lo, hi); scores in log2 units
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        c_mask = cols < Lk
        kt = tl.load(k_base + cols[None, :] * s_kl + offs_d[:, None] * s_kd,
                     mask=c_mask[None, :] & d_mask[:, None], other=0.0)
        if INTERP:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        s = _add_bias2(s, b_base + offs_m[:, None] * s_bm + cols[None, :] * s_bl, m_mask[:, None] & c_mask[None, :],
                       HAS_BIAS)
        valid = c_mask[None, :]
        if CAUSAL_MASK:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen only -inf so far: shift by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + cols[:, None] * s_vl + offs_dv[None, :] * s_vd,
                    mask=c_mask[:, None] & dv_mask[None, :], other=0.0)
        if INTERP:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, B, O, LSE,
    s_qn, s_qh, s_qm, s_qd,
    s_kn, s_kh, s_kl, s_kd,
    s_vn, s_vh, s_vl, s_vd,
    s_bn, s_bh, s_bm, s_bl,
    s_on, s_oh, s_om, s_od,
    Hq, G, Lq, Lk, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
):
    pid_bh, n, h, hk, start_m, offs_m, m_mask = _query_block(tl.program_id(0), Hq, G, Lq, BLOCK_M)
    offs_d, d_mask, offs_dv, dv_mask = _head_dims(HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV)

    q_ptrs = Q + n * s_qn + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if INTERP:
        q = q.to(tl.float32)
    k_base = K + n * s_kn + hk * s_kh
    v_base = V + n * s_vn + hk * s_vh
    b_base = B + n * s_bn + h * s_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if IS_CAUSAL:
        # causal block skipping: rows of this block see keys j <= max row index only.  Key blocks lying wholly left
        # of the block's first row need no causal mask (phase 1); only the diagonal blocks do (phase 2).
        hi = tl.minimum(Lk, start_m + BLOCK_M)
        mid = tl.minimum(hi, (start_m // BLOCK_N) * BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, m_mask, offs_d, d_mask,
                                        offs_dv, dv_mask, s_kl, s_kd, s_vl, s_vd, s_bm, s_bl, Lk, qk_scale, 0, mid,
                                        False, HAS_BIAS, BLOCK_N, DOT_PREC, INTERP)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, m_mask, offs_d, d_mask,
                                        offs_dv, dv_mask, s_kl, s_kd, s_vl, s_vd, s_bm, s_bl, Lk, qk_scale, mid, hi,
                                        True, HAS_BIAS, BLOCK_N, DOT_PREC, INTERP)
    else:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, m_mask, offs_d, d_mask,
                                        offs_dv, dv_mask, s_kl, s_kd, s_vl, s_vd, s_bm, s_bl, Lk, qk_scale, 0, Lk,
                                        False, HAS_BIAS, BLOCK_N, DOT_PREC, INTERP)

    out, lse = _finish(acc, l_i, m_i)
    o_ptrs = O + n * s_on + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------------------------------------------
# Decode (Lq == 1): split-KV.  One program per (split, n, kv head); its rows are the G query heads that share the kv
# head, so K/V are read once per group (GQA) and the rows pad the MMA M dimension up to 16.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Lk", "chunk", "num_splits"])
def _attn_decode_kernel(
    Q, K, V, B, O, LSE, PACC, PM, PL,
    s_qn, s_qh, s_qd,
    s_kn, s_kh, s_kl, s_kd,
    s_vn, s_vh, s_vl, s_vd,
    s_bn, s_bh, s_bl,
    s_on, s_oh, s_od,
    Hq, Hk, G, Lk, chunk, num_splits, qk_scale,
    SPLIT: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
):
    # num_splits, chunk and Lk are run-time values (not specialised): a growing KV cache reuses one compiled kernel.
    pid = tl.program_id(0)
    split = pid % num_splits
    nh = pid // num_splits
    n = (nh // Hk).to(tl.int64)
    hk = (nh % Hk).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_H)
    r_mask = offs_r < G
    heads = hk * G + offs_r  # query heads of this group (int64)
    offs_d, d_mask, offs_dv, dv_mask = _head_dims(HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV)

    q = tl.load(Q + n * s_qn + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if INTERP:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, Lk)
    # the query heads of the group are the rows; this split's keys [lo, hi) are the columns
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K + n * s_kn + hk * s_kh, V + n * s_vn + hk * s_vh,
                                    B + n * s_bn, heads, r_mask, offs_d, d_mask, offs_dv, dv_mask,
                                    s_kl, s_kd, s_vl, s_vd, s_bh, s_bl, hi, qk_scale, lo, hi,
                                    False, HAS_BIAS, BLOCK_N, DOT_PREC, INTERP)
    if SPLIT:
        # partials: PACC[N, Hq, num_splits, BLOCK_DV] (unnormalised), PM/PL[N, Hq, num_splits] (m in log2 units)
        row = (n * Hq + heads) * num_splits + split
        tl.store(PACC + row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=r_mask[:, None])
        tl.store(PM + row, m_i, mask=r_mask)
        tl.store(PL + row, l_i, mask=r_mask)
    else:
        out, lse = _finish(acc, l_i, m_i)
        tl.store(O + n * s_on + heads[:, None] * s_oh + offs_dv[None, :] * s_od, out.to(O.dtype.element_ty),
                 mask=r_mask[:, None] & dv_mask[None, :])
        tl.store(LSE + n * Hq + heads, lse, mask=r_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _attn_decode_combine_kernel(
    O, LSE, PACC, PM, PL,
    s_on, s_oh, s_od,
    Hq, num_splits,
    BLOCK_S: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # one program per (n, query head): rescale each split's partial sums to the common maximum and normalise
    pid = tl.program_id(0).to(tl.int64)  # = n * Hq + h
    n = pid // Hq
    h = pid % Hq
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = pid * num_splits
    m_max = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.load(PM + base + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"))
        m_max = tl.maximum(m_max, tl.max(m, 0))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        rows = base + s0 + offs_s
        s_mask = s0 + offs_s < num_splits
        w = tl.exp2(tl.load(PM + rows, mask=s_mask, other=float("-inf")) - m_safe)  # empty splits: m = -inf -> 0
        l_tot += tl.sum(tl.load(PL + rows, mask=s_mask, other=0.0) * w, 0)
        part = tl.load(PACC + rows[:, None] * BLOCK_DV + offs_dv[None, :], mask=s_mask[:, None], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
    out, lse = _finish(acc[None, :], l_tot[None], m_max[None])
    tl.store(O + n * s_on + h * s_oh + offs_dv[None, :] * s_od, out.to(O.dtype.element_ty),
             mask=(offs_dv < HEAD_DV)[None, :])
    tl.store(LSE + pid + tl.arange(0, 1), lse)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    s_on, s_oh, s_om, s_od,
    s_dn, s_dh, s_dm, s_dd,
    Hq, Lq,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, pid_bh = _fold(tl.program_id(0), Lq, BLOCK_M)
    n = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < Lq)[:, None] & (offs_dv < HEAD_DV)[None, :]
    o = tl.load(O + n * s_on + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + n * s_dn + h * s_dh + offs_m[:, None] * s_dm + offs_dv[None, :] * s_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, B, DO, LSE, DELTA, DK, DV,
    s_qn, s_qh, s_qm, s_qd,
    s_kn, s_kh, s_kl, s_kd,
    s_vn, s_vh, s_vl, s_vd,
    s_bn, s_bh, s_bm, s_bl,
    s_dn, s_dh, s_dm, s_dd,
    Hq, Hk, G, Lq, Lk, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
):
    # One program per (key block, n, kv head); loops over the G query heads of the group and the query blocks, so
    # dk/dv for the group are summed in registers (no atomics, deterministic).  Works on transposed scores
    # sT[BLOCK_N, BLOCK_M] so that dv += pT @ dO and dk += dsT @ q need no transposes of p/ds.
    pid_n, pid_bh = _fold(tl.program_id(0), Lk, BLOCK_N)
    n = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    start_n = pid_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d, d_mask, offs_dv, dv_mask = _head_dims(HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV)
    n_mask = offs_n < Lk

    k = tl.load(K + n * s_kn + hk * s_kh + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    v = tl.load(V + n * s_vn + hk * s_vh + offs_n[:, None] * s_vl + offs_dv[None, :] * s_vd,
                mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
    if INTERP:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo = 0
    if IS_CAUSAL:
        # query rows i < start_n cannot see any key of this block: skip their blocks
        lo = (start_n // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + n * s_qn + h * s_qh
        do_base = DO + n * s_dn + h * s_dh
        b_base = B + n * s_bn + h * s_bh
        row_base = (n * Hq + h) * Lq
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + offs_m0
            m_mask = offs_m < Lq
            q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_dm + offs_dv[None, :] * s_dd,
                         mask=m_mask[:, None] & dv_mask[None, :], other=0.0)
            if INTERP:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2 = _load_lse2(LSE + row_base + offs_m, m_mask)  # rows past Lq and fully masked rows: p = 0
            delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            st = _add_bias2(st, b_base + offs_m[None, :] * s_bm + offs_n[:, None] * s_bl,
                            m_mask[None, :] & n_mask[:, None], HAS_BIAS)
            pt = tl.exp2(st - lse2[None, :])
            valid = n_mask[:, None] & m_mask[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            pt = tl.where(valid, pt, 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)

    dk = dk * sm_scale
    # DK/DV are contiguous [N, Hk, Lk, D/Dv]
    kv_row = (n * Hk + hk) * Lk + offs_n
    tl.store(DK + kv_row[:, None] * HEAD_D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_mask[:, None] & d_mask[None, :])
    tl.store(DV + kv_row[:, None] * HEAD_DV + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=n_mask[:, None] & dv_mask[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, B, DO, LSE, DELTA, DQ,
    s_qn, s_qh, s_qm, s_qd,
    s_kn, s_kh, s_kl, s_kd,
    s_vn, s_vh, s_vl, s_vd,
    s_bn, s_bh, s_bm, s_bl,
    s_dn, s_dh, s_dm, s_dd,
    Hq, G, Lq, Lk, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
):
    pid_bh, n, h, hk, start_m, offs_m, m_mask = _query_block(tl.program_id(0), Hq, G, Lq, BLOCK_M)
    offs_d, d_mask, offs_dv, dv_mask = _head_dims(HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)

    q = tl.load(Q + n * s_qn + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    do = tl.load(DO + n * s_dn + h * s_dh + offs_m[:, None] * s_dm + offs_dv[None, :] * s_dd,
                 mask=m_mask[:, None] & dv_mask[None, :], other=0.0)
    if INTERP:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * Lq
    lse2 = _load_lse2(LSE + row_base + offs_m, m_mask)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + n * s_kn + hk * s_kh
    v_base = V + n * s_vn + hk * s_vh
    b_base = B + n * s_bn + h * s_bh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n0
        c_mask = cols < Lk
        k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :] * s_kd,
                    mask=c_mask[:, None] & d_mask[None, :], other=0.0)
        vt = tl.load(v_base + cols[None, :] * s_vl + offs_dv[:, None] * s_vd,
                     mask=c_mask[None, :] & dv_mask[:, None], other=0.0)
        if INTERP:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = _add_bias2(s, b_base + offs_m[:, None] * s_bm + cols[None, :] * s_bl, m_mask[:, None] & c_mask[None, :],
                       HAS_BIAS)
        p = tl.exp2(s - lse2[:, None])
        valid = m_mask[:, None] & c_mask[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + (row_base + offs_m)[:, None] * HEAD_D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations (pure functions of the shapes: tests/kernels/test_compile_sm90.py compiles what they pick)
# ----------------------------------------------------------------------------------------------------------------
def _pow2(x, lo=16):
    return max(lo, triton.next_power_of_2(int(x)))


# Static configs for H100/H200: (BLOCK_M, BLOCK_N, warps, stages) per kernel, for 2-byte and 4-byte elements, at
# padded head dims <= 64, <= 128 and 256. Kept where sm_90a compiles them with no register spill and shared memory
# <= 227 KB (checked over head dims 16-256 by tests/kernels/test_compile_sm90.py); not yet timed on hardware. fp32
# with input_precision="ieee" runs on FMA units (no tensor cores), hence the small tiles. For dk/dv, BLOCK_M runs
# over queries and BLOCK_N over keys.
_CONFIGS = {
    "fwd": {2: ((128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
            4: ((64, 32, 8, 2), (32, 16, 8, 2), (32, 16, 8, 1))},
    "dkdv": {2: ((32, 128, 8, 3), (32, 64, 8, 3), (32, 32, 8, 1)),
             4: ((32, 32, 8, 1), (16, 32, 8, 1), (16, 32, 8, 1))},
    "dq": {2: ((128, 32, 4, 3), (128, 32, 8, 2), (64, 16, 8, 2)),
           4: ((64, 16, 8, 1), (32, 16, 8, 1), (16, 16, 8, 1))},
}


def _config(kernel, bd, elt):
    return _CONFIGS[kernel][2 if elt <= 2 else 4][0 if bd <= 64 else 1 if bd <= 128 else 2]


def _blocks(cfg, block_m, block_n, interp):
    """(BLOCK_M, BLOCK_N, warps, stages): the table's, the caller's override, or 16x16 under the interpreter."""
    if block_m or block_n:
        return (block_m or cfg[0], block_n or cfg[1], cfg[2], cfg[3])
    if interp:
        return (16, 16, cfg[2], cfg[3])
    return cfg


def _common(D, Dv, dtype, has_bias, is_causal, allow_tf32, interp):
    return dict(HEAD_D=D, HEAD_DV=Dv, HAS_BIAS=bool(has_bias), IS_CAUSAL=bool(is_causal), BLOCK_D=_pow2(D),
                BLOCK_DV=_pow2(Dv), DOT_PREC=dot_precision(dtype, allow_tf32, "matmul"), INTERP=interp)


def forward_launch(N, Hq, Lq, D, Dv, dtype, *, has_bias=False, is_causal=False, allow_tf32=None, block_m=None,
                   block_n=None, interp=None) -> Launch:
    """The flash forward (Lq >= 2): grid axis 0 = query blocks x N*Hq, folded."""
    interp = interpreting() if interp is None else interp
    elt = torch.empty((), dtype=dtype).element_size()
    bm, bn, warps, stages = _blocks(_config("fwd", _pow2(max(D, Dv)), elt), block_m, block_n, interp)
    consts = _common(D, Dv, dtype, has_bias, is_causal, allow_tf32, interp)
    return Launch((cdiv(Lq, bm) * N * Hq,), dict(consts, BLOCK_M=bm, BLOCK_N=bn), warps, stages)


def backward_launches(N, Hq, Hk, Lq, Lk, D, Dv, dtype, *, has_bias=False, is_causal=False, allow_tf32=None,
                      block_m=None, block_n=None, interp=None):
    """(preprocess, dk/dv, dq) launches of the flash backward."""
    interp = interpreting() if interp is None else interp
    elt = torch.empty((), dtype=dtype).element_size()
    big = _pow2(max(D, Dv))
    consts = _common(D, Dv, dtype, has_bias, is_causal, allow_tf32, interp)
    pbm = 16 if interp else 64
    pre = Launch((cdiv(Lq, pbm) * N * Hq,), dict(HEAD_DV=Dv, BLOCK_M=pbm, BLOCK_DV=consts["BLOCK_DV"]), 4, 1)
    bm, bn, warps, stages = _blocks(_config("dkdv", big, elt), block_m, block_n, interp)
    dkdv = Launch((cdiv(Lk, bn) * N * Hk,), dict(consts, BLOCK_M=bm, BLOCK_N=bn), warps, stages)
    bm, bn, warps, stages = _blocks(_config("dq", big, elt), block_m, block_n, interp)
    dq = Launch((cdiv(Lq, bm) * N * Hq,), dict(consts, BLOCK_M=bm, BLOCK_N=bn), warps, stages)
    return pre, dkdv, dq


def decode_splits(N, Hk, Lk, num_sms, block_n):
    """(num_splits, chunk) of the split-KV decoder step over Lk keys. The wanted count (about two programs per SM,
    at least 128 keys a split, at most 64 splits) is rounded down to a power of two; chunk is a multiple of
    block_n. Both are run-time kernel arguments, so a growing KV cache compiles nothing new."""
    want = max(1, min(cdiv(2 * num_sms, max(1, N * Hk)), cdiv(Lk, 128), 64))
    splits = 1 << (want.bit_length() - 1)
    chunk = max(block_n, cdiv(cdiv(Lk, splits), block_n) * block_n)
    return max(1, cdiv(Lk, chunk)), chunk


def decode_launch(N, Hq, Hk, Lk, D, Dv, dtype, *, has_bias=False, allow_tf32=None, num_splits=None, block_n=None,
                  num_sms=1, interp=None):
    """(decode Launch, combine Launch or None, num_splits, chunk) for query length 1."""
    interp = interpreting() if interp is None else interp
    elt = torch.empty((), dtype=dtype).element_size()
    BD, BDV = _pow2(D), _pow2(Dv)
    big = max(BD, BDV)
    bn = block_n or ((64 if big <= 128 else 32) if elt <= 2 else (32 if big <= 128 else 16))
    if num_splits is None:
        splits, chunk = decode_splits(N, Hk, Lk, num_sms, bn)
    else:
        chunk = max(bn, cdiv(cdiv(Lk, num_splits), bn) * bn)
        splits = max(1, cdiv(Lk, chunk))
    consts = dict(SPLIT=splits > 1, HEAD_D=D, HEAD_DV=Dv, HAS_BIAS=bool(has_bias), BLOCK_H=_pow2(Hq // Hk),
                  BLOCK_N=bn, BLOCK_D=BD, BLOCK_DV=BDV, DOT_PREC=dot_precision(dtype, allow_tf32, "matmul"),
                  INTERP=interp)
    dec = Launch((splits * N * Hk,), consts, 8 if big >= 128 else 4, 2)
    comb = None
    if splits > 1:
        comb = Launch((N * Hq,), dict(BLOCK_S=16, HEAD_DV=Dv, BLOCK_DV=BDV), 4, 1)
    return dec, comb, splits, chunk


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _check(q, k, v, bias):
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: {q.dtype} "
                           f"key.dtype: {k.dtype} and value.dtype: {v.dtype} instead.")
    check_dtypes(q.dtype, bias=bias)


def _bias_strides(bias):
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def sdpa_forward(q, k, v, bias=None, is_causal=False, scale=None, allow_tf32=None, *,
                 block_m=None, block_n=None, num_splits=None):
    """Flash attention forward.

    q[N,Hq,Lq,D], k[N,Hk,Lk,D], v[N,Hk,Lk,Dv], bias None or float [N,Hq,Lq,Lk] in q's dtype (any strides, may be
    0; -inf masks). Returns (out[N,Hq,Lq,Dv] in q.dtype, contiguous; lse[N,Hq,Lq] float32, -inf for fully masked
    rows). Lq == 1 takes the split-KV decode path (num_splits=None picks from the SM count; 1 on CPU).
    allow_tf32=None follows torch.backends.cuda.matmul.allow_tf32 for float32. block_m / block_n override the
    static config (tests use them to exercise multi-block loops).
    """
    _check(q, k, v, bias)
    N, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    Dv = v.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    out = torch.empty((N, Hq, Lq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((N, Hq, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if Dv == 0 or D == 0:
        # degenerate head dims: scores are bias only (never hit by real models)
        s = torch.zeros((N, Hq, Lq, Lk), device=q.device, dtype=torch.float32)
        if bias is not None:
            s = s + bias.float()
        if is_causal:
            s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        lse.copy_(torch.logsumexp(s, -1))
        out.zero_()
        return out, lse
    qk_scale = float(scale) * _LOG2E
    has_bias = bias is not None
    b = bias if has_bias else q  # dummy pointer, never dereferenced
    sb = _bias_strides(bias)
    interp = interpreting()

    with on_device(q):
        if Lq == 1:
            lk_eff = min(Lk, 1) if is_causal else Lk  # top-left causal: the single query sees key 0 only
            dec, comb, splits, chunk = decode_launch(N, Hq, Hk, lk_eff, D, Dv, q.dtype, has_bias=has_bias,
                                                     allow_tf32=allow_tf32, num_splits=num_splits, block_n=block_n,
                                                     num_sms=_num_sms(q.device), interp=interp)
            if comb is not None:
                pacc = torch.empty((N, Hq, splits, dec.constexprs["BLOCK_DV"]), device=q.device, dtype=torch.float32)
                pm = torch.empty((N, Hq, splits), device=q.device, dtype=torch.float32)
                pl = torch.empty_like(pm)
            else:
                pacc = pm = pl = lse
            dec.run(_attn_decode_kernel, q, k, v, b, out, lse, pacc, pm, pl,
                    q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), sb[0], sb[1], sb[3],
                    out.stride(0), out.stride(1), out.stride(3), Hq, Hk, Hq // Hk, lk_eff, chunk, splits, qk_scale)
            if comb is not None:
                comb.run(_attn_decode_combine_kernel, out, lse, pacc, pm, pl,
                         out.stride(0), out.stride(1), out.stride(3), Hq, splits)
            return out, lse

        launch = forward_launch(N, Hq, Lq, D, Dv, q.dtype, has_bias=has_bias, is_causal=is_causal,
                                allow_tf32=allow_tf32, block_m=block_m, block_n=block_n, interp=interp)
        launch.run(_attn_fwd_kernel, q, k, v, b, out, lse, *q.stride(), *k.stride(), *v.stride(), *sb,
                   *out.stride(), Hq, Hq // Hk, Lq, Lk, qk_scale)
    return out, lse


def sdpa_backward(grad_out, q, k, v, out, lse, bias=None, is_causal=False, scale=None, allow_tf32=None, *,
                  block_m=None, block_n=None):
    """Flash attention backward.  Returns (dq[N,Hq,Lq,D] q.dtype, dk[N,Hk,Lk,D] k.dtype, dv[N,Hk,Lk,Dv] v.dtype),
    all contiguous.  dk/dv are summed over the query heads of each GQA group.  lse is sdpa_forward's (-inf rows give
    zero gradients).  grad_out/out may be strided."""
    _check(q, k, v, bias)
    N, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    Dv = v.shape[3]
    G = Hq // Hk
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    dq = torch.empty((N, Hq, Lq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((N, Hk, Lk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((N, Hk, Lk, Dv), device=q.device, dtype=v.dtype)
    if Lq == 0 or Lk == 0 or N == 0 or D == 0 or Dv == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    qk_scale = float(scale) * _LOG2E
    has_bias = bias is not None
    b = bias if has_bias else q
    sb = _bias_strides(bias)
    pre, dkdv, dql = backward_launches(N, Hq, Hk, Lq, Lk, D, Dv, q.dtype, has_bias=has_bias, is_causal=is_causal,
                                       allow_tf32=allow_tf32, block_m=block_m, block_n=block_n)
    strides = (*q.stride(), *k.stride(), *v.stride(), *sb, *grad_out.stride())
    with on_device(q):
        delta = torch.empty((N, Hq, Lq), device=q.device, dtype=torch.float32)
        pre.run(_attn_bwd_preprocess_kernel, out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Lq)
        dkdv.run(_attn_bwd_dkdv_kernel, q, k, v, b, grad_out, lse, delta, dk, dv, *strides, Hq, Hk, G, Lq, Lk,
                 qk_scale, float(scale))
        dql.run(_attn_bwd_dq_kernel, q, k, v, b, grad_out, lse, delta, dq, *strides, Hq, G, Lq, Lk, qk_scale,
                float(scale))
    return dq, dk, dv
