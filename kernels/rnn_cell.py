"""Triton kernels for single RNN/LSTM/GRU cell steps (forward and backward).

Forward: ONE launch per cell step. Each program owns a tile of batch rows x hidden units and accumulates every
gate's pre-activation for that tile (x @ W_ih^T and h @ W_hh^T as tl.dot over K blocks, fp32 accumulators), then
adds the biases, applies the activations and updates the state in the epilogue. The gate layout is torch's
([i, f, g, o] for LSTM, [r, z, n] for GRU), so torch state_dicts load unchanged.

Backward: one fused pointwise kernel turns the incoming gradients into pre-activation gate gradients (plus the
direct state gradient), then the weight/input gradients are plain GEMMs (cuBLAS via torch.mm), which are already
at the hardware roofline and need no fusion.

Conventions (the caller validates): inputs contiguous, same dtype (float32, float16, bfloat16) and device;
optional biases may be None. Outputs are in the input dtype; all math accumulates in fp32.

The jit helpers defined here (`_gemm_gates`, `_sigmoid`, `_tanh`) are shared with rnn_sequence.py.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "lstm_cell_forward", "lstm_cell_backward",
    "gru_cell_forward", "gru_cell_backward",
    "rnn_cell_forward", "rnn_cell_backward",
]


# ----------------------------------------------------------------------------------------------------------------
# launch configuration helpers (shared with rnn_sequence.py)
# ----------------------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    # Read at call time: the test suite may set TRITON_INTERPRET after importing this module's package.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    # tl.dot on fp32 defaults to TF32 on NVIDIA (~1e-3 rel error); "ieee" keeps fp32 parity with torch.
    # For fp16/bf16 operands the precision flag does not matter ("tf32" is the default there).
    if dtype == torch.float32 and not allow_tf32:
        return "ieee"
    return "tf32"


def _gemm_blocks(n_rows: int):
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) for the gate-GEMM kernels.

    tl.dot needs every block dim >= 16, so the batch tile is at least 16 and masks cover the rest. Small hidden
    tiles on GPU spread the weight reads of a small-batch step over many SMs (the step is bandwidth bound).
    Under the interpreter, fewer but larger programs are faster (numpy does the work per program)."""
    if _interpreting():
        return 16, 32, 32, 4
    if n_rows <= 16:
        return 16, 32, 64, 4
    if n_rows <= 32:
        return 32, 64, 64, 4
    return 64, 64, 32, 4


