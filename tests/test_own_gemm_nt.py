"""The own AVX2 dot-product-form float32 GEMM (csrc/cpu/sgemm_nt.h), which takes the A @ W^T products of the C++ RNN
layers and cells on CPUs with AVX2 but no AVX-512: parity of its direct binding seqfast._C.gemm_nt_f32 with a float64
matmul on sizes that hit every partial tile (3-row A tiles, 4-row W tiles, 8-wide k vectors), several L2 blocks of W
and A, strided rows and bias; and the layers' results with the kernel switched on and off."""
import pytest
import torch

from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.nt_gemm_available(),
                                reason="seqfast._C not built, or the own AVX2 GEMM does not run on this CPU")

# (M, N, K): M % 3, N % 4 and K % 8 take every remainder; K 0 and 1; K 1000 / 3000 give W blocks of 48 / 16 rows and
# A blocks of 24 / 6 rows, so M 50 and N 70 cross block edges; K 13000 gives the minimum 4-row W block.
SHAPES = [(1, 1, 1), (2, 3, 7), (3, 4, 8), (4, 5, 9), (5, 6, 15), (7, 7, 16), (8, 9, 17), (1, 1, 0), (3, 5, 0),
          (50, 70, 1000), (29, 53, 3000), (4, 9, 13000), (0, 4, 8), (4, 0, 8), (64, 256, 128)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_nt_parity(M, N, K, bias):
    a, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    out = _C.gemm_nt_f32(a, w, b)
    ref = a.double() @ w.double().t() + (b.double() if bias else 0)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * max(1, K) ** 0.5)


def test_gemm_nt_strided_rows():
    # row strides wider than the rows (slices of bigger matrices), as the per-step recurrent GEMM passes them
    big_a, big_w = torch.randn(40, 300), torch.randn(90, 301)
    a, w = big_a[3:37, 5:262], big_w[1:87, 2:259]
    torch.testing.assert_close(_C.gemm_nt_f32(a, w, None), a @ w.t(), rtol=1e-5, atol=1e-4)


def test_gemm_nt_errors():
    with pytest.raises(RuntimeError, match="gemm_nt_f32"):
        _C.gemm_nt_f32(torch.randn(3, 4), torch.randn(5, 6), None)
    with pytest.raises(RuntimeError, match="gemm_nt_f32"):
        _C.gemm_nt_f32(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="bias"):
        _C.gemm_nt_f32(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4))


@pytest.fixture
def own_gemm_restored():
    yield
    _C.set_config(own_gemm=True)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU", "RNN"])
def test_layers_same_results_with_and_without_the_kernel(kind, own_gemm_restored):
    # batch 24 > the GEMV range and hidden 256 (the shape rule picks the own kernel for these products); training mode,
    # so the saved workspaces and gradients go through the same forward
    import seqfast
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(200, 256)
    mod = getattr(seqfast.nn, kind)(200, 256)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(24, 200) if kind.endswith("Cell") else torch.randn(5, 24, 200)
    results = []
    for own in (True, False):
        _C.set_config(own_gemm=own)
        xi = x.clone().requires_grad_()
        out = mod(xi)
        y = out[0] if isinstance(out, tuple) else out
        y.sum().backward()
        results.append((y.detach(), xi.grad))
    out = ref(x)
    expected = out[0] if isinstance(out, tuple) else out
    for y, g in results:
        torch.testing.assert_close(y, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
