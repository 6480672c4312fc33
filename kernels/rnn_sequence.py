"""Triton kernels for whole-sequence RNN/LSTM/GRU layers (one layer, one direction), forward and backward.

Input layout: time-major packed x[N, I]; step t owns rows [off_t, off_t + bs_t) (batch_sizes[T], int64 on the
CPU, non-increasing; padded input is bs_t = B for every t). At step t only rows b < bs_t are active; a row that
is inactive keeps its state. reverse=True walks t from T-1 down to 0 (row b starts from h0 at t = len_b - 1).

Plan:
  * The input projection of all steps is ONE GEMM (torch.addmm -> cuBLAS): gx[N, G*H] = x W_ih^T + b_ih.
  * The recurrence needs h_{t-1} @ W_hh^T fused with the gate math. No separate state buffer is kept: because
    batch_sizes is non-increasing, every active row of step t was active at its previous step too, so the
    previous state of row b is simply row b of the previous step's slice of `out` (or of h0 for a row's first
    step). The kernels pick that per row with a pointer select, and write hn/cn for a row at its last step.
    One kernel (_sequence_kernel: the time loop) runs every cell type and direction, with the step body as a
    compile-time argument (TILE), and serves two launch strategies (PERSISTENT constexpr):
      - per-step: one launch per time step, grid (batch tiles, hidden tiles). Good for large batch / hidden.
      - persistent: one launch for the whole sequence; grid = batch tiles only; each program owns ALL hidden
        units of its batch rows and loops over time inside the kernel, with a CTA barrier between steps.
    Either way the kernel reads its step's schedule itself: computed in-kernel for padded input (UNIFORM: every
    step has B rows, no host-built tensor at all, so the per-step launches can be captured in a CUDA graph), or
    from a small device table for packed input (built once per distinct batch_sizes, cached).
        Why this design: a step's hidden tiles all need the complete previous h of the same rows; if one
        program owns all of them, a __syncthreads (tl.debug_barrier) is enough to publish h (global writes of a
        CTA are visible to the CTA after bar.sync), so no grid-wide synchronisation, no co-residency
        assumption, no deadlock risk, and it is testable in the interpreter (which runs programs one after
        another, so a grid-wide spin barrier would hang there). W_hh is re-read each step, from L2 (it stays
        resident: <= 512 KB for H <= 256 in bf16), so the win is removing the per-step launch overhead, which
        dominates at small batch / hidden. It is picked automatically for H <= 256.
  * Backward walks time in reverse processing order, one fused launch per step (or persistent): the program
    computes dh for its tile as grad_out + (next step's gate grads) @ W_hh (tl.dot) + carried terms, then the
    gate-derivative math, and writes the pre-activation gate grads of the step. dx, dW_ih, dW_hh, db are then
    GEMMs over all steps at once (torch.mm), dh0 one more GEMM over each row's first step.

Workspaces (returned by the forward, consumed by the backward):
  LSTM: gates[N, 4H] activated [i, f, g, o] in the input dtype; cs[N, H] the cell state of every step in FLOAT32
        (keeps the c recurrence and its backward in fp32 even for fp16/bf16 inputs).
  GRU:  ws[N, 4H] = [r, z, n, hn] (hn = W_hn h + b_hn) in the input dtype.
  RNN:  none (the backward uses `out`).
"""
import functools

import torch
import triton
import triton.language as tl

from .common import (Launch, add_bias, cdiv, check_dtypes, dot_precision, gemm_gates, interpreting, load_gates,
                     on_device, rnn_tiles, sigmoid, store_gates, store_gru_gate_grads, store_lstm_gate_grads, tanh,
                     tile)

__all__ = [
    "lstm_layer_forward", "lstm_layer_backward",
    "gru_layer_forward", "gru_layer_backward",
    "rnn_layer_forward", "rnn_layer_backward",
    "sequence_launch", "use_persistent",
]


@triton.jit
def _step_schedule(sched_ptr, s, T, Bu, UNIFORM: tl.constexpr, REVERSE: tl.constexpr):
    """(off_t, bs_t, prev_off, n_prev, next_off, n_next) of processing step s (int64). UNIFORM: every step has Bu
    rows, computed here; otherwise read from the [T, 6] table of _Plan (those six values per step)."""
    if UNIFORM:
        if REVERSE:
            t = T - 1 - s
            d = -1
        else:
            t = s
            d = 1
        off_t = t.to(tl.int64) * Bu  # int64 whether or not Bu was specialised to a constant (Bu == 1)
        zero = off_t * 0
        bs_t = zero + Bu
        n_prev = tl.where(s > 0, bs_t, zero)
        prev_off = tl.where(s > 0, off_t - d * Bu, zero)
        n_next = tl.where(s < T - 1, bs_t, zero)
        next_off = tl.where(s < T - 1, off_t + d * Bu, zero)
    else:
        sp = sched_ptr + s * 6
        off_t = tl.load(sp)
        bs_t = tl.load(sp + 1)
        prev_off = tl.load(sp + 2)
        n_prev = tl.load(sp + 3)
        next_off = tl.load(sp + 4)
        n_next = tl.load(sp + 5)
    return off_t, bs_t, prev_off, n_prev, next_off, n_next