def _ew_blocks():
    """(BLOCK_R, BLOCK_C, num_warps) for pointwise kernels over [rows, H]."""
    if _interpreting():
        return 16, 64, 4
    return 8, 128, 4


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 1 - 2/(e^{2x}+1): saturates correctly at +-inf (exp overflow -> 1, underflow -> -1), no NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _gemm_gates(acc0, acc1, acc2, acc3,
                a_rows, rmask,
                w_ptr, stride_wn, stride_wk, gate_off, cols, cmask, K,
                NG: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """acc_g[b, j] += sum_{k<K} a_rows[b][k] * W[g * gate_off + cols[j] * stride_wn + k * stride_wk]  (g < NG <= 4).

    `a_rows` is a block of row pointers ([BB] pointer tensor), so callers can gather the A rows from different
    buffers (e.g. the previous step's output or h0, per row) with no copy. The A tile is loaded once per K block
    and reused by every gate. Masked rows/cols/k read zeros, so partial tiles are exact. Forward uses W[n, k]
    (stride_wn = ld, stride_wk = 1); backward uses W^T (stride_wn = 1, stride_wk = ld)."""
    ks = tl.arange(0, BK)
    w_base = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, K, BK):
        kk = k0 + ks
        kmask = kk < K
        a = tl.load(a_rows[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = cmask[None, :] & kmask[:, None]
        w_ptrs = w_base + kk.to(tl.int64)[:, None] * stride_wk
        if INTERP:
            # the interpreter's tl.dot is wrong on bf16 operands; compute in fp32 there only
            a = a.to(tl.float32)
        w0 = tl.load(w_ptrs, mask=wmask, other=0.0)
        if INTERP:
            w0 = w0.to(tl.float32)
        acc0 = tl.dot(a, w0, acc0, input_precision=PREC)
        if NG > 1:
            w1 = tl.load(w_ptrs + gate_off, mask=wmask, other=0.0)
            if INTERP:
                w1 = w1.to(tl.float32)
            acc1 = tl.dot(a, w1, acc1, input_precision=PREC)
        if NG > 2:
            w2 = tl.load(w_ptrs + 2 * gate_off, mask=wmask, other=0.0)
            if INTERP:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(a, w2, acc2, input_precision=PREC)
        if NG > 3:
            w3 = tl.load(w_ptrs + 3 * gate_off, mask=wmask, other=0.0)
            if INTERP:
                w3 = w3.to(tl.float32)
            acc3 = tl.dot(a, w3, acc3, input_precision=PREC)
    return acc0, acc1, acc2, acc3


@triton.jit
def _load_bias(acc, b_ptr, off, cols, cmask, HAS: tl.constexpr):
    if HAS:
        acc += tl.load(b_ptr + off + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


# ----------------------------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _lstm_cell_fwd_kernel(x_ptr, hx_ptr, cx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr,
                          hy_ptr, cy_ptr, gates_ptr,
                          B, I, H,
                          HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr,
                          BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                          INTERP: tl.constexpr, PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    cols = pid_h * BH + tl.arange(0, BH)
    rmask = rows < B
    cmask = cols < H
    acc_i = tl.zeros((BB, BH), tl.float32)
    acc_f = tl.zeros((BB, BH), tl.float32)
    acc_g = tl.zeros((BB, BH), tl.float32)
    acc_o = tl.zeros((BB, BH), tl.float32)
    acc_i, acc_f, acc_g, acc_o = _gemm_gates(acc_i, acc_f, acc_g, acc_o, x_ptr + rows * I, rmask,
                                             wih_ptr, I, 1, H * I, cols, cmask, I, 4, BK, INTERP, PREC)
    acc_i, acc_f, acc_g, acc_o = _gemm_gates(acc_i, acc_f, acc_g, acc_o, hx_ptr + rows * H, rmask,
                                             whh_ptr, H, 1, H * H, cols, cmask, H, 4, BK, INTERP, PREC)
    acc_i = _load_bias(_load_bias(acc_i, bih_ptr, 0, cols, cmask, HAS_BIH), bhh_ptr, 0, cols, cmask, HAS_BHH)
    acc_f = _load_bias(_load_bias(acc_f, bih_ptr, H, cols, cmask, HAS_BIH), bhh_ptr, H, cols, cmask, HAS_BHH)
    acc_g = _load_bias(_load_bias(acc_g, bih_ptr, 2 * H, cols, cmask, HAS_BIH), bhh_ptr, 2 * H, cols, cmask,
                       HAS_BHH)
    acc_o = _load_bias(_load_bias(acc_o, bih_ptr, 3 * H, cols, cmask, HAS_BIH), bhh_ptr, 3 * H, cols, cmask,
                       HAS_BHH)
    ig = _sigmoid(acc_i)
    fg = _sigmoid(acc_f)
    gg = _tanh(acc_g)
    og = _sigmoid(acc_o)
    m = rmask[:, None] & cmask[None, :]
    hoff = rows[:, None] * H + cols[None, :]
    c = tl.load(cx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    c_new = fg * c + ig * gg
    h_new = og * _tanh(c_new)
    ty = hy_ptr.dtype.element_ty
    tl.store(cy_ptr + hoff, c_new.to(ty), mask=m)
    tl.store(hy_ptr + hoff, h_new.to(ty), mask=m)
    goff = rows[:, None] * (4 * H) + cols[None, :]
    tl.store(gates_ptr + goff, ig.to(ty), mask=m)
    tl.store(gates_ptr + goff + H, fg.to(ty), mask=m)
    tl.store(gates_ptr + goff + 2 * H, gg.to(ty), mask=m)
    tl.store(gates_ptr + goff + 3 * H, og.to(ty), mask=m)


@triton.jit
def _gru_cell_fwd_kernel(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr,
                         hy_ptr, ws_ptr,
                         B, I, H,
                         HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr,
                         BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                         INTERP: tl.constexpr, PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    cols = pid_h * BH + tl.arange(0, BH)
    rmask = rows < B
    cmask = cols < H
    # r and z take x- and h-parts summed; n needs its h-part (hn) separately because r scales it.
    acc_r = tl.zeros((BB, BH), tl.float32)
    acc_z = tl.zeros((BB, BH), tl.float32)
    acc_in = tl.zeros((BB, BH), tl.float32)
    acc_hn = tl.zeros((BB, BH), tl.float32)
    acc_r, acc_z, acc_in, acc_hn = _gemm_gates(acc_r, acc_z, acc_in, acc_hn, x_ptr + rows * I, rmask,
                                               wih_ptr, I, 1, H * I, cols, cmask, I, 3, BK, INTERP, PREC)
    # second call: gate 2 of W_hh accumulates into acc_hn (passed in the third slot)
    acc_r, acc_z, acc_hn, acc_in = _gemm_gates(acc_r, acc_z, acc_hn, acc_in, hx_ptr + rows * H, rmask,
                                               whh_ptr, H, 1, H * H, cols, cmask, H, 3, BK, INTERP, PREC)
    acc_r = _load_bias(_load_bias(acc_r, bih_ptr, 0, cols, cmask, HAS_BIH), bhh_ptr, 0, cols, cmask, HAS_BHH)
    acc_z = _load_bias(_load_bias(acc_z, bih_ptr, H, cols, cmask, HAS_BIH), bhh_ptr, H, cols, cmask, HAS_BHH)
    acc_in = _load_bias(acc_in, bih_ptr, 2 * H, cols, cmask, HAS_BIH)
    acc_hn = _load_bias(acc_hn, bhh_ptr, 2 * H, cols, cmask, HAS_BHH)
    r = _sigmoid(acc_r)
    z = _sigmoid(acc_z)
    n = _tanh(acc_in + r * acc_hn)
    m = rmask[:, None] & cmask[None, :]
    hoff = rows[:, None] * H + cols[None, :]
    h = tl.load(hx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    h_new = (1.0 - z) * n + z * h
    ty = hy_ptr.dtype.element_ty
    tl.store(hy_ptr + hoff, h_new.to(ty), mask=m)
    woff = rows[:, None] * (4 * H) + cols[None, :]
    tl.store(ws_ptr + woff, r.to(ty), mask=m)
    tl.store(ws_ptr + woff + H, z.to(ty), mask=m)
    tl.store(ws_ptr + woff + 2 * H, n.to(ty), mask=m)
    tl.store(ws_ptr + woff + 3 * H, acc_hn.to(ty), mask=m)


@triton.jit
def _rnn_cell_fwd_kernel(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, hy_ptr,
                         B, I, H,
                         HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, RELU: tl.constexpr,
                         BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                         INTERP: tl.constexpr, PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    cols = pid_h * BH + tl.arange(0, BH)
    rmask = rows < B
    cmask = cols < H
    acc = tl.zeros((BB, BH), tl.float32)
    # NG=1: only the first accumulator is used; the other slots are passed through untouched
    acc, _u1, _u2, _u3 = _gemm_gates(acc, acc, acc, acc, x_ptr + rows * I, rmask,
                                     wih_ptr, I, 1, H * I, cols, cmask, I, 1, BK, INTERP, PREC)
    acc, _u1, _u2, _u3 = _gemm_gates(acc, acc, acc, acc, hx_ptr + rows * H, rmask,
                                     whh_ptr, H, 1, H * H, cols, cmask, H, 1, BK, INTERP, PREC)
    acc = _load_bias(_load_bias(acc, bih_ptr, 0, cols, cmask, HAS_BIH), bhh_ptr, 0, cols, cmask, HAS_BHH)
    if RELU:
        h_new = tl.maximum(acc, 0.0)
    else:
        h_new = _tanh(acc)
    m = rmask[:, None] & cmask[None, :]
    tl.store(hy_ptr + rows[:, None] * H + cols[None, :], h_new.to(hy_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# backward pointwise kernels (pre-activation gate gradients)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _lstm_cell_bwd_kernel(ghy_ptr, gcy_ptr, cx_ptr, gates_ptr, cy_ptr, dgates_ptr, dcx_ptr,
                          B, H, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    hoff = rows[:, None] * H + cols[None, :]
    goff = rows[:, None] * (4 * H) + cols[None, :]
    ig = tl.load(gates_ptr + goff, mask=m, other=0.0).to(tl.float32)
    fg = tl.load(gates_ptr + goff + H, mask=m, other=0.0).to(tl.float32)
    gg = tl.load(gates_ptr + goff + 2 * H, mask=m, other=0.0).to(tl.float32)
    og = tl.load(gates_ptr + goff + 3 * H, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(ghy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    dc = tl.load(gcy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    c = tl.load(cx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    tc = _tanh(tl.load(cy_ptr + hoff, mask=m, other=0.0).to(tl.float32))
    dc = dc + dh * og * (1.0 - tc * tc)
    ty = dgates_ptr.dtype.element_ty
    tl.store(dgates_ptr + goff, (dc * gg * ig * (1.0 - ig)).to(ty), mask=m)
    tl.store(dgates_ptr + goff + H, (dc * c * fg * (1.0 - fg)).to(ty), mask=m)
    tl.store(dgates_ptr + goff + 2 * H, (dc * ig * (1.0 - gg * gg)).to(ty), mask=m)
    tl.store(dgates_ptr + goff + 3 * H, (dh * tc * og * (1.0 - og)).to(ty), mask=m)
    tl.store(dcx_ptr + hoff, (dc * fg).to(dcx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gru_cell_bwd_kernel(ghy_ptr, hx_ptr, ws_ptr, dgi_ptr, dgh_ptr, dhd_ptr,
                         B, H, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    hoff = rows[:, None] * H + cols[None, :]
    woff = rows[:, None] * (4 * H) + cols[None, :]
    goff = rows[:, None] * (3 * H) + cols[None, :]
    r = tl.load(ws_ptr + woff, mask=m, other=0.0).to(tl.float32)
    z = tl.load(ws_ptr + woff + H, mask=m, other=0.0).to(tl.float32)
    n = tl.load(ws_ptr + woff + 2 * H, mask=m, other=0.0).to(tl.float32)
    hn = tl.load(ws_ptr + woff + 3 * H, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(ghy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    h = tl.load(hx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    ty = dgi_ptr.dtype.element_ty
    tl.store(dgi_ptr + goff, dr.to(ty), mask=m)
    tl.store(dgi_ptr + goff + H, dz.to(ty), mask=m)
    tl.store(dgi_ptr + goff + 2 * H, dn.to(ty), mask=m)
    tl.store(dgh_ptr + goff, dr.to(ty), mask=m)
    tl.store(dgh_ptr + goff + H, dz.to(ty), mask=m)
    tl.store(dgh_ptr + goff + 2 * H, (dn * r).to(ty), mask=m)
    tl.store(dhd_ptr + hoff, (dh * z).to(dhd_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rnn_cell_bwd_kernel(ghy_ptr, hy_ptr, dpre_ptr, B, H, RELU: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    hoff = rows[:, None] * H + cols[None, :]
    dh = tl.load(ghy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    y = tl.load(hy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    if RELU:
        d = tl.where(y > 0.0, dh, 0.0)
    else:
        d = dh * (1.0 - y * y)
    tl.store(dpre_ptr + hoff, d.to(dpre_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

def _bias_args(b_ih, b_hh, dummy):
    return (b_ih if b_ih is not None else dummy, b_hh if b_hh is not None else dummy,
            b_ih is not None, b_hh is not None)


def lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, allow_tf32: bool = False):
    """x[B,I], hx/cx[B,H], w_ih[4H,I], w_hh[4H,H], b_ih/b_hh[4H] or None -> (hy[B,H], cy[B,H], gates[B,4H]).

    gates = activated [i, f, g, o] (torch order), saved for lstm_cell_backward."""
    B, I = x.shape
    H = hx.shape[1]
    hy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    cy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    gates = torch.empty((B, 4 * H), device=x.device, dtype=x.dtype)
    if B == 0 or H == 0:
        return hy, cy, gates
    BB, BH, BK, nw = _gemm_blocks(B)
    bih, bhh, has_bih, has_bhh = _bias_args(b_ih, b_hh, w_hh)
    grid = (_cdiv(B, BB), _cdiv(H, BH))
    _lstm_cell_fwd_kernel[grid](x, hx, cx, w_ih, w_hh, bih, bhh, hy, cy, gates, B, I, H,
                                has_bih, has_bhh, BB, BH, BK, _interpreting(), _precision(x.dtype, allow_tf32),
                                num_warps=nw)
    return hy, cy, gates


def lstm_cell_backward(grad_hy, grad_cy, x, hx, cx, w_ih, w_hh, gates, cy):
    """-> (dx[B,I], dhx[B,H], dcx[B,H], dw_ih[4H,I], dw_hh[4H,H], db[4H]); db is the grad of b_ih and of b_hh."""
    B, I = x.shape
    H = hx.shape[1]
    dgates = torch.empty((B, 4 * H), device=x.device, dtype=x.dtype)
    dcx = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B > 0 and H > 0:
        BR, BC, nw = _ew_blocks()
        _lstm_cell_bwd_kernel[(_cdiv(B, BR), _cdiv(H, BC))](grad_hy, grad_cy, cx, gates, cy, dgates, dcx, B, H,
                                                             BR, BC, num_warps=nw)
    dx = torch.mm(dgates, w_ih)
    dhx = torch.mm(dgates, w_hh)
    dw_ih = torch.mm(dgates.t(), x)
    dw_hh = torch.mm(dgates.t(), hx)
    db = dgates.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dhx, dcx, dw_ih, dw_hh, db


def gru_cell_forward(x, hx, w_ih, w_hh, b_ih=None, b_hh=None, allow_tf32: bool = False):
    """x[B,I], hx[B,H], w_ih[3H,I], w_hh[3H,H] -> (hy[B,H], ws[B,4H]); ws = [r, z, n, hn], hn = W_hn h + b_hn."""
    B, I = x.shape
    H = hx.shape[1]
    hy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    ws = torch.empty((B, 4 * H), device=x.device, dtype=x.dtype)
    if B == 0 or H == 0:
        return hy, ws
    BB, BH, BK, nw = _gemm_blocks(B)
    bih, bhh, has_bih, has_bhh = _bias_args(b_ih, b_hh, w_hh)
    grid = (_cdiv(B, BB), _cdiv(H, BH))
    _gru_cell_fwd_kernel[grid](x, hx, w_ih, w_hh, bih, bhh, hy, ws, B, I, H,
                               has_bih, has_bhh, BB, BH, BK, _interpreting(), _precision(x.dtype, allow_tf32),
                               num_warps=nw)
    return hy, ws


def gru_cell_backward(grad_hy, x, hx, w_ih, w_hh, ws):
    """-> (dx[B,I], dhx[B,H], dw_ih[3H,I], dw_hh[3H,H], db_ih[3H], db_hh[3H])."""
    B, I = x.shape
    H = hx.shape[1]
    dgi = torch.empty((B, 3 * H), device=x.device, dtype=x.dtype)
    dgh = torch.empty((B, 3 * H), device=x.device, dtype=x.dtype)
    dhd = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B > 0 and H > 0:
        BR, BC, nw = _ew_blocks()
        _gru_cell_bwd_kernel[(_cdiv(B, BR), _cdiv(H, BC))](grad_hy, hx, ws, dgi, dgh, dhd, B, H, BR, BC,
                                                            num_warps=nw)
    dx = torch.mm(dgi, w_ih)
    dhx = torch.addmm(dhd, dgh, w_hh)
    dw_ih = torch.mm(dgi.t(), x)
    dw_hh = torch.mm(dgh.t(), hx)
    db_ih = dgi.sum(0, dtype=torch.float32).to(x.dtype)
    db_hh = dgh.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dhx, dw_ih, dw_hh, db_ih, db_hh


def rnn_cell_forward(x, hx, w_ih, w_hh, b_ih=None, b_hh=None, relu: bool = False, allow_tf32: bool = False):
    """x[B,I], hx[B,H], w_ih[H,I], w_hh[H,H] -> hy[B,H] = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh|relu."""
    B, I = x.shape
    H = hx.shape[1]
    hy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B == 0 or H == 0:
        return hy
    BB, BH, BK, nw = _gemm_blocks(B)
    bih, bhh, has_bih, has_bhh = _bias_args(b_ih, b_hh, w_hh)
    grid = (_cdiv(B, BB), _cdiv(H, BH))
    _rnn_cell_fwd_kernel[grid](x, hx, w_ih, w_hh, bih, bhh, hy, B, I, H, has_bih, has_bhh, bool(relu),
                               BB, BH, BK, _interpreting(), _precision(x.dtype, allow_tf32), num_warps=nw)
    return hy


def rnn_cell_backward(grad_hy, x, hx, w_ih, w_hh, hy, relu: bool = False):
    """-> (dx[B,I], dhx[B,H], dw_ih[H,I], dw_hh[H,H], db[H]); db is the grad of b_ih and of b_hh."""
    B, I = x.shape
    H = hx.shape[1]
    dpre = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B > 0 and H > 0:
        BR, BC, nw = _ew_blocks()
        _rnn_cell_bwd_kernel[(_cdiv(B, BR), _cdiv(H, BC))](grad_hy, hy, dpre, B, H, bool(relu), BR, BC,
                                                            num_warps=nw)
    dx = torch.mm(dpre, w_ih)
    dhx = torch.mm(dpre, w_hh)
    dw_ih = torch.mm(dpre.t(), x)
    dw_hh = torch.mm(dpre.t(), hx)
    db = dpre.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dhx, dw_ih, dw_hh, db
