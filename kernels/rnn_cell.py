"""Triton kernels for single RNN/LSTM/GRU cell steps (forward and backward).

Forward: ONE launch per cell step. Each program owns a tile of batch rows x hidden units and accumulates every
gate's pre-activation for that tile (x @ W_ih^T and h @ W_hh^T as tl.dot over K blocks, fp32 accumulators), then
adds the biases, applies the activations and updates the state in the epilogue. The gate layout is torch's
([i, f, g, o] for LSTM, [r, z, n] for GRU), so torch state_dicts load unchanged.

Backward: one fused pointwise kernel turns the incoming gradients into pre-activation gate gradients (plus the
direct state gradient), then the weight/input gradients are plain GEMMs (cuBLAS via torch.mm), which are already
at the hardware roofline and need no fusion.

Conventions: the caller validates shapes and makes inputs contiguous, on one device; the forward launchers check
that every tensor has x's dtype (float32, float16, bfloat16) and raise torch's RuntimeError otherwise. Optional
biases may be None. Outputs are in the input dtype; all math accumulates in fp32. float32 dots use TF32 when
torch.backends.cudnn.allow_tf32 is set (allow_tf32=None) and are exact otherwise.
"""
import torch
import triton
import triton.language as tl

from .common import (Launch, add_bias, cdiv, check_dtypes, dot_precision, gemm_gates, interpreting, load_gates,
                     on_device, rnn_tiles, sigmoid, store_gates, store_gru_gate_grads, store_lstm_gate_grads, tanh,
                     tile)

__all__ = [
    "lstm_cell_forward", "lstm_cell_backward",
    "gru_cell_forward", "gru_cell_backward",
    "rnn_cell_forward", "rnn_cell_backward",
]


# ----------------------------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _gate_preacts(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, rows, cols, rmask, cmask, I, H,
                  NG: tl.constexpr, SPLIT_N: tl.constexpr, HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr,
                  BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """The fp32 pre-activations of a tile's NG gates: x W_ih^T + b_ih + h W_hh^T + b_hh, gate k in accumulator k.
    SPLIT_N (GRU, NG = 3): the n gate's input and hidden parts stay apart, because r scales only the hidden one:
    accumulator 2 holds x W_in^T + b_in, accumulator 3 holds h W_hn^T + b_hn."""
    acc0 = tl.zeros((BB, BH), tl.float32)
    acc1 = tl.zeros((BB, BH), tl.float32)
    acc2 = tl.zeros((BB, BH), tl.float32)
    acc3 = tl.zeros((BB, BH), tl.float32)
    acc0, acc1, acc2, acc3 = gemm_gates(acc0, acc1, acc2, acc3, x_ptr + rows * I, rmask,
                                        wih_ptr, I, 1, H * I, cols, cmask, I, NG, BK, INTERP, PREC)
    if SPLIT_N:
        # gate 2 of W_hh accumulates into accumulator 3 (passed in the third slot)
        acc0, acc1, acc3, acc2 = gemm_gates(acc0, acc1, acc3, acc2, hx_ptr + rows * H, rmask,
                                            whh_ptr, H, 1, H * H, cols, cmask, H, NG, BK, INTERP, PREC)
    else:
        acc0, acc1, acc2, acc3 = gemm_gates(acc0, acc1, acc2, acc3, hx_ptr + rows * H, rmask,
                                            whh_ptr, H, 1, H * H, cols, cmask, H, NG, BK, INTERP, PREC)
    acc0 = add_bias(add_bias(acc0, bih_ptr, 0, cols, cmask, HAS_BIH), bhh_ptr, 0, cols, cmask, HAS_BHH)
    if NG > 1:
        acc1 = add_bias(add_bias(acc1, bih_ptr, H, cols, cmask, HAS_BIH), bhh_ptr, H, cols, cmask, HAS_BHH)
    if SPLIT_N:
        acc2 = add_bias(acc2, bih_ptr, 2 * H, cols, cmask, HAS_BIH)
        acc3 = add_bias(acc3, bhh_ptr, 2 * H, cols, cmask, HAS_BHH)
    elif NG > 2:
        acc2 = add_bias(add_bias(acc2, bih_ptr, 2 * H, cols, cmask, HAS_BIH), bhh_ptr, 2 * H, cols, cmask, HAS_BHH)
        acc3 = add_bias(add_bias(acc3, bih_ptr, 3 * H, cols, cmask, HAS_BIH), bhh_ptr, 3 * H, cols, cmask, HAS_BHH)
    return acc0, acc1, acc2, acc3


