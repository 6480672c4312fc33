"""What every Triton kernel family shares: the jit math helpers, the gate GEMM, the RNN gate workspace and gate
derivatives (cells and sequences), and the launch plumbing (interpreter detection, dot precision from torch's TF32
flags, dtype checks, the device guard, CUDA's grid limits).

Public names only: kernel files import from here, never private helpers from each other.
"""
import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# CUDA launch limits: grid x < 2^31, y and z <= 65535.
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_YZ = 65535


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (read at call time: the test suite sets it before importing triton)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dot_precision(dtype: torch.dtype, allow_tf32, flag: str) -> str:
    """input_precision for tl.dot. Only float32 operands have a choice: "tf32" runs on tensor cores, "ieee" is exact
    fp32 (FMA units). allow_tf32=None follows torch: flag "cudnn" reads torch.backends.cudnn.allow_tf32 (what cuDNN's
    RNNs use), flag "matmul" reads torch.backends.cuda.matmul.allow_tf32 (what torch's attention matmuls use)."""
    if dtype == torch.float64:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"  # ignored by the fp16/bf16 MMA lowering
    if allow_tf32 is None:
        allow_tf32 = (torch.backends.cudnn.allow_tf32 if flag == "cudnn"
                      else torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if allow_tf32 else "ieee"


def check_dtypes(expected: torch.dtype, **tensors):
    """RuntimeError (torch's type for mixed dtypes) naming the first tensor whose dtype is not `expected`; None
    entries are skipped. Without this a mixed-dtype call fails inside Triton's compiler on GPU."""
    for name, t in tensors.items():
        if t is not None and t.dtype != expected:
            raise RuntimeError(f"expected {name} to have dtype {expected}, but got {t.dtype}")


def on_device(t: torch.Tensor):
    """Launch guard: Triton launches on the current CUDA device and its current stream, so make the tensors' device
    current (its current stream comes with it)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class Launch(NamedTuple):
    """One kernel launch as a launcher chose it: the grid, the compile-time constants and the compile options."""
    grid: tuple
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2

    def run(self, kernel, *args):
        check_grid(self.grid)
        if interpreting():
            kernel[self.grid](*args, **self.constexprs)
        else:
            kernel[self.grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def check_grid(grid):
    if grid[0] > MAX_GRID_X or any(g > MAX_GRID_YZ for g in grid[1:]):
        raise RuntimeError(f"launch grid {tuple(grid)} exceeds CUDA's limits (x < 2^31, y and z <= 65535)")


# ----------------------------------------------------------------------------------------------------------------
# jit math
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: never overflows, exact limits at +-inf, NaN stays NaN.
    # (libdevice tanh does not run under the interpreter.)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def gemm_gates(acc0, acc1, acc2, acc3,
               a_rows, rmask,
               w_ptr, stride_wn, stride_wk, gate_off, cols, cmask, K,
               NG: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """acc_g[b, j] += sum_{k<K} a_rows[b][k] * W[g * gate_off + cols[j] * stride_wn + k * stride_wk]  (g < NG <= 4).

    `a_rows` is a block of row pointers ([BB] pointer tensor), so callers gather the A rows from different buffers
    (the previous step's output or h0, per row) with no copy. The A tile is loaded once per K block and reused by
    every gate. Masked rows/cols/k read zeros, so partial tiles are exact. Forward uses W[n, k] (stride_wn = ld,
    stride_wk = 1); backward uses W^T (stride_wn = 1, stride_wk = ld)."""
    ks = tl.arange(0, BK)
    w_base = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, K, BK):
        kk = k0 + ks
        kmask = kk < K
        a = tl.load(a_rows[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = cmask[None, :] & kmask[:, None]
        w_ptrs = w_base + kk.to(tl.int64)[:, None] * stride_wk
        acc0 = _gate_dot(acc0, a, w_ptrs, wmask, INTERP, PREC)
        if NG > 1:
            acc1 = _gate_dot(acc1, a, w_ptrs + gate_off, wmask, INTERP, PREC)
        if NG > 2:
            acc2 = _gate_dot(acc2, a, w_ptrs + 2 * gate_off, wmask, INTERP, PREC)
        if NG > 3:
            acc3 = _gate_dot(acc3, a, w_ptrs + 3 * gate_off, wmask, INTERP, PREC)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gate_dot(acc, a, w_ptrs, wmask, INTERP: tl.constexpr, PREC: tl.constexpr):
    w = tl.load(w_ptrs, mask=wmask, other=0.0)
    if INTERP:
        # the interpreter's tl.dot is wrong on bf16 operands (DESIGN.md); compute in fp32 there only
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision=PREC)


@triton.jit
def tile(pid_b, pid_h, n_rows, H, BB: tl.constexpr, BH: tl.constexpr):
    """Rows b (int64), columns, their masks and the 2-D mask of tile (pid_b, pid_h) of an [n_rows, H] array."""
    b = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    cols = pid_h * BH + tl.arange(0, BH)
    rmask = b < n_rows
    cmask = cols < H
    return b, cols, rmask, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def add_bias(acc, b_ptr, off, cols, cmask, HAS: tl.constexpr):
    """acc + b[off + cols] broadcast over rows (nothing when HAS is false)."""
    if HAS:
        acc += tl.load(b_ptr + off + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


# ----------------------------------------------------------------------------------------------------------------
# the saved four-gate workspace of one step (LSTM [i, f, g, o], GRU [r, z, n, hn]; the gate k at column k*H) and
# the gate derivatives (the cell backward and the sequence backward share them)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def store_gates(ptrs, H, g0, g1, g2, g3, m):
    ty = ptrs.dtype.element_ty
    tl.store(ptrs, g0.to(ty), mask=m)
    tl.store(ptrs + H, g1.to(ty), mask=m)
    tl.store(ptrs + 2 * H, g2.to(ty), mask=m)
    tl.store(ptrs + 3 * H, g3.to(ty), mask=m)


@triton.jit
def load_gates(ptrs, H, m):
    """The four gates stored by store_gates, in float32."""
    g0 = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    g1 = tl.load(ptrs + H, mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(ptrs + 2 * H, mask=m, other=0.0).to(tl.float32)
    g3 = tl.load(ptrs + 3 * H, mask=m, other=0.0).to(tl.float32)
    return g0, g1, g2, g3


@triton.jit
def store_lstm_gate_grads(dg_ptrs, H, dh, dc, c, ig, fg, gg, og, tc, m):
    """LSTM: the pre-activation gradients of [i, f, g, o] stored at dg_ptrs + k*H (k = gate), from dh, the incoming
    cell gradient dc, the previous cell state c, the activated gates and tc = tanh(c_t). Returns the total cell
    gradient of the step (dc + dh * o * (1 - tc^2)); the caller scales it by f for the previous step."""
    dc = dc + dh * og * (1.0 - tc * tc)
    ty = dg_ptrs.dtype.element_ty
    tl.store(dg_ptrs, (dc * gg * ig * (1.0 - ig)).to(ty), mask=m)
    tl.store(dg_ptrs + H, (dc * c * fg * (1.0 - fg)).to(ty), mask=m)
    tl.store(dg_ptrs + 2 * H, (dc * ig * (1.0 - gg * gg)).to(ty), mask=m)
    tl.store(dg_ptrs + 3 * H, (dh * tc * og * (1.0 - og)).to(ty), mask=m)
    return dc


@triton.jit
def store_gru_gate_grads(dgi_ptr, dgh_ptr, rows, cols, H, dh, h, r, z, n, hn, m):
    """GRU: the pre-activation gradients of [r, z, n] stored twice, into the [*, 3H] arrays dgi (input part) and
    dgh (hidden part; its n gradient scaled by r, which multiplies W_hn h + b_hn) at rows x cols, from dh, the
    previous state h and the saved r, z, n, hn. Returns the direct state gradient dh * z."""
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    ty = dgi_ptr.dtype.element_ty
    # the offsets after the math, not before: computed earlier they lengthen live ranges (a 4-byte spill on sm_90a)
    offs = rows[:, None] * (3 * H) + cols[None, :]
    tl.store(dgi_ptr + offs, dr.to(ty), mask=m)
    tl.store(dgi_ptr + offs + H, dz.to(ty), mask=m)
    tl.store(dgi_ptr + offs + 2 * H, dn.to(ty), mask=m)
    tl.store(dgh_ptr + offs, dr.to(ty), mask=m)
    tl.store(dgh_ptr + offs + H, dz.to(ty), mask=m)
    tl.store(dgh_ptr + offs + 2 * H, (dn * r).to(ty), mask=m)
    return dh * z


# ----------------------------------------------------------------------------------------------------------------
# tiles of the recurrent gate GEMMs (cells and sequences)
# ----------------------------------------------------------------------------------------------------------------

class GemmTiles(NamedTuple):
    BB: int  # batch rows per program
    BH: int  # hidden units per program (each gate)
    BK: int  # reduction block
    num_warps: int


def rnn_tiles(n_rows: int, n_gates: int, block_m=None, interp=None) -> GemmTiles:
    """Tiles of the fused gate GEMM for `n_rows` batch rows and `n_gates` accumulators.

    tl.dot needs every block dim >= 16, so the batch tile is at least 16 and masks cover the rest. Tiles stay at
    most 32 x 32 per gate (32 x 64 for one gate): the fp32 accumulators, the operand tiles and their 64-bit row
    pointers then fit the registers without spilling (checked by tests/kernels/test_compile_sm90.py; 64-row tiles
    spilled up to 11 KB). Narrow tiles also spread the weight reads of a bandwidth-bound small-batch step over many
    SMs. block_m forces the batch tile (tests).
    Under the interpreter fewer, larger programs are faster (numpy does the work per program)."""
    interp = interpreting() if interp is None else interp
    if interp:
        bb = block_m or 16
        return GemmTiles(bb, 32, 32, 4)
    bb = block_m or (16 if n_rows <= 16 else 32)
    return GemmTiles(bb, 32 if bb == 16 or n_gates == 1 else 16, 32, 8)
