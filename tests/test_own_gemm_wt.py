"""The broadcast-form GEMM of CPUs with AVX-512 (csrc/cpu/sgemm_wt.h: A packed into 32-row panels, the weight read in
place by broadcasts, C^T tiles transposed into C; up to 16 rows the narrow form, k pairs interleaved), through its test binding seqfast._C.gemm_wt_f32 and the entries
that route to it (gemm::linear_out / linear2_out / mm, the cell steps): parity with float64 on every partial tile
(W rows % 8, A rows % 32 and the 16-row tail panel), odd k, bias, strided rows and a row-major weight (wr = 1), and
the same results with the form switched off (config avx512_wt)."""
import pytest
import torch

from seqfast import _ext

from conftest import cpp_config

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.own_gemm_available(),
                                reason="seqfast._C not built, or the own AVX-512 GEMM does not run on this CPU")

# (M, K, N): the narrow form's one vector (1-8 rows: one row, 7, 8) and two (9-16), with K of 1, 2, odd and even;
# 17-31 rows (one 32-row panel with padding), whole panels and a panel plus 1 / 16 / 17 rows; N with every remainder
# of the 8-row W tiles; K past 1024.
SHAPES = [(1, 5, 3), (7, 3, 17), (8, 1, 9), (8, 1023, 33), (9, 7, 9), (13, 2, 5), (15, 129, 24), (16, 64, 8),
          (17, 33, 13), (31, 100, 29), (32, 1, 16), (33, 129, 41), (48, 300, 62), (49, 17, 7), (64, 256, 64),
          (97, 31, 30), (128, 1030, 12), (200, 300, 77)]


def _ref(a, w, bias):
    out = a.double() @ w.double().t()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["weight", "row_major", "strided"])
def test_gemm_wt_parity(M, K, N, bias, layout):
    torch.manual_seed(M * 1000 + N)
    if layout == "strided":  # rows of a and w longer than K (slices of wider matrices)
        a, w = torch.randn(M, K + 5)[:, 2:2 + K], torch.randn(N, K + 3)[:, 1:1 + K]
    else:
        a, w = torch.randn(M, K), torch.randn(N, K)
    if layout == "row_major":  # w given as the transpose of a row-major [K, N] matrix: W(n, k) = w[k * N + n]
        w = w.t().contiguous().t()
    b = torch.randn(N) if bias else None
    out = _C.gemm_wt_f32(a, w, b)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref(a, w, b), rtol=1e-5, atol=1e-5 * max(1, K) ** 0.5)


def _l2_budget_floats():
    """Floats of A's panels that one pass of the form keeps in L2 (sgemm_wt.cpp: half of this core's L2)."""
    return _C.cache_bytes()["l2"] // 2 // 4