@triton.jit
def _lstm_cell_fwd_kernel(x_ptr, hx_ptr, cx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr,
                          hy_ptr, cy_ptr, gates_ptr,
                          B, I, H,
                          HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr,
                          BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                          INTERP: tl.constexpr, PREC: tl.constexpr):
    rows, cols, rmask, cmask, m = tile(tl.program_id(0), tl.program_id(1), B, H, BB, BH)
    acc_i, acc_f, acc_g, acc_o = _gate_preacts(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, rows, cols,
                                               rmask, cmask, I, H, 4, False, HAS_BIH, HAS_BHH, BB, BH, BK, INTERP,
                                               PREC)
    ig = sigmoid(acc_i)
    fg = sigmoid(acc_f)
    gg = tanh(acc_g)
    og = sigmoid(acc_o)
    hoff = rows[:, None] * H + cols[None, :]
    c = tl.load(cx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    c_new = fg * c + ig * gg
    h_new = og * tanh(c_new)
    ty = hy_ptr.dtype.element_ty
    tl.store(cy_ptr + hoff, c_new.to(ty), mask=m)
    tl.store(hy_ptr + hoff, h_new.to(ty), mask=m)
    goff = rows[:, None] * (4 * H) + cols[None, :]
    store_gates(gates_ptr + goff, H, ig, fg, gg, og, m)


@triton.jit
def _gru_cell_fwd_kernel(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr,
                         hy_ptr, ws_ptr,
                         B, I, H,
                         HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr,
                         BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                         INTERP: tl.constexpr, PREC: tl.constexpr):
    rows, cols, rmask, cmask, m = tile(tl.program_id(0), tl.program_id(1), B, H, BB, BH)
    # r and z take x- and h-parts summed; n needs its h-part (hn) separately because r scales it.
    acc_r, acc_z, acc_in, acc_hn = _gate_preacts(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, rows, cols,
                                                 rmask, cmask, I, H, 3, True, HAS_BIH, HAS_BHH, BB, BH, BK, INTERP,
                                                 PREC)
    r = sigmoid(acc_r)
    z = sigmoid(acc_z)
    n = tanh(acc_in + r * acc_hn)
    hoff = rows[:, None] * H + cols[None, :]
    h = tl.load(hx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    h_new = (1.0 - z) * n + z * h
    ty = hy_ptr.dtype.element_ty
    tl.store(hy_ptr + hoff, h_new.to(ty), mask=m)
    woff = rows[:, None] * (4 * H) + cols[None, :]
    store_gates(ws_ptr + woff, H, r, z, n, acc_hn, m)


@triton.jit
def _rnn_cell_fwd_kernel(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, hy_ptr,
                         B, I, H,
                         HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, RELU: tl.constexpr,
                         BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                         INTERP: tl.constexpr, PREC: tl.constexpr):
    rows, cols, rmask, cmask, m = tile(tl.program_id(0), tl.program_id(1), B, H, BB, BH)
    # NG=1: only the first accumulator is used (the compiler drops the others)
    acc, _u1, _u2, _u3 = _gate_preacts(x_ptr, hx_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, rows, cols, rmask, cmask,
                                       I, H, 1, False, HAS_BIH, HAS_BHH, BB, BH, BK, INTERP, PREC)
    if RELU:
        h_new = tl.maximum(acc, 0.0)
    else:
        h_new = tanh(acc)
    tl.store(hy_ptr + rows[:, None] * H + cols[None, :], h_new.to(hy_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# backward pointwise kernels (pre-activation gate gradients)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _lstm_cell_bwd_kernel(ghy_ptr, gcy_ptr, cx_ptr, gates_ptr, cy_ptr, dgates_ptr, dcx_ptr,
                          B, H, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, _rmask, _cmask, m = tile(tl.program_id(0), tl.program_id(1), B, H, BR, BC)
    hoff = rows[:, None] * H + cols[None, :]
    goff = rows[:, None] * (4 * H) + cols[None, :]
    ig, fg, gg, og = load_gates(gates_ptr + goff, H, m)
    dh = tl.load(ghy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    dc = tl.load(gcy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    c = tl.load(cx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    tc = tanh(tl.load(cy_ptr + hoff, mask=m, other=0.0).to(tl.float32))
    dc = store_lstm_gate_grads(dgates_ptr + goff, H, dh, dc, c, ig, fg, gg, og, tc, m)
    tl.store(dcx_ptr + hoff, (dc * fg).to(dcx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gru_cell_bwd_kernel(ghy_ptr, hx_ptr, ws_ptr, dgi_ptr, dgh_ptr, dhd_ptr,
                         B, H, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, _rmask, _cmask, m = tile(tl.program_id(0), tl.program_id(1), B, H, BR, BC)
    hoff = rows[:, None] * H + cols[None, :]
    r, z, n, hn = load_gates(ws_ptr + rows[:, None] * (4 * H) + cols[None, :], H, m)
    dh = tl.load(ghy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    h = tl.load(hx_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    dhd = store_gru_gate_grads(dgi_ptr, dgh_ptr, rows, cols, H, dh, h, r, z, n, hn, m)
    tl.store(dhd_ptr + hoff, dhd.to(dhd_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rnn_cell_bwd_kernel(ghy_ptr, hy_ptr, dpre_ptr, B, H, RELU: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, _rmask, _cmask, m = tile(tl.program_id(0), tl.program_id(1), B, H, BR, BC)
    hoff = rows[:, None] * H + cols[None, :]
    dh = tl.load(ghy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    y = tl.load(hy_ptr + hoff, mask=m, other=0.0).to(tl.float32)
    if RELU:
        d = tl.where(y > 0.0, dh, 0.0)
    else:
        d = dh * (1.0 - y * y)
    tl.store(dpre_ptr + hoff, d.to(dpre_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# launch configurations (pure functions of the shapes: tests/kernels/test_compile_sm90.py compiles what they pick)
# ----------------------------------------------------------------------------------------------------------------

def cell_forward_launch(B: int, H: int, n_gates: int, dtype: torch.dtype, *, has_bih=True, has_bhh=True,
                        allow_tf32=None, block_m=None, interp=None) -> Launch:
    """The forward launch for a cell step of B rows, H hidden units and n_gates gates (4 LSTM, 3 GRU, 1 RNN)."""
    interp = interpreting() if interp is None else interp
    t = rnn_tiles(B, n_gates, block_m, interp)
    return Launch((cdiv(B, t.BB), cdiv(H, t.BH)),
                  dict(HAS_BIH=has_bih, HAS_BHH=has_bhh, BB=t.BB, BH=t.BH, BK=t.BK, INTERP=interp,
                       PREC=dot_precision(dtype, allow_tf32, "cudnn")),
                  t.num_warps, 2)


def pointwise_launch(B: int, H: int, interp=None) -> Launch:
    """The backward's pointwise gate-derivative kernels over [B, H]."""
    interp = interpreting() if interp is None else interp
    br, bc = (16, 64) if interp else (8, 128)
    return Launch((cdiv(B, br), cdiv(H, bc)), dict(BR=br, BC=bc), 4, 1)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

def _forward_checks(x, hx, w_ih, w_hh, b_ih, b_hh, cx=None):
    check_dtypes(x.dtype, hx=hx, cx=cx, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)


def lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, allow_tf32=None, *, block_m=None):
    """x[B,I], hx/cx[B,H], w_ih[4H,I], w_hh[4H,H], b_ih/b_hh[4H] or None -> (hy[B,H], cy[B,H], gates[B,4H]).

    gates = activated [i, f, g, o] (torch order), saved for lstm_cell_backward. allow_tf32=None follows
    torch.backends.cudnn.allow_tf32 for float32; block_m forces the batch tile."""
    _forward_checks(x, hx, w_ih, w_hh, b_ih, b_hh, cx)
    B, I = x.shape
    H = hx.shape[1]
    hy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    cy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    gates = torch.empty((B, 4 * H), device=x.device, dtype=x.dtype)
    if B == 0 or H == 0:
        return hy, cy, gates
    launch = cell_forward_launch(B, H, 4, x.dtype, has_bih=b_ih is not None, has_bhh=b_hh is not None,
                                 allow_tf32=allow_tf32, block_m=block_m)
    with on_device(x):
        launch.run(_lstm_cell_fwd_kernel, x, hx, cx, w_ih, w_hh, _or(b_ih, w_hh), _or(b_hh, w_hh), hy, cy, gates,
                   B, I, H)
    return hy, cy, gates


def lstm_cell_backward(grad_hy, grad_cy, x, hx, cx, w_ih, w_hh, gates, cy):
    """-> (dx[B,I], dhx[B,H], dcx[B,H], dw_ih[4H,I], dw_hh[4H,H], db[4H]); db is the grad of b_ih and of b_hh."""
    B, I = x.shape
    H = hx.shape[1]
    dgates = torch.empty((B, 4 * H), device=x.device, dtype=x.dtype)
    dcx = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B > 0 and H > 0:
        with on_device(x):
            pointwise_launch(B, H).run(_lstm_cell_bwd_kernel, grad_hy, grad_cy, cx, gates, cy, dgates, dcx, B, H)
    dx = torch.mm(dgates, w_ih)
    dhx = torch.mm(dgates, w_hh)
    dw_ih = torch.mm(dgates.t(), x)
    dw_hh = torch.mm(dgates.t(), hx)
    db = dgates.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dhx, dcx, dw_ih, dw_hh, db


def gru_cell_forward(x, hx, w_ih, w_hh, b_ih=None, b_hh=None, allow_tf32=None, *, block_m=None):
    """x[B,I], hx[B,H], w_ih[3H,I], w_hh[3H,H] -> (hy[B,H], ws[B,4H]); ws = [r, z, n, hn], hn = W_hn h + b_hn."""
    _forward_checks(x, hx, w_ih, w_hh, b_ih, b_hh)
    B, I = x.shape
    H = hx.shape[1]
    hy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    ws = torch.empty((B, 4 * H), device=x.device, dtype=x.dtype)
    if B == 0 or H == 0:
        return hy, ws
    launch = cell_forward_launch(B, H, 4, x.dtype, has_bih=b_ih is not None, has_bhh=b_hh is not None,
                                 allow_tf32=allow_tf32, block_m=block_m)
    with on_device(x):
        launch.run(_gru_cell_fwd_kernel, x, hx, w_ih, w_hh, _or(b_ih, w_hh), _or(b_hh, w_hh), hy, ws, B, I, H)
    return hy, ws


def gru_cell_backward(grad_hy, x, hx, w_ih, w_hh, ws):
    """-> (dx[B,I], dhx[B,H], dw_ih[3H,I], dw_hh[3H,H], db_ih[3H], db_hh[3H])."""
    B, I = x.shape
    H = hx.shape[1]
    dgi = torch.empty((B, 3 * H), device=x.device, dtype=x.dtype)
    dgh = torch.empty((B, 3 * H), device=x.device, dtype=x.dtype)
    dhd = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B > 0 and H > 0:
        with on_device(x):
            pointwise_launch(B, H).run(_gru_cell_bwd_kernel, grad_hy, hx, ws, dgi, dgh, dhd, B, H)
    dx = torch.mm(dgi, w_ih)
    dhx = torch.addmm(dhd, dgh, w_hh)
    dw_ih = torch.mm(dgi.t(), x)
    dw_hh = torch.mm(dgh.t(), hx)
    db_ih = dgi.sum(0, dtype=torch.float32).to(x.dtype)
    db_hh = dgh.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dhx, dw_ih, dw_hh, db_ih, db_hh


def rnn_cell_forward(x, hx, w_ih, w_hh, b_ih=None, b_hh=None, relu: bool = False, allow_tf32=None, *,
                     block_m=None):
    """x[B,I], hx[B,H], w_ih[H,I], w_hh[H,H] -> hy[B,H] = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh|relu."""
    _forward_checks(x, hx, w_ih, w_hh, b_ih, b_hh)
    B, I = x.shape
    H = hx.shape[1]
    hy = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B == 0 or H == 0:
        return hy
    launch = cell_forward_launch(B, H, 1, x.dtype, has_bih=b_ih is not None, has_bhh=b_hh is not None,
                                 allow_tf32=allow_tf32, block_m=block_m)
    launch.constexprs["RELU"] = bool(relu)
    with on_device(x):
        launch.run(_rnn_cell_fwd_kernel, x, hx, w_ih, w_hh, _or(b_ih, w_hh), _or(b_hh, w_hh), hy, B, I, H)
    return hy


def rnn_cell_backward(grad_hy, x, hx, w_ih, w_hh, hy, relu: bool = False):
    """-> (dx[B,I], dhx[B,H], dw_ih[H,I], dw_hh[H,H], db[H]); db is the grad of b_ih and of b_hh."""
    B, I = x.shape
    H = hx.shape[1]
    dpre = torch.empty((B, H), device=x.device, dtype=x.dtype)
    if B > 0 and H > 0:
        launch = pointwise_launch(B, H)
        launch.constexprs["RELU"] = bool(relu)
        with on_device(x):
            launch.run(_rnn_cell_bwd_kernel, grad_hy, hy, dpre, B, H)
    dx = torch.mm(dpre, w_ih)
    dhx = torch.mm(dpre, w_hh)
    dw_ih = torch.mm(dpre.t(), x)
    dw_hh = torch.mm(dpre.t(), hx)
    db = dpre.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dhx, dw_ih, dw_hh, db


def _or(t, dummy):
    # an absent bias is passed as any valid pointer; HAS_BIH/HAS_BHH keep the kernel from reading it
    return t if t is not None else dummy