# ----------------------------------------------------------------------------------------------------------------
# step bodies (one tile of batch rows x hidden units of one time step), all with one signature: the pointer tuple,
# the step's schedule (_step_schedule), the tile's rows/columns/masks (common.tile), H and the kernel's flags.
#   prev = the step processed before this one (the state source), next = the step processed after it.
#   rows b < n_prev read their previous state from rows prev_off + b; other active rows start from h0/c0.
#   rows b >= n_next have no next step: this is their last step, so they write hn/cn (forward) or take
#   grad_hn/grad_cn (backward).
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _lstm_fwd_tile(ptrs, step, rows_cols, H,
                   HAS_BHH: tl.constexpr, RELU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                   INTERP: tl.constexpr, PREC: tl.constexpr):
    gx_ptr, whh_ptr, bhh_ptr, h0_ptr, c0_ptr, out_ptr, cs_ptr, gates_ptr, hn_ptr, cn_ptr = ptrs
    off_t, _bs_t, prev_off, n_prev, _next_off, n_next = step
    b, cols, rmask, cmask, m = rows_cols
    has_prev = b < n_prev
    h_rows = tl.where(has_prev, out_ptr + (prev_off + b) * H, h0_ptr + b * H)
    acc_i = tl.zeros((BB, BH), tl.float32)
    acc_f = tl.zeros((BB, BH), tl.float32)
    acc_g = tl.zeros((BB, BH), tl.float32)
    acc_o = tl.zeros((BB, BH), tl.float32)
    acc_i, acc_f, acc_g, acc_o = gemm_gates(acc_i, acc_f, acc_g, acc_o, h_rows, rmask,
                                             whh_ptr, H, 1, H * H, cols, cmask, H, 4, BK, INTERP, PREC)
    g_ptrs = gx_ptr + (off_t + b)[:, None] * (4 * H) + cols[None, :]
    acc_i += tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32)
    acc_f += tl.load(g_ptrs + H, mask=m, other=0.0).to(tl.float32)
    acc_g += tl.load(g_ptrs + 2 * H, mask=m, other=0.0).to(tl.float32)
    acc_o += tl.load(g_ptrs + 3 * H, mask=m, other=0.0).to(tl.float32)
    acc_i = add_bias(acc_i, bhh_ptr, 0, cols, cmask, HAS_BHH)
    acc_f = add_bias(acc_f, bhh_ptr, H, cols, cmask, HAS_BHH)
    acc_g = add_bias(acc_g, bhh_ptr, 2 * H, cols, cmask, HAS_BHH)
    acc_o = add_bias(acc_o, bhh_ptr, 3 * H, cols, cmask, HAS_BHH)
    ig = sigmoid(acc_i)
    fg = sigmoid(acc_f)
    gg = tanh(acc_g)
    og = sigmoid(acc_o)
    # previous cell state: fp32 cs of the previous step, or c0 (input dtype) -> two disjoint masked loads
    c = tl.load(cs_ptr + (prev_off + b)[:, None] * H + cols[None, :], mask=m & has_prev[:, None], other=0.0)
    c += tl.load(c0_ptr + b[:, None] * H + cols[None, :], mask=m & (~has_prev)[:, None], other=0.0).to(tl.float32)
    c_new = fg * c + ig * gg
    h_new = og * tanh(c_new)
    ty = out_ptr.dtype.element_ty
    o_off = (off_t + b)[:, None] * H + cols[None, :]
    tl.store(out_ptr + o_off, h_new.to(ty), mask=m)
    tl.store(cs_ptr + o_off, c_new, mask=m)
    store_gates(gates_ptr + (off_t + b)[:, None] * (4 * H) + cols[None, :], H, ig, fg, gg, og, m)
    last = m & (b >= n_next)[:, None]
    n_off = b[:, None] * H + cols[None, :]
    tl.store(hn_ptr + n_off, h_new.to(ty), mask=last)
    tl.store(cn_ptr + n_off, c_new.to(ty), mask=last)