# Past the budget, sized from this machine's L2: groups of A rows with all of k in one pass (three 32-row panels per
# group; 200 rows end in a group of 8, the narrow tail of a panel), and k blocks where one panel's k range alone
# passes half the budget (each k block adding into C). N 41: whole 8-row W tiles (each fetching the next) and a 1-row
# tile; on two threads each thread's range ends in its own partial tile.
@pytest.mark.parametrize("rows,k_of_budget", [(200, lambda f: f // 96 - 3), (70, lambda f: f // 32 + 3)],
                         ids=["row_groups", "k_blocks"])
@pytest.mark.parametrize("layout", ["weight", "row_major"])
def test_gemm_wt_past_the_l2_budget(rows, k_of_budget, layout):
    torch.manual_seed(rows)
    K = k_of_budget(_l2_budget_floats())
    a, w = torch.randn(rows, K), torch.randn(41, K)
    if layout == "row_major":
        w = w.t().contiguous().t()
    b = torch.randn(41)
    torch.testing.assert_close(_C.gemm_wt_f32(a, w, b).double(), _ref(a, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)


# Weights past half of this machine's L3 (sgemm_wt.h: streams_weights): the narrow form fetches each next W tile ahead
# (k-contiguous weights; a row-major weight reads as before). One and two vectors of the narrow form, N with a partial
# last tile.
@pytest.mark.parametrize("M", [5, 8, 13])
@pytest.mark.parametrize("layout", ["weight", "row_major"])
def test_gemm_wt_narrow_streamed_weights(M, layout):
    torch.manual_seed(M)
    K = 1024
    N = _C.cache_bytes()["l3"] // 2 // 4 // K + 67
    a, w = torch.randn(M, K), torch.randn(N, K)
    if layout == "row_major":
        w = w.t().contiguous().t()
    b = torch.randn(N)
    torch.testing.assert_close(_C.gemm_wt_f32(a, w, b).double(), _ref(a, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)


@pytest.mark.parametrize("cell", ["RNNCell", "LSTMCell"])
def test_cell_step_with_streamed_weights(cell):
    """A cell step whose W_ih and W_hh together pass half of the L3, at 8 rows (the narrow form), against float64."""
    import seqfast
    torch.manual_seed(0)
    hidden = 64
    gates = 4 * hidden if cell == "LSTMCell" else hidden
    input_size = _C.cache_bytes()["l3"] // 2 // 4 // gates + 31
    ref = getattr(torch.nn, cell)(input_size, hidden).double()
    mod = getattr(seqfast.nn, cell)(input_size, hidden)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(8, input_size, dtype=torch.float64)
    with torch.no_grad():
        want, got = ref(x), mod(x.float())
    # float32 rounding in a product of input_size terms grows with input_size (a 480 MB L3 makes it ~10^6 terms)
    tol = max(1e-4, 2e-9 * input_size)
    for w_, g_ in zip(want if cell == "LSTMCell" else [want], got if cell == "LSTMCell" else [got]):
        torch.testing.assert_close(g_.double(), w_, rtol=tol, atol=tol)


def test_gemm_wt_errors():
    with pytest.raises(RuntimeError, match="gemm_wt_f32"):
        _C.gemm_wt_f32(torch.randn(3, 4), torch.randn(5, 6), None)
    with pytest.raises(RuntimeError, match="gemm_wt_f32"):
        _C.gemm_wt_f32(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="bias"):
        _C.gemm_wt_f32(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4))


@pytest.mark.parametrize("M,K,N", [(16, 64, 40), (32, 200, 96), (100, 1030, 24), (129, 33, 17), (256, 2048, 1100),
                                   (200, 512, 2049)])
@pytest.mark.parametrize("bias", [False, True])
def test_mm_routes_to_the_form(M, K, N, bias):
    # gemm::mm with b = W^T (the layers' input projection) takes the broadcast form in its range (16-128 rows; 129-256
    # rows of a weight of 2^20+ elements) and the other kernels outside it: the same results either way
    torch.manual_seed(M + K)
    a, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    for on in (True, False):
        with cpp_config(avx512_wt=on):
            out = _C.mm_f32(a, w.t(), b)
        torch.testing.assert_close(out.double(), _ref(a, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batch,input_size,hidden", [(7, 33, 20), (8, 64, 64), (14, 17, 40), (16, 37, 45),
                                                     (40, 100, 130), (64, 512, 512), (128, 64, 96), (200, 300, 20)])
def test_cell_steps_with_and_without_the_form(kind, batch, input_size, hidden):
    # module steps (the fused region at 7-8 rows and from 13; 200 rows: linear2_out outside the form's range) against
    # float64 torch, forward and gradients, with the form on and off
    import seqfast
    torch.manual_seed(batch)
    ref = getattr(torch.nn, kind)(input_size, hidden).double()
    mod = getattr(seqfast.nn, kind)(input_size, hidden)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(batch, input_size)
    state = tuple(torch.randn(batch, hidden) for _ in range(2 if kind == "LSTMCell" else 1))
    want = ref(x.double(), tuple(s.double() for s in state) if len(state) == 2 else state[0].double())
    want = want if isinstance(want, tuple) else (want,)
    for on in (True, False):
        with cpp_config(avx512_wt=on):
            if on:  # the fused step on the broadcast form at 7-8 rows and from 13 to 128
                assert _C.cell_step_fused({"LSTMCell": 4, "GRUCell": 3, "RNNCell": 1}[kind], batch, input_size,
                                          hidden) == (batch <= 128)
            with torch.no_grad():
                got = mod(x, state if len(state) == 2 else state[0])
            xg = x.clone().requires_grad_()
            out = mod(xg, state if len(state) == 2 else state[0])
        got = got if isinstance(got, tuple) else (got,)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-5 * (input_size + hidden) ** 0.5)
        out = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in out).backward()
        xr = x.double().requires_grad_()
        outr = ref(xr, tuple(s.double() for s in state) if len(state) == 2 else state[0].double())
        outr = outr if isinstance(outr, tuple) else (outr,)
        sum(o.sum() for o in outr).backward()
        torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-5, atol=1e-4)
