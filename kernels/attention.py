"""Triton scaled-dot-product attention kernels (flash forward/backward, split-KV decode).

Layout (the lead's dispatch layer validates and flattens before calling here):
    q[N, Hq, Lq, D], k[N, Hk, Lk, D], v[N, Hk, Lk, Dv], bias[N, Hq, Lq, Lk] (optional, any strides, 0 allowed)
    Hq % Hk == 0; query head h reads kv head h // (Hq // Hk) (GQA handled in-kernel, no expand copy).
All inputs may be arbitrary strided views; outputs are freshly allocated contiguous tensors.

Conventions shared by forward and backward:
  * softmax is computed in base 2: s2 = (q.k * scale + bias) * log2(e); exp2 is cheaper than exp on GPU.
  * lse is stored in natural log units, float32, shape [N, Hq, Lq].
  * A fully masked row (every key -inf, including Lk == 0) gets out = 0 and lse = +inf.  +inf (not -inf) is
    chosen so that the backward's recomputation p = exp(s - lse) is exactly 0 for that row and never NaN.
  * is_causal uses torch's top-left alignment: query i sees keys j <= i, also when Lq != Lk.  Key blocks entirely
    above the diagonal are never visited (forward, dq) and query blocks entirely above it are never visited (dk/dv).
  * fp32 accumulation everywhere; fp16/bf16 operands feed tl.dot directly on GPU.  For fp32 inputs tl.dot runs with
    input_precision="ieee" unless the caller passes allow_tf32=True.
  * Under TRITON_INTERPRET=1 tl.dot on bf16 operands is wrong (DESIGN.md pitfall), so when interpreting (and only
    then) every dot operand is upcast to fp32.
"""
import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


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
        if HAS_BIAS:
            b = tl.load(b_base + offs_m[:, None] * s_bm + cols[None, :] * s_bl,
                        mask=m_mask[:, None] & c_mask[None, :], other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < Lq
    d_mask = offs_d < HEAD_D
    dv_mask = offs_dv < HEAD_DV

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
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        mid = tl.minimum(hi, ((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N)
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

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + n * s_on + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------------------------------------------
# Decode (Lq == 1): split-KV.  One program per (split, n, kv head); its rows are the G query heads that share the kv
# head, so K/V are read once per group (GQA) and the rows pad the MMA M dimension up to 16.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_decode_kernel(
    Q, K, V, B, O, LSE, PACC, PM, PL,
    s_qn, s_qh, s_qd,
    s_kn, s_kh, s_kl, s_kd,
    s_vn, s_vh, s_vl, s_vd,
    s_bn, s_bh, s_bl,
    s_on, s_oh, s_od,
    Hq, Hk, G, Lk, chunk, qk_scale,
    NUM_SPLITS: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1)
    n = (pid // Hk).to(tl.int64)
    hk = (pid % Hk).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_H)
    r_mask = offs_r < G
    heads = hk * G + offs_r  # query heads of this group (int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_D
    dv_mask = offs_dv < HEAD_DV

    q = tl.load(Q + n * s_qn + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if INTERP:
        q = q.to(tl.float32)
    k_base = K + n * s_kn + hk * s_kh
    v_base = V + n * s_vn + hk * s_vh
    b_rows = B + n * s_bn + heads * s_bh

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

    lo = split * chunk
    hi = tl.minimum(lo + chunk, Lk)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        c_mask = cols < hi
        kt = tl.load(k_base + cols[None, :] * s_kl + offs_d[:, None] * s_kd,
                     mask=c_mask[None, :] & d_mask[:, None], other=0.0)
        if INTERP:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if HAS_BIAS:
            b = tl.load(b_rows[:, None] + cols[None, :] * s_bl, mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
        s = tl.where(c_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
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

    if NUM_SPLITS == 1:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(O + n * s_on + heads[:, None] * s_oh + offs_dv[None, :] * s_od, out.to(O.dtype.element_ty),
                 mask=r_mask[:, None] & dv_mask[None, :])
        tl.store(LSE + n * Hq + heads, lse, mask=r_mask)
    else:
        # partials: PACC[N, Hq, NUM_SPLITS, BLOCK_DV] (unnormalised), PM/PL[N, Hq, NUM_SPLITS] (m in log2 units)
        row = (n * Hq + heads) * NUM_SPLITS + split
        tl.store(PACC + row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=r_mask[:, None])
        tl.store(PM + row, m_i, mask=r_mask)
        tl.store(PL + row, l_i, mask=r_mask)


@triton.jit
def _attn_decode_combine_kernel(
    O, LSE, PACC, PM, PL,
    s_on, s_oh, s_od,
    Hq,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # = n * Hq + h
    n = pid // Hq
    h = pid % Hq
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = pid * NUM_SPLITS + offs_s
    m = tl.load(PM + rows, mask=s_mask, other=float("-inf"))
    l = tl.load(PL + rows, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)  # splits that saw nothing have m = -inf -> weight 0
    l_tot = tl.sum(l * w, 0)
    acc = tl.load(PACC + rows[:, None] * BLOCK_DV + offs_dv[None, :], mask=s_mask[:, None], other=0.0)
    acc = tl.sum(acc * w[:, None], 0)
    empty = l_tot == 0.0
    l_safe = tl.where(empty, 1.0, l_tot)
    out = acc / l_safe
    lse = tl.where(empty, float("inf"), (m_max + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + n * s_on + h * s_oh + offs_dv * s_od, out.to(O.dtype.element_ty), mask=offs_dv < HEAD_DV)
    tl.store(LSE + pid, lse)


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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    start_n = pid_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_mask = offs_n < Lk
    d_mask = offs_d < HEAD_D
    dv_mask = offs_dv < HEAD_DV

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
            # out-of-range rows get lse=+inf -> p = 0
            lse2 = tl.load(LSE + row_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            if HAS_BIAS:
                b = tl.load(b_base + offs_m[None, :] * s_bm + offs_n[:, None] * s_bl,
                            mask=m_mask[None, :] & n_mask[:, None], other=0.0)
                st += b.to(tl.float32) * 1.4426950408889634
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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < Lq
    d_mask = offs_d < HEAD_D
    dv_mask = offs_dv < HEAD_DV

    q = tl.load(Q + n * s_qn + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    do = tl.load(DO + n * s_dn + h * s_dh + offs_m[:, None] * s_dm + offs_dv[None, :] * s_dd,
                 mask=m_mask[:, None] & dv_mask[None, :], other=0.0)
    if INTERP:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + n * s_kn + hk * s_kh
    v_base = V + n * s_vn + hk * s_vh
    b_base = B + n * s_bn + h * s_bh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
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
        if HAS_BIAS:
            b = tl.load(b_base + offs_m[:, None] * s_bm + cols[None, :] * s_bl,
                        mask=m_mask[:, None] & c_mask[None, :], other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
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
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _pow2(x, lo=16):
    return max(lo, triton.next_power_of_2(int(x)))


def _dot_prec(dtype, allow_tf32):
    # only matters for fp32 operands; for fp16/bf16 "tf32" is Triton's default and is ignored by the MMA lowering
    if dtype == torch.float64 or (dtype == torch.float32 and not allow_tf32):
        return "ieee"
    return "tf32"


# Static configs for H100/H200 keyed on padded head dim and element size: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Chosen by compiling each kernel AOT for sm_90a (triton.compile + ptxas -v, no GPU available) and keeping configs
# with no/minimal register spills (causal variants); not yet timed on hardware.  fp32 with input_precision="ieee"
# runs on FMA units (no tensor cores), hence the small tiles.  If a config does not fit (shared memory) the
# launcher reduces stages / halves blocks and retries, remembering what worked per key.
def _fwd_config(bd, elt):
    if elt <= 2:
        if bd <= 64:
            return 128, 64, 4, 3
        if bd <= 128:
            return 128, 64, 8, 3
        return 64, 32, 8, 2
    if bd <= 128:
        return 64, 32, 8, 2
    return 32, 16, 8, 1


def _bwd_kv_config(bd, elt):  # (BLOCK_M over queries, BLOCK_N over keys, warps, stages)
    if elt <= 2:
        if bd <= 64:
            return 32, 128, 8, 3
        if bd <= 128:
            return 32, 64, 8, 3
        return 32, 32, 8, 1
    if bd <= 64:
        return 32, 32, 8, 1
    return 16, 32, 8, 1


def _bwd_q_config(bd, elt):
    if elt <= 2:
        if bd <= 64:
            return 128, 32, 4, 3
        if bd <= 128:
            return 128, 32, 8, 2
        return 64, 16, 8, 2
    if bd <= 64:
        return 64, 16, 8, 1
    return 32, 16, 8, 1


_CFG_CACHE = {}


def _launch(name, kernel, grid_fn, cfg, args, consts):
    """Launch with cfg=(BM, BN, warps, stages); on OutOfResources halve the larger block and retry (GPU only)."""
    key = (name, cfg) + tuple(sorted((k, v) for k, v in consts.items() if isinstance(v, (int, bool, str))))
    cfg = _CFG_CACHE.get(key, cfg)
    while True:
        bm, bn, warps, stages = cfg
        try:
            if _INTERPRET:
                kernel[grid_fn(bm, bn)](*args, BLOCK_M=bm, BLOCK_N=bn, **consts)
            else:
                kernel[grid_fn(bm, bn)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **consts)
            _CFG_CACHE[key] = cfg
            return
        except triton.runtime.errors.OutOfResources:
            if stages > 1:
                cfg = (bm, bn, warps, stages - 1)
            elif bm >= bn and bm > 16:
                cfg = (bm // 2, bn, warps, stages)
            elif bn > 16:
                cfg = (bm, bn // 2, warps, stages)
            else:
                raise


def _bias_strides(bias):
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def sdpa_forward(q, k, v, bias=None, is_causal=False, scale=None, allow_tf32=False, *,
                 block_m=None, block_n=None, num_splits=None):
    """Flash attention forward.

    q[N,Hq,Lq,D], k[N,Hk,Lk,D], v[N,Hk,Lk,Dv], bias None or float [N,Hq,Lq,Lk] (any strides, may be 0; -inf masks).
    Returns (out[N,Hq,Lq,Dv] in q.dtype, contiguous; lse[N,Hq,Lq] float32, +inf for fully masked rows).
    Lq == 1 takes the split-KV decode path (num_splits=None picks from the SM count; 1 on CPU).
    block_m / block_n override the static config (tests use them to exercise multi-block loops).
    """
    N, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    Dv = v.shape[3]
    G = Hq // Hk
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    out = torch.empty((N, Hq, Lq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((N, Hq, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if Dv == 0 or D == 0:
        # degenerate head dims: scores are bias only; let the reference math handle it (never hit by real models)
        s = torch.zeros((N, Hq, Lq, Lk), device=q.device, dtype=torch.float32)
        if bias is not None:
            s = s + bias.float()
        if is_causal:
            s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        l = torch.logsumexp(s, -1)
        lse.copy_(torch.where(torch.isneginf(l), torch.full_like(l, float("inf")), l))
        out.zero_()
        return out, lse
    BD, BDV = _pow2(D), _pow2(Dv)
    prec = _dot_prec(q.dtype, allow_tf32)
    qk_scale = float(scale) * _LOG2E
    has_bias = bias is not None
    b = bias if has_bias else q  # dummy pointer, never dereferenced
    sb = _bias_strides(bias)

    if Lq == 1:
        lk_eff = min(Lk, 1) if is_causal else Lk  # top-left causal: the single query sees key 0 only
        elt = q.element_size()
        big = max(BD, BDV)
        # register-spill-free on sm_90a per AOT ptxas check (see config tables below)
        bn = block_n or ((64 if big <= 128 else 32) if elt <= 2 else (32 if big <= 128 else 16))
        bh = _pow2(G)
        if num_splits is None:
            want = max(1, -(-2 * _num_sms(q.device) // max(1, N * Hk)))
            num_splits = max(1, min(want, -(-lk_eff // 128), 64))
        per_split = -(-lk_eff // num_splits)
        chunk = max(bn, -(-per_split // bn) * bn)  # multiple of BLOCK_N
        num_splits = max(1, -(-lk_eff // chunk))
        if num_splits > 1:
            pacc = torch.empty((N, Hq, num_splits, BDV), device=q.device, dtype=torch.float32)
            pm = torch.empty((N, Hq, num_splits), device=q.device, dtype=torch.float32)
            pl = torch.empty_like(pm)
        else:
            pacc = pm = pl = lse
        kw = {} if _INTERPRET else dict(num_warps=8 if big >= 128 else 4, num_stages=2)
        _attn_decode_kernel[(num_splits, N * Hk)](
            q, k, v, b, out, lse, pacc, pm, pl,
            q.stride(0), q.stride(1), q.stride(3),
            *k.stride(), *v.stride(),
            sb[0], sb[1], sb[3],
            out.stride(0), out.stride(1), out.stride(3),
            Hq, Hk, G, lk_eff, chunk, qk_scale,
            NUM_SPLITS=num_splits, HEAD_D=D, HEAD_DV=Dv, HAS_BIAS=has_bias,
            BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=BD, BLOCK_DV=BDV, DOT_PREC=prec, INTERP=_INTERPRET, **kw)
        if num_splits > 1:
            kw = {} if _INTERPRET else dict(num_warps=4)
            _attn_decode_combine_kernel[(N * Hq,)](
                out, lse, pacc, pm, pl,
                out.stride(0), out.stride(1), out.stride(3), Hq,
                NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DV=Dv, BLOCK_DV=BDV, **kw)
        return out, lse

    cfg = _fwd_config(max(BD, BDV), q.element_size())
    if block_m or block_n:
        cfg = (block_m or cfg[0], block_n or cfg[1], cfg[2], cfg[3])
    elif _INTERPRET:
        cfg = (16, 16, cfg[2], cfg[3])
    _launch(f"fwd{q.element_size()}", _attn_fwd_kernel, lambda bm, bn: (triton.cdiv(Lq, bm), N * Hq), cfg,
            (q, k, v, b, out, lse, *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
             Hq, G, Lq, Lk, qk_scale),
            dict(HEAD_D=D, HEAD_DV=Dv, HAS_BIAS=has_bias, IS_CAUSAL=bool(is_causal), BLOCK_D=BD, BLOCK_DV=BDV,
                 DOT_PREC=prec, INTERP=_INTERPRET))
    return out, lse


def sdpa_backward(grad_out, q, k, v, out, lse, bias=None, is_causal=False, scale=None, allow_tf32=False, *,
                  block_m=None, block_n=None):
    """Flash attention backward.  Returns (dq[N,Hq,Lq,D] q.dtype, dk[N,Hk,Lk,D] k.dtype, dv[N,Hk,Lk,Dv] v.dtype),
    all contiguous.  dk/dv are summed over the query heads of each GQA group.  lse is sdpa_forward's (+inf rows give
    zero gradients).  grad_out/out may be strided."""
    N, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    Dv = v.shape[3]
    G = Hq // Hk
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dq = torch.empty((N, Hq, Lq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((N, Hk, Lk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((N, Hk, Lk, Dv), device=q.device, dtype=v.dtype)
    if Lq == 0 or Lk == 0 or N == 0 or D == 0 or Dv == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    BD, BDV = _pow2(D), _pow2(Dv)
    prec = _dot_prec(q.dtype, allow_tf32)
    qk_scale = float(scale) * _LOG2E
    has_bias = bias is not None
    b = bias if has_bias else q
    sb = _bias_strides(bias)
    elt = q.element_size()

    delta = torch.empty((N, Hq, Lq), device=q.device, dtype=torch.float32)
    pbm = 16 if _INTERPRET else 64
    kw = {} if _INTERPRET else dict(num_warps=4)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Lq, pbm), N * Hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Lq,
        HEAD_DV=Dv, BLOCK_M=pbm, BLOCK_DV=BDV, **kw)

    common = dict(HEAD_D=D, HEAD_DV=Dv, HAS_BIAS=has_bias, IS_CAUSAL=bool(is_causal), BLOCK_D=BD, BLOCK_DV=BDV,
                  DOT_PREC=prec, INTERP=_INTERPRET)
    strides = (*q.stride(), *k.stride(), *v.stride(), *sb, *grad_out.stride())

    cfg = _bwd_kv_config(max(BD, BDV), elt)
    if block_m or block_n:
        cfg = (block_m or cfg[0], block_n or cfg[1], cfg[2], cfg[3])
    elif _INTERPRET:
        cfg = (16, 16, cfg[2], cfg[3])
    _launch(f"dkdv{elt}", _attn_bwd_dkdv_kernel, lambda bm, bn: (triton.cdiv(Lk, bn), N * Hk), cfg,
            (q, k, v, b, grad_out, lse, delta, dk, dv, *strides, Hq, Hk, G, Lq, Lk, qk_scale, float(scale)),
            common)

    cfg = _bwd_q_config(max(BD, BDV), elt)
    if block_m or block_n:
        cfg = (block_m or cfg[0], block_n or cfg[1], cfg[2], cfg[3])
    elif _INTERPRET:
        cfg = (16, 16, cfg[2], cfg[3])
    _launch(f"dq{elt}", _attn_bwd_dq_kernel, lambda bm, bn: (triton.cdiv(Lq, bm), N * Hq), cfg,
            (q, k, v, b, grad_out, lse, delta, dq, *strides, Hq, G, Lq, Lk, qk_scale, float(scale)),
            common)
    return dq, dk, dv