@triton.jit
def _lstm_bwd_tile(ptrs, step, rows_cols, H,
                   HAS_BHH: tl.constexpr, RELU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                   INTERP: tl.constexpr, PREC: tl.constexpr):
    gout_ptr, ghn_ptr, dc_ptr, whh_ptr, gates_ptr, cs_ptr, c0_ptr, dg_ptr = ptrs
    off_t, _bs_t, prev_off, n_prev, next_off, n_next = step
    b, cols, rmask, cmask, m = rows_cols
    has_next = b < n_next
    # dh = grad_out_t + (rows with a next step: dgates_next @ W_hh ; rows at their last step: grad_hn)
    acc = tl.zeros((BB, BH), tl.float32)
    acc, _u1, _u2, _u3 = gemm_gates(acc, acc, acc, acc, dg_ptr + (next_off + b) * (4 * H), rmask & has_next,
                                     whh_ptr, 1, H, 0, cols, cmask, 4 * H, 1, BK, INTERP, PREC)
    h_off = b[:, None] * H + cols[None, :]
    o_off = (off_t + b)[:, None] * H + cols[None, :]
    dh = acc + tl.load(gout_ptr + o_off, mask=m, other=0.0).to(tl.float32)
    dh += tl.load(ghn_ptr + h_off, mask=m & (~has_next)[:, None], other=0.0).to(tl.float32)
    # dc carry (fp32 [B, H]): grad_cn until the row's last step, then dc * f of the step after
    dc = tl.load(dc_ptr + h_off, mask=m, other=0.0)
    ig, fg, gg, og = load_gates(gates_ptr + (off_t + b)[:, None] * (4 * H) + cols[None, :], H, m)
    tc = tanh(tl.load(cs_ptr + o_off, mask=m, other=0.0))
    has_prev = (b < n_prev)[:, None]
    c = tl.load(cs_ptr + (prev_off + b)[:, None] * H + cols[None, :], mask=m & has_prev, other=0.0)
    c += tl.load(c0_ptr + h_off, mask=m & (~has_prev), other=0.0).to(tl.float32)
    dc = store_lstm_gate_grads(dg_ptr + (off_t + b)[:, None] * (4 * H) + cols[None, :], H, dh, dc, c, ig, fg, gg, og,
                               tc, m)
    tl.store(dc_ptr + h_off, dc * fg, mask=m)


