"""The own AVX2 float32 GEMMs, which take the products of the C++ RNN layers and cells on CPUs with AVX2 (on CPUs with
AVX-512, the cells' and few-row products): the dot-product form (also in its AVX-512 twin) for A @ W^T
(csrc/cpu/sgemm_nt.h, binding seqfast._C.gemm_nt_f32), the outer-product form for A @ W^T packing W as it goes
(csrc/cpu/sgemm_nn.h gemm_nt, seqfast._C.gemm_ntp_f32) and for A @ B with B read in place (csrc/cpu/sgemm_nn.h,
seqfast._C.gemm_nn_f32) or copied into panels as it goes (gemm_nn_packing, seqfast._C.gemm_nnp_f32). Parity with a
float64 matmul on sizes that hit every partial register tile and several cache blocks, strided and transposed
operands, bias; and the layers' results (forward and gradients) with the kernels switched on and off."""
import pytest
import torch

from conftest import cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.nt_gemm_available(),
                                reason="seqfast._C not built, or the own AVX2 GEMM does not run on this CPU")

# (M, N, K): M % 3, N % 4 and N % 8 (the AVX-512 tile's 8 W rows) and K % 8 take every remainder; K 0 and 1; K 1000
# gives A blocks of 48 rows (at 512 KB of L2), so M 50 crosses a block edge; K 3000 and 13000 are summed in 3 and 13
# passes of at most 1024 (the bias added once, later passes adding to C). 2 x 8, 6 x 12 and 6 x 26: the first row tile
# of each full W tile (2 or 3 rows) prefetches the next W tile, the rest do not; K 1030 in two passes.
SHAPES = [(1, 1, 1), (2, 3, 7), (3, 4, 8), (4, 5, 9), (5, 6, 15), (7, 7, 16), (8, 9, 17), (1, 1, 0), (3, 5, 0),
          (50, 70, 1000), (29, 53, 3000), (4, 9, 13000), (0, 4, 8), (4, 0, 8), (64, 256, 128), (2, 8, 33),
          (6, 12, 1030), (2, 10, 33), (6, 26, 1030), (9, 23, 70)]


# (M, N, K) for the packing form: M % 6, N % 16 and K % 8 take every remainder (the packer's partial panels and 8x8
# blocks); K 300 and 700 are packed in 2 and 3 slices of 256 (bias added once, later slices adding to C); M 400 crosses
# the 192-row A blocks; K 0 leaves C zero (or the bias); 1 row, 1 column.
NTP_SHAPES = [(1, 1, 1), (2, 3, 7), (5, 17, 9), (6, 16, 8), (7, 31, 15), (13, 33, 300), (400, 40, 700), (50, 70, 256),
              (3, 5, 0), (0, 5, 3), (4, 0, 3), (64, 512, 128)]


@pytest.fixture(params=["avx2", "avx512"])
def nt_form(request):
    """The dot-product form's vectors: AVX2, or its AVX-512 twin (csrc/cpu/sgemm_nt_avx512.cpp, on CPUs with AVX-512;
    the same tiles on 16 lanes, so K % 16 tails too)."""
    if request.param == "avx512" and not _C.own_gemm_available():
        pytest.skip("no AVX-512 on this CPU")
    with cpp_config(avx512_nt=request.param == "avx512"):
        yield request.param


@pytest.mark.parametrize("name,M,N,K", [("gemm_nt_f32",) + s for s in SHAPES] +
                         [("gemm_ntp_f32",) + s for s in NTP_SHAPES])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_nt_parity(name, M, N, K, bias, nt_form):
    a, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    out = getattr(_C, name)(a, w, b)
    ref = a.double() @ w.double().t() + (b.double() if bias else 0)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * max(1, K) ** 0.5)


@pytest.mark.parametrize("name,rows", [("gemm_nt_f32", 40), ("gemm_ntp_f32", 90)])
def test_gemm_nt_strided_rows(name, rows, nt_form):
    # row strides wider than the rows (slices of bigger matrices), as the per-step recurrent GEMM passes them; 34 rows
    # for the dot-product form, 84 for the packing form
    big_a, big_w = torch.randn(rows, 300), torch.randn(90, 301)
    a, w = big_a[3:rows - 3, 5:262], big_w[1:87, 2:259]
    torch.testing.assert_close(getattr(_C, name)(a, w, None), a @ w.t(), rtol=1e-5, atol=1e-4)


