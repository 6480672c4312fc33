"""Triton kernels for fused additive (Bahdanau) attention, one decoder step.

    score[n, s] = sum_a v[a] * tanh(qp[n, a] + kp[n, s, a])      (masked: -inf where mask[n, s] is False)
    weights[n]  = softmax(score[n])  over s                       (a row with every s masked: all zeros)
    context[n]  = sum_s weights[n, s] * values[n, s, :]

qp = W q and kp = U keys are precomputed by the caller (kp once per source sentence).  The forward never
materialises tanh(qp + kp) [N, S, A]: scores, the online softmax and the weighted sum of values happen in one pass
over S per batch row; the backward recomputes tanh instead of storing it.

All math is fp32 regardless of the input dtype (tanh: kernels/common.py).  Value dims of any size run in blocks of
at most 256 columns, so no tile outgrows the registers.
"""
import torch
import triton
import triton.language as tl

from .common import Launch, cdiv, check_dtypes, on_device, tanh


@triton.jit
def _key_features(KP, n, rows, cols, s_kn, s_ks, s_ka, mask, qp):
    """tanh(kp[n, rows, cols] + qp) in fp32: the hidden features the score v . tanh(W q + U k) reduces (forward)
    and the backward differentiates."""
    kp = tl.load(KP + n * s_kn + rows[:, None] * s_ks + cols[None, :] * s_ka, mask=mask, other=0.0).to(tl.float32)
    return tanh(kp + qp[None, :])


@triton.jit
def _weights(SC, n, S, rows, r_mask, m_safe, inv):
    """Softmax weights of key rows from the raw scores in the scratch SC, the row maximum and 1 / denominator."""
    return tl.exp(tl.load(SC + n * S + rows, mask=r_mask, other=float("-inf")) - m_safe) * inv


@triton.jit
def _additive_fwd_kernel(
    QP, KP, VW, VAL, MASK, CTX, W, SC,
    s_qn, s_qa, s_kn, s_ks, s_ka, s_va, s_xn, s_xs, s_xd, s_mn, s_ms,
    S, A, Dv,
    HAS_MASK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # one program per batch row n.  SC is an fp32 [N, S] scratch for raw scores (may alias W when W is fp32).
    n = tl.program_id(0).to(tl.int64)
    offs_s0 = tl.arange(0, BLOCK_S)
    offs_a0 = tl.arange(0, BLOCK_A)
    offs_dv0 = tl.arange(0, BLOCK_DV)

    # pass 1: scores, their running maximum and softmax denominator
    m_i = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + offs_s0
        r_mask = rows < S
        e = tl.zeros([BLOCK_S], dtype=tl.float32)
        for a0 in range(0, A, BLOCK_A):
            cols = a0 + offs_a0
            a_mask = cols < A
            qp = tl.load(QP + n * s_qn + cols * s_qa, mask=a_mask, other=0.0).to(tl.float32)
            vw = tl.load(VW + cols * s_va, mask=a_mask, other=0.0).to(tl.float32)
            th = _key_features(KP, n, rows, cols, s_kn, s_ks, s_ka, r_mask[:, None] & a_mask[None, :], qp)
            e += tl.sum(th * vw[None, :], 1)
        valid = r_mask
        if HAS_MASK:
            keep = tl.load(MASK + n * s_mn + rows * s_ms, mask=r_mask, other=0)
            valid = valid & (keep != 0)
        e = tl.where(valid, e, float("-inf"))
        tl.store(SC + n * S + rows, e, mask=r_mask)
        m_new = tl.maximum(m_i, tl.max(e, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(e - m_safe), 0)
        m_i = m_new

    inv = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))  # fully masked row -> zero context and weights
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    # make the raw scores written above visible to every thread before re-reading them
    tl.debug_barrier()
    # pass 2: the context, one block of value columns at a time, then the weights
    for d0 in range(0, Dv, BLOCK_DV):
        offs_dv = d0 + offs_dv0
        dv_mask = offs_dv < Dv
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            rows = s0 + offs_s0
            r_mask = rows < S
            w = _weights(SC, n, S, rows, r_mask, m_safe, inv)
            val = tl.load(VAL + n * s_xn + rows[:, None] * s_xs + offs_dv[None, :] * s_xd,
                          mask=r_mask[:, None] & dv_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * val, 0)
        tl.store(CTX + n * Dv + offs_dv, acc.to(CTX.dtype.element_ty), mask=dv_mask)
    # weights last, once every thread has read the scores: W may alias SC
    tl.debug_barrier()
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + offs_s0
        r_mask = rows < S
        w = _weights(SC, n, S, rows, r_mask, m_safe, inv)
        tl.store(W + n * S + rows, w.to(W.dtype.element_ty), mask=r_mask)