@triton.jit
def _gru_fwd_tile(ptrs, step, rows_cols, H,
                  HAS_BHH: tl.constexpr, RELU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                  INTERP: tl.constexpr, PREC: tl.constexpr):
    gx_ptr, whh_ptr, bhh_ptr, h0_ptr, out_ptr, ws_ptr, hn_ptr = ptrs
    off_t, _bs_t, prev_off, n_prev, _next_off, n_next = step
    b, cols, rmask, cmask, m = rows_cols
    h_rows = tl.where(b < n_prev, out_ptr + (prev_off + b) * H, h0_ptr + b * H)
    acc_r = tl.zeros((BB, BH), tl.float32)
    acc_z = tl.zeros((BB, BH), tl.float32)
    acc_hn = tl.zeros((BB, BH), tl.float32)
    acc_r, acc_z, acc_hn, _u = gemm_gates(acc_r, acc_z, acc_hn, acc_hn, h_rows, rmask,
                                           whh_ptr, H, 1, H * H, cols, cmask, H, 3, BK, INTERP, PREC)
    acc_r = add_bias(acc_r, bhh_ptr, 0, cols, cmask, HAS_BHH)
    acc_z = add_bias(acc_z, bhh_ptr, H, cols, cmask, HAS_BHH)
    acc_hn = add_bias(acc_hn, bhh_ptr, 2 * H, cols, cmask, HAS_BHH)
    g_ptrs = gx_ptr + (off_t + b)[:, None] * (3 * H) + cols[None, :]
    r = sigmoid(acc_r + tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32))
    z = sigmoid(acc_z + tl.load(g_ptrs + H, mask=m, other=0.0).to(tl.float32))
    n = tanh(tl.load(g_ptrs + 2 * H, mask=m, other=0.0).to(tl.float32) + r * acc_hn)
    h = tl.load(h_rows[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    h_new = (1.0 - z) * n + z * h
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + (off_t + b)[:, None] * H + cols[None, :], h_new.to(ty), mask=m)
    store_gates(ws_ptr + (off_t + b)[:, None] * (4 * H) + cols[None, :], H, r, z, n, acc_hn, m)
    tl.store(hn_ptr + b[:, None] * H + cols[None, :], h_new.to(ty), mask=m & (b >= n_next)[:, None])


@triton.jit
def _gru_bwd_tile(ptrs, step, rows_cols, H,
                  HAS_BHH: tl.constexpr, RELU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                  INTERP: tl.constexpr, PREC: tl.constexpr):
    gout_ptr, carry_ptr, whh_ptr, ws_ptr, out_ptr, h0_ptr, dgi_ptr, dgh_ptr = ptrs
    off_t, _bs_t, prev_off, n_prev, next_off, n_next = step
    b, cols, rmask, cmask, m = rows_cols
    # dh = grad_out_t + carry (grad_hn before the row's last step, then dh*z of the step after)
    #      + dgh_next @ W_hh (rows with a next step)
    acc = tl.zeros((BB, BH), tl.float32)
    acc, _u1, _u2, _u3 = gemm_gates(acc, acc, acc, acc, dgh_ptr + (next_off + b) * (3 * H), rmask & (b < n_next),
                                     whh_ptr, 1, H, 0, cols, cmask, 3 * H, 1, BK, INTERP, PREC)
    h_off = b[:, None] * H + cols[None, :]
    dh = acc + tl.load(gout_ptr + (off_t + b)[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
    dh += tl.load(carry_ptr + h_off, mask=m, other=0.0)
    r, z, n, hn = load_gates(ws_ptr + (off_t + b)[:, None] * (4 * H) + cols[None, :], H, m)
    h_rows = tl.where(b < n_prev, out_ptr + (prev_off + b) * H, h0_ptr + b * H)
    h = tl.load(h_rows[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    carry = store_gru_gate_grads(dgi_ptr, dgh_ptr, off_t + b, cols, H, dh, h, r, z, n, hn, m)
    tl.store(carry_ptr + h_off, carry, mask=m)


@triton.jit
def _rnn_fwd_tile(ptrs, step, rows_cols, H,
                  HAS_BHH: tl.constexpr, RELU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                  INTERP: tl.constexpr, PREC: tl.constexpr):
    gx_ptr, whh_ptr, bhh_ptr, h0_ptr, out_ptr, hn_ptr = ptrs
    off_t, _bs_t, prev_off, n_prev, _next_off, n_next = step
    b, cols, rmask, cmask, m = rows_cols
    h_rows = tl.where(b < n_prev, out_ptr + (prev_off + b) * H, h0_ptr + b * H)
    acc = tl.zeros((BB, BH), tl.float32)
    acc, _u1, _u2, _u3 = gemm_gates(acc, acc, acc, acc, h_rows, rmask,
                                     whh_ptr, H, 1, 0, cols, cmask, H, 1, BK, INTERP, PREC)
    acc = add_bias(acc, bhh_ptr, 0, cols, cmask, HAS_BHH)
    o_off = (off_t + b)[:, None] * H + cols[None, :]
    acc += tl.load(gx_ptr + o_off, mask=m, other=0.0).to(tl.float32)
    if RELU:
        h_new = tl.maximum(acc, 0.0)
    else:
        h_new = tanh(acc)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_off, h_new.to(ty), mask=m)
    tl.store(hn_ptr + b[:, None] * H + cols[None, :], h_new.to(ty), mask=m & (b >= n_next)[:, None])


@triton.jit
def _rnn_bwd_tile(ptrs, step, rows_cols, H,
                  HAS_BHH: tl.constexpr, RELU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                  INTERP: tl.constexpr, PREC: tl.constexpr):
    gout_ptr, ghn_ptr, whh_ptr, out_ptr, dp_ptr = ptrs
    off_t, _bs_t, _prev_off, _n_prev, next_off, n_next = step
    b, cols, rmask, cmask, m = rows_cols
    has_next = b < n_next
    acc = tl.zeros((BB, BH), tl.float32)
    acc, _u1, _u2, _u3 = gemm_gates(acc, acc, acc, acc, dp_ptr + (next_off + b) * H, rmask & has_next,
                                     whh_ptr, 1, H, 0, cols, cmask, H, 1, BK, INTERP, PREC)
    o_off = (off_t + b)[:, None] * H + cols[None, :]
    dh = acc + tl.load(gout_ptr + o_off, mask=m, other=0.0).to(tl.float32)
    dh += tl.load(ghn_ptr + b[:, None] * H + cols[None, :], mask=m & (~has_next)[:, None],
                  other=0.0).to(tl.float32)
    y = tl.load(out_ptr + o_off, mask=m, other=0.0).to(tl.float32)
    if RELU:
        d = tl.where(y > 0.0, dh, 0.0)
    else:
        d = dh * (1.0 - y * y)
    tl.store(dp_ptr + o_off, d.to(dp_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# the kernel: one time loop for every cell type and direction. TILE (a step body above, a compile-time constant) is
# inlined, so each (TILE, flags) pair compiles to its own specialised kernel, as six hand-written ones did. A program
# (pid_b[, pid_h]) walks n_steps processing steps from s0 (up in the forward, down in the BACKWARD pass).
# PERSISTENT: grid = batch tiles, every hidden tile looped here, a CTA barrier publishes each step's state before the
# next step reads it. Otherwise: grid = (batch tiles, hidden tiles), one step per launch.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["s0"])
def _sequence_kernel(ptrs, sched_ptr, s0, n_steps, T, Bu, H,
                     TILE: tl.constexpr, BACKWARD: tl.constexpr, HAS_BHH: tl.constexpr, RELU: tl.constexpr,
                     UNIFORM: tl.constexpr, REVERSE: tl.constexpr, PERSISTENT: tl.constexpr,
                     BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    for i in range(0, n_steps):
        if BACKWARD:
            s = s0 - i
        else:
            s = s0 + i
        step = _step_schedule(sched_ptr, s, T, Bu, UNIFORM, REVERSE)
        if pid_b * BB < step[1]:  # step[1] = bs_t: this batch tile has active rows at this step
            for pid_h in range(tl.program_id(1), _h_end(H, BH, PERSISTENT)):
                TILE(ptrs, step, tile(pid_b, pid_h, step[1], H, BB, BH), H, HAS_BHH, RELU, BB, BH, BK, INTERP, PREC)
        if PERSISTENT:
            tl.debug_barrier()


@triton.jit
def _h_end(H, BH: tl.constexpr, PERSISTENT: tl.constexpr):
    # persistent programs loop over every hidden tile; a per-step program does only its own (program_id(1))
    if PERSISTENT:
        return tl.cdiv(H, BH)
    else:
        return tl.program_id(1) + 1


# ----------------------------------------------------------------------------------------------------------------
# launch configuration (pure) and the host-side schedule
# ----------------------------------------------------------------------------------------------------------------

def use_persistent(persistent, H: int) -> bool:
    if persistent is None:
        # W_hh (<= 4*256*256*2 B = 512 KB) stays L2-resident; above that the per-step grid spreads the weight
        # reads over many SMs and wins.
        return H <= 256
    return bool(persistent)


def sequence_launch(B: int, H: int, n_gates: int, dtype: torch.dtype, *, persistent: bool, step_rows=None,
                    allow_tf32=None, block_m=None, interp=None) -> Launch:
    """The launch of a sequence kernel: B = rows of the first step, H hidden units, n_gates accumulators of the
    step's GEMM (4 LSTM forward, 3 GRU forward, 1 for RNN and every backward). Per-step launches cover step_rows
    rows (default B). The constexprs TILE / BACKWARD / UNIFORM / REVERSE and the cell's flags are added by the
    launcher."""
    interp = interpreting() if interp is None else interp
    t = rnn_tiles(B, n_gates, block_m, interp)
    rows = B if step_rows is None else step_rows
    grid = (cdiv(B, t.BB),) if persistent else (cdiv(rows, t.BB), cdiv(H, t.BH))
    return Launch(grid, dict(PERSISTENT=bool(persistent), BB=t.BB, BH=t.BH, BK=t.BK, INTERP=interp,
                             PREC=dot_precision(dtype, allow_tf32, "cudnn")), t.num_warps, 1)


class _Plan:
    """Per-sequence bookkeeping derived from batch_sizes (CPU). Padded input (every step B rows) needs nothing on
    the device; packed input gets its schedule table and gather indices built once per distinct batch_sizes."""

    def __init__(self, bs, reverse, device):
        self.bs = bs
        self.reverse = reverse
        self.T = len(bs)
        self.B = bs[0] if bs else 0
        self.N = sum(bs)
        self.uniform = all(n == self.B for n in bs)
        self.device = device
        offs = [0] * (self.T + 1)
        for t, n in enumerate(bs):
            offs[t + 1] = offs[t] + n
        order = range(self.T - 1, -1, -1) if reverse else range(self.T)
        steps = []
        for t in order:
            if not reverse:
                prev_off, n_prev = (offs[t - 1], bs[t]) if t > 0 else (0, 0)
                next_off, n_next = (offs[t + 1], bs[t + 1]) if t + 1 < self.T else (0, 0)
            else:
                prev_off, n_prev = (offs[t + 1], bs[t + 1]) if t + 1 < self.T else (0, 0)
                next_off, n_next = (offs[t - 1], bs[t]) if t > 0 else (0, 0)
            steps.append((offs[t], bs[t], prev_off, n_prev, next_off, n_next))
        self.steps = steps  # in forward-processing order
        self.sched = None
        self.prev = self.first = None
        if not self.uniform:
            flat = [v for st in steps for v in st]
            self.sched = torch.tensor(flat, dtype=torch.int64).to(device)
            self.prev, self.first = self._gather_indices(offs)

    def _gather_indices(self, offs):
        """prev[N]: index of each row's previous state in cat([out, h0]) (N + b for h0); first[B]: row index of
        each batch row's first processed step. Vectorised on the CPU, then moved over."""
        bs = torch.tensor(self.bs, dtype=torch.int64)
        offs = torch.tensor(offs, dtype=torch.int64)
        T, N = self.T, self.N
        t = torch.repeat_interleave(torch.arange(T), bs)
        rows = torch.arange(N)
        b = rows - offs[t]
        if not self.reverse:
            has_prev = t > 0
            prev = offs[(t - 1).clamp(min=0)] + b
        else:
            tn = (t + 1).clamp(max=T - 1)
            has_prev = (t < T - 1) & (b < bs[tn])
            prev = offs[tn] + b
        prev = torch.where(has_prev, prev, N + b)
        first = torch.zeros(self.B, dtype=torch.int64)
        first[b[~has_prev]] = rows[~has_prev]
        return prev.to(self.device), first.to(self.device)

    def prev_states(self, out, h0):
        """[N, H]: the state each row's step started from (the previous step's output, or h0)."""
        if self.uniform:
            B = self.B
            if self.reverse:
                return torch.cat([out[B:], h0], 0)
            return torch.cat([h0, out[:self.N - B]], 0)
        return torch.cat([out, h0], 0).index_select(0, self.prev)

    def first_rows(self, g):
        """Rows of g at each batch row's first processed step ([B, ...])."""
        if self.uniform:
            return g[self.N - self.B:] if self.reverse else g[:self.B]
        return g.index_select(0, self.first)

    def launches(self, tile, launch, tensors, H, backward):
        """Runs _sequence_kernel with the step body `tile` over the whole sequence: one persistent launch, or one
        launch per step. `tensors` is the tile's pointer tuple, in the order the tile unpacks it."""
        sched = self.sched if self.sched is not None else tensors[0]  # any pointer; UNIFORM never reads it
        consts = dict(launch.constexprs, TILE=tile, BACKWARD=backward, UNIFORM=self.uniform, REVERSE=self.reverse)
        if launch.constexprs["PERSISTENT"]:
            s0 = self.T - 1 if backward else 0
            Launch(launch.grid, consts, launch.num_warps, launch.num_stages).run(
                _sequence_kernel, tensors, sched, s0, self.T, self.T, self.B, H)
            return
        order = range(self.T - 1, -1, -1) if backward else range(self.T)
        bb = consts["BB"]
        for s in order:
            n = self.steps[s][1]
            if n == 0:
                continue
            grid = (cdiv(n, bb), launch.grid[1])
            Launch(grid, consts, launch.num_warps, launch.num_stages).run(
                _sequence_kernel, tensors, sched, s, 1, self.T, self.B, H)


@functools.lru_cache(maxsize=64)
def _cached_plan(bs, reverse, device):
    return _Plan(list(bs), reverse, device)


def _plan(batch_sizes, reverse, device):
    # batch_sizes lives on the CPU (PackedSequence's convention), so reading it costs no device sync
    return _cached_plan(tuple(batch_sizes.tolist()), bool(reverse), device)


def _input_proj(x, w_ih, b_ih):
    # one GEMM over all time steps (cuBLAS); b_ih folded in; b_hh is added inside the step kernel
    if b_ih is not None:
        return torch.addmm(b_ih, x, w_ih.t())
    return torch.mm(x, w_ih.t())


def _launch(B, H, n_gates, dt, persistent, allow_tf32, block_m, HAS_BHH=False, RELU=False):
    launch = sequence_launch(B, H, n_gates, dt, persistent=use_persistent(persistent, H), allow_tf32=allow_tf32,
                             block_m=block_m)
    # every tile takes both flags (one kernel signature); a tile ignores the ones its cell does not have
    launch.constexprs.update(HAS_BHH=HAS_BHH, RELU=RELU)
    return launch


# ----------------------------------------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------------------------------------

def lstm_layer_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False,
                       persistent=None, allow_tf32=None, *, block_m=None):
    """x[N,I] packed time-major, batch_sizes[T] (CPU int64), h0/c0[B,H], w_ih[4H,I], w_hh[4H,H], biases[4H]|None
    -> (out[N,H], hn[B,H], cn[B,H], gates[N,4H] (activated i,f,g,o; input dtype), cs[N,H] (float32)).
    persistent=None picks by H; allow_tf32=None follows torch.backends.cudnn.allow_tf32; block_m forces the batch
    tile."""
    check_dtypes(x.dtype, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    N, H, B = x.shape[0], h0.shape[1], h0.shape[0]
    dev, dt = x.device, x.dtype
    out = torch.empty((N, H), device=dev, dtype=dt)
    hn = torch.empty((B, H), device=dev, dtype=dt)
    cn = torch.empty((B, H), device=dev, dtype=dt)
    gates = torch.empty((N, 4 * H), device=dev, dtype=dt)
    cs = torch.empty((N, H), device=dev, dtype=torch.float32)
    if N == 0 or H == 0:
        return out, hn.copy_(h0), cn.copy_(c0), gates, cs
    plan = _plan(batch_sizes, reverse, dev)
    with on_device(x):
        gx = _input_proj(x, w_ih, b_ih)
        launch = _launch(B, H, 4, dt, persistent, allow_tf32, block_m, HAS_BHH=b_hh is not None)
        plan.launches(_lstm_fwd_tile, launch, (gx, w_hh, _or(b_hh, w_hh), h0, c0, out, cs, gates, hn, cn), H,
                      backward=False)
    return out, hn, cn, gates, cs


def lstm_layer_backward(grad_out, grad_hn, grad_cn, x, batch_sizes, h0, c0, w_ih, w_hh, out, gates, cs,
                        reverse=False, persistent=None, allow_tf32=None, *, block_m=None):
    """-> (dx[N,I], dh0[B,H], dc0[B,H], dw_ih[4H,I], dw_hh[4H,H], db[4H]); db is the grad of b_ih and b_hh."""
    N, H, B = x.shape[0], h0.shape[1], h0.shape[0]
    dev, dt = x.device, x.dtype
    dgates = torch.empty((N, 4 * H), device=dev, dtype=dt)
    dc = grad_cn.to(torch.float32, copy=True)  # carry: grad_cn -> dc*f of later steps -> dc0
    if N == 0:
        return (torch.zeros_like(x), grad_hn.clone(), dc.to(dt), torch.zeros_like(w_ih), torch.zeros_like(w_hh),
                torch.zeros(4 * H, device=dev, dtype=dt))
    plan = _plan(batch_sizes, reverse, dev)
    with on_device(x):
        if H > 0:
            launch = _launch(B, H, 1, dt, persistent, allow_tf32, block_m)
            plan.launches(_lstm_bwd_tile, launch, (grad_out, grad_hn, dc, w_hh, gates, cs, c0, dgates), H,
                          backward=True)
        dh0 = torch.mm(plan.first_rows(dgates), w_hh)
        dx = torch.mm(dgates, w_ih)
        dw_ih = torch.mm(dgates.t(), x)
        dw_hh = torch.mm(dgates.t(), plan.prev_states(out, h0))
        db = dgates.sum(0, dtype=torch.float32).to(dt)
    return dx, dh0, dc.to(dt), dw_ih, dw_hh, db


# ----------------------------------------------------------------------------------------------------------------
# GRU
# ----------------------------------------------------------------------------------------------------------------

def gru_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False,
                      persistent=None, allow_tf32=None, *, block_m=None):
    """x[N,I], batch_sizes[T], h0[B,H], w_ih[3H,I], w_hh[3H,H] -> (out[N,H], hn[B,H], ws[N,4H] = [r,z,n,hn])."""
    check_dtypes(x.dtype, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    N, H, B = x.shape[0], h0.shape[1], h0.shape[0]
    dev, dt = x.device, x.dtype
    out = torch.empty((N, H), device=dev, dtype=dt)
    hn = torch.empty((B, H), device=dev, dtype=dt)
    ws = torch.empty((N, 4 * H), device=dev, dtype=dt)
    if N == 0 or H == 0:
        return out, hn.copy_(h0), ws
    plan = _plan(batch_sizes, reverse, dev)
    with on_device(x):
        gx = _input_proj(x, w_ih, b_ih)
        launch = _launch(B, H, 3, dt, persistent, allow_tf32, block_m, HAS_BHH=b_hh is not None)
        plan.launches(_gru_fwd_tile, launch, (gx, w_hh, _or(b_hh, w_hh), h0, out, ws, hn), H, backward=False)
    return out, hn, ws


def gru_layer_backward(grad_out, grad_hn, x, batch_sizes, h0, w_ih, w_hh, out, ws, reverse=False,
                       persistent=None, allow_tf32=None, *, block_m=None):
    """-> (dx[N,I], dh0[B,H], dw_ih[3H,I], dw_hh[3H,H], db_ih[3H], db_hh[3H])."""
    N, H, B = x.shape[0], h0.shape[1], h0.shape[0]
    dev, dt = x.device, x.dtype
    dgi = torch.empty((N, 3 * H), device=dev, dtype=dt)
    dgh = torch.empty((N, 3 * H), device=dev, dtype=dt)
    carry = grad_hn.to(torch.float32, copy=True)  # grad_hn -> dh*z of later steps (direct path)
    if N == 0:
        z = torch.zeros(3 * H, device=dev, dtype=dt)
        return torch.zeros_like(x), grad_hn.clone(), torch.zeros_like(w_ih), torch.zeros_like(w_hh), z, z.clone()
    plan = _plan(batch_sizes, reverse, dev)
    with on_device(x):
        if H > 0:
            launch = _launch(B, H, 1, dt, persistent, allow_tf32, block_m)
            plan.launches(_gru_bwd_tile, launch, (grad_out, carry, w_hh, ws, out, h0, dgi, dgh), H, backward=True)
        dh0 = torch.addmm(carry.to(dt), plan.first_rows(dgh), w_hh)
        dx = torch.mm(dgi, w_ih)
        dw_ih = torch.mm(dgi.t(), x)
        dw_hh = torch.mm(dgh.t(), plan.prev_states(out, h0))
        db_ih = dgi.sum(0, dtype=torch.float32).to(dt)
        db_hh = dgh.sum(0, dtype=torch.float32).to(dt)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


# ----------------------------------------------------------------------------------------------------------------
# Elman RNN (tanh / relu)
# ----------------------------------------------------------------------------------------------------------------

def rnn_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, relu=False, reverse=False,
                      persistent=None, allow_tf32=None, *, block_m=None):
    """x[N,I], batch_sizes[T], h0[B,H], w_ih[H,I], w_hh[H,H] -> (out[N,H], hn[B,H])."""
    check_dtypes(x.dtype, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    N, H, B = x.shape[0], h0.shape[1], h0.shape[0]
    dev, dt = x.device, x.dtype
    out = torch.empty((N, H), device=dev, dtype=dt)
    hn = torch.empty((B, H), device=dev, dtype=dt)
    if N == 0 or H == 0:
        return out, hn.copy_(h0)
    plan = _plan(batch_sizes, reverse, dev)
    with on_device(x):
        gx = _input_proj(x, w_ih, b_ih)
        launch = _launch(B, H, 1, dt, persistent, allow_tf32, block_m, HAS_BHH=b_hh is not None, RELU=bool(relu))
        plan.launches(_rnn_fwd_tile, launch, (gx, w_hh, _or(b_hh, w_hh), h0, out, hn), H, backward=False)
    return out, hn


def rnn_layer_backward(grad_out, grad_hn, x, batch_sizes, h0, w_ih, w_hh, out, relu=False, reverse=False,
                       persistent=None, allow_tf32=None, *, block_m=None):
    """-> (dx[N,I], dh0[B,H], dw_ih[H,I], dw_hh[H,H], db[H]); db is the grad of b_ih and of b_hh."""
    N, H, B = x.shape[0], h0.shape[1], h0.shape[0]
    dev, dt = x.device, x.dtype
    dpre = torch.empty((N, H), device=dev, dtype=dt)
    if N == 0:
        return (torch.zeros_like(x), grad_hn.clone(), torch.zeros_like(w_ih), torch.zeros_like(w_hh),
                torch.zeros(H, device=dev, dtype=dt))
    plan = _plan(batch_sizes, reverse, dev)
    with on_device(x):
        if H > 0:
            launch = _launch(B, H, 1, dt, persistent, allow_tf32, block_m, RELU=bool(relu))
            plan.launches(_rnn_bwd_tile, launch, (grad_out, grad_hn, w_hh, out, dpre), H, backward=True)
        dh0 = torch.mm(plan.first_rows(dpre), w_hh)
        dx = torch.mm(dpre, w_ih)
        dw_ih = torch.mm(dpre.t(), x)
        dw_hh = torch.mm(dpre.t(), plan.prev_states(out, h0))
        db = dpre.sum(0, dtype=torch.float32).to(dt)
    return dx, dh0, dw_ih, dw_hh, db


def _or(t, dummy):
    # an absent bias is passed as any valid pointer; HAS_BHH keeps the kernel from reading it
    return t if t is not None else dummy