# (M, N, K) for A @ B: M % 6 and N % 16 (and % 8) take every remainder; K 300 and 600 cross the 256-deep k blocks,
# M 400 the 192-row A blocks; K 0 leaves C zero.
NN_SHAPES = [(1, 1, 1), (2, 7, 3), (5, 8, 9), (6, 9, 16), (7, 16, 17), (11, 17, 31), (13, 33, 300), (400, 40, 600),
             (3, 5, 0), (0, 5, 3), (4, 0, 3), (64, 512, 128)]


@pytest.mark.parametrize("M,N,K", NN_SHAPES)
@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("name", ["gemm_nn_f32", "gemm_nnp_f32"])
def test_gemm_nn_parity(M, N, K, a_t, name):
    # a_t: A as a transposed view (row stride 1), as dW = dgates^T @ x passes it; gemm_nnp_f32 copies B's k-slices into
    # panels first (N % 16 remainders: zero-padded panels)
    a = torch.randn(K, M).t() if a_t else torch.randn(M, K)
    b = torch.randn(K, N)
    out = getattr(_C, name)(a, b)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5 * max(1, K) ** 0.5)


@pytest.mark.parametrize("name", ["gemm_nn_f32", "gemm_nnp_f32"])
def test_gemm_nn_strided_rows(name):
    big_a, big_b = torch.randn(40, 300), torch.randn(290, 90)
    a, b = big_a[3:37, 5:262], big_b[1:258, 2:77]
    torch.testing.assert_close(getattr(_C, name)(a, b), a @ b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["gemm_nn_f32", "gemm_nnp_f32"])
def test_gemm_nn_errors(name):
    gemm = getattr(_C, name)
    with pytest.raises(RuntimeError, match=name):
        gemm(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(RuntimeError, match=name):
        gemm(torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", ["gemm_nt_f32", "gemm_ntp_f32"])
def test_gemm_nt_errors(name):
    gemm = getattr(_C, name)
    with pytest.raises(RuntimeError, match=name):
        gemm(torch.randn(3, 4), torch.randn(5, 6), None)
    with pytest.raises(RuntimeError, match=name):
        gemm(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="bias"):
        gemm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4))


@pytest.fixture
def own_gemm_restored():
    saved = _C.get_config()
    yield
    _C.set_config(**saved)


def _run(module, x):
    """Output, input gradient and parameter gradients of module(x).sum() (first output)."""
    module.zero_grad()
    x = x.to(next(module.parameters()).dtype).clone().requires_grad_()
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    y.sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch,gemv_rows", [(3, None), (5, 8), (24, None), (64, None)])
def test_layers_match_torch_with_and_without_the_kernels(kind, batch, gemv_rows, own_gemm_restored):
    # hidden 256, input 200: the shape rules pick the own kernels for the forward and backward products; batch 3 takes
    # them where the GEMV range shrinks to 2 rows beside them, batch 5 with small_batch=8 keeps the GEMV (the default
    # on other CPUs); the sequences' input projections (5 x batch rows from 24) and the cells at batch 64 run the
    # packing form; training mode, so saved workspaces and all gradients are compared
    import seqfast
    if gemv_rows is not None:
        _C.set_config(small_batch=gemv_rows)
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(200, 256)
    mod = getattr(seqfast.nn, kind)(200, 256)
    mod.load_state_dict(ref.state_dict())
    exact = getattr(torch.nn, kind)(200, 256).double()
    exact.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 200) if kind.endswith("Cell") else torch.randn(5, batch, 200)
    # against float64, within 3x torch's own float32 error on each tensor: float32 sums in another order (the weight
    # gradients sum 5 x batch rows) differ from torch's by about as much as torch's differ from the exact values; the
    # floor scales with the tensor's size (where torch's own error happens to be tiny, a sum of 320 float32 products
    # of magnitude ~10 is still off by ~1e-5)
    expected, torch32 = _run(exact, x), _run(ref, x)
    for own in (True, False):
        _C.set_config(own_gemm=own)
        for got, want, theirs in zip(_run(mod, x), expected, torch32):
            atol = 3 * (theirs.double() - want).abs().max().item() + 2e-6 * max(1.0, want.abs().max().item())
            torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_weight_gradients_on_the_packing_form(kind, own_gemm_restored):
    # batch 8, input 520, hidden 512: dW = dgates^T @ x is a (G*512) x 8 x 520 product, which the own kernel takes with
    # x's k-slices copied into panels (gemm_nnp); its gradients must match torch's
    import seqfast
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(520, 512)
    mod = getattr(seqfast.nn, kind)(520, 512)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(8, 520)
    for got, want in zip(_run(mod, x), _run(ref, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