@triton.jit
def _additive_bwd_pass1_kernel(
    GCTX, GW, VAL, W, DVAL, T, C,
    s_gn, s_gd, s_hn, s_hs, s_xn, s_xs, s_xd, s_wn, s_ws,
    S, Dv,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # per n: dvalues = w * dctx;  dw = values . dctx + gw;  T = w * dw (fp32 scratch);  C[n] = sum_s w * dw
    n = tl.program_id(0).to(tl.int64)
    offs_s0 = tl.arange(0, BLOCK_S)
    offs_dv0 = tl.arange(0, BLOCK_DV)
    c = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + offs_s0
        r_mask = rows < S
        w = tl.load(W + n * s_wn + rows * s_ws, mask=r_mask, other=0.0).to(tl.float32)
        dw = tl.load(GW + n * s_hn + rows * s_hs, mask=r_mask, other=0.0).to(tl.float32)
        for d0 in range(0, Dv, BLOCK_DV):
            offs_dv = d0 + offs_dv0
            dv_mask = offs_dv < Dv
            g = tl.load(GCTX + n * s_gn + offs_dv * s_gd, mask=dv_mask, other=0.0).to(tl.float32)
            val = tl.load(VAL + n * s_xn + rows[:, None] * s_xs + offs_dv[None, :] * s_xd,
                          mask=r_mask[:, None] & dv_mask[None, :], other=0.0).to(tl.float32)
            dw += tl.sum(val * g[None, :], 1)
            tl.store(DVAL + (n * S + rows)[:, None] * Dv + offs_dv[None, :],
                     (w[:, None] * g[None, :]).to(DVAL.dtype.element_ty), mask=r_mask[:, None] & dv_mask[None, :])
        t = w * dw
        tl.store(T + n * S + rows, t, mask=r_mask)
        c += t
    tl.store(C + n, tl.sum(c, 0))


@triton.jit
def _additive_bwd_pass2_kernel(
    QP, KP, VW, W, T, C, DQP, DKP, DVP,
    s_qn, s_qa, s_kn, s_ks, s_ka, s_va, s_wn, s_ws,
    S, A,
    BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
):
    # grid (N, cdiv(A, BLOCK_A)):  de_s = w_s (dw_s - C) = T_s - w_s C;  dpre = de v (1 - tanh^2)
    # dkp = dpre;  dqp = sum_s dpre;  dv partial[n] = sum_s de tanh   (summed over n by the launcher)
    n = tl.program_id(0).to(tl.int64)
    pa = tl.program_id(1)
    cols = pa * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = cols < A
    offs_s0 = tl.arange(0, BLOCK_S)
    qp = tl.load(QP + n * s_qn + cols * s_qa, mask=a_mask, other=0.0).to(tl.float32)
    vw = tl.load(VW + cols * s_va, mask=a_mask, other=0.0).to(tl.float32)
    c = tl.load(C + n)
    dqp = tl.zeros([BLOCK_A], dtype=tl.float32)
    dvp = tl.zeros([BLOCK_A], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + offs_s0
        r_mask = rows < S
        w = tl.load(W + n * s_wn + rows * s_ws, mask=r_mask, other=0.0).to(tl.float32)
        t = tl.load(T + n * S + rows, mask=r_mask, other=0.0)
        de = t - w * c  # masked keys have w = 0 -> de = 0
        m2 = r_mask[:, None] & a_mask[None, :]
        th = _key_features(KP, n, rows, cols, s_kn, s_ks, s_ka, m2, qp)
        dpre = de[:, None] * vw[None, :] * (1.0 - th * th)
        tl.store(DKP + (n * S + rows)[:, None] * A + cols[None, :], dpre.to(DKP.dtype.element_ty), mask=m2)
        dqp += tl.sum(dpre, 0)
        dvp += tl.sum(de[:, None] * th, 0)
    tl.store(DQP + n * A + cols, dqp.to(DQP.dtype.element_ty), mask=a_mask)
    tl.store(DVP + n * A + cols, dvp, mask=a_mask)


def additive_blocks(A, Dv, block_s=None, block_a=None, block_dv=None):
    """(BLOCK_S, BLOCK_A, BLOCK_DV): the [BLOCK_S, BLOCK_A] and [BLOCK_S, BLOCK_DV] register tiles stay around 2K
    elements (no spills on sm_90a); value dims above 256 are walked in blocks."""
    bdv = block_dv or min(256, triton.next_power_of_2(max(int(Dv), 1)))
    ba = block_a or min(128, triton.next_power_of_2(max(int(A), 1)))
    bs = block_s or max(4, min(64, 2048 // max(ba, bdv)))
    return bs, ba, bdv


def additive_attention_forward(qp, kp, v, values, mask=None, *, block_s=None, block_a=None, block_dv=None):
    """qp[N,A], kp[N,S,A], v[A], values[N,S,Dv], mask[N,S] bool (True = keep) or None; any strides.
    Returns (context[N,Dv] in values.dtype, weights[N,S] in qp.dtype), both contiguous.
    A row with every key masked gives zero context and zero weights."""
    check_dtypes(qp.dtype, kp=kp, v=v)
    N, S, A = kp.shape
    Dv = values.shape[2]
    ctx = torch.empty((N, Dv), device=values.device, dtype=values.dtype)
    w = torch.empty((N, S), device=qp.device, dtype=qp.dtype)
    if N == 0:
        return ctx, w
    if S == 0 or Dv == 0:
        return ctx.zero_(), w
    bs, ba, bdv = additive_blocks(A, Dv, block_s, block_a, block_dv)
    has_mask = mask is not None
    sm = tuple(mask.stride()) if has_mask else (0, 0)
    with on_device(qp):
        sc = w if w.dtype == torch.float32 else torch.empty((N, S), device=qp.device, dtype=torch.float32)
        Launch((N,), dict(HAS_MASK=has_mask, BLOCK_S=bs, BLOCK_A=ba, BLOCK_DV=bdv), 4, 1).run(
            _additive_fwd_kernel, qp, kp, v, values, mask if has_mask else w, ctx, w, sc,
            *qp.stride(), *kp.stride(), v.stride(0), *values.stride(), *sm, S, A, Dv)
    return ctx, w


def additive_attention_backward(grad_context, grad_weights, qp, kp, v, values, mask, weights, *,
                                block_s=None, block_a=None, block_dv=None):
    """Gradients of additive_attention_forward.  grad_weights must be a tensor (zeros if unused); weights is the
    forward's output (the mask is already folded into it: masked keys have weight 0, so `mask` is unused here).
    Returns (dqp[N,A] qp.dtype, dkp[N,S,A] kp.dtype, dv[A] v.dtype, dvalues[N,S,Dv] values.dtype), contiguous."""
    N, S, A = kp.shape
    Dv = values.shape[2]
    dqp = torch.empty((N, A), device=qp.device, dtype=qp.dtype)
    dkp = torch.empty((N, S, A), device=kp.device, dtype=kp.dtype)
    dvals = torch.empty((N, S, Dv), device=values.device, dtype=values.dtype)
    if N == 0 or S == 0:
        return dqp.zero_(), dkp, torch.zeros_like(v), dvals
    bs, ba, bdv = additive_blocks(A, Dv, block_s, block_a, block_dv)
    with on_device(qp):
        t = torch.empty((N, S), device=qp.device, dtype=torch.float32)
        c = torch.empty((N,), device=qp.device, dtype=torch.float32)
        dvp = torch.empty((N, A), device=qp.device, dtype=torch.float32)
        if Dv > 0:
            Launch((N,), dict(BLOCK_S=bs, BLOCK_DV=bdv), 4, 1).run(
                _additive_bwd_pass1_kernel, grad_context, grad_weights, values, weights, dvals, t, c,
                *grad_context.stride(), *grad_weights.stride(), *values.stride(), *weights.stride(), S, Dv)
        else:
            t.copy_(weights.float() * grad_weights.float())
            c.copy_(t.sum(1))
        if A > 0:
            Launch((N, cdiv(A, ba)), dict(BLOCK_S=bs, BLOCK_A=ba), 4, 1).run(
                _additive_bwd_pass2_kernel, qp, kp, v, weights, t, c, dqp, dkp, dvp,
                *qp.stride(), *kp.stride(), v.stride(0), *weights.stride(), S, A)
        dv = dvp.sum(0).to(v.dtype)
    return dqp, dkp, dv, dvals
