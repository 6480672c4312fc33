"""The own AVX-512 float32 GEMM under the C++ RNN layers (csrc/sgemm.h), through its test binding
seqfast._C.mm_f32: parity with a float64 matmul on odd sizes (partial register tiles and panels, K blocks), strided
and transposed views, bias; on a CPU without AVX-512 the binding runs at::mm and the same checks hold."""
import pytest
import torch

from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")

# M >= 256 takes the own kernel (shorter A operands run MKL): partial 8-row tiles, partial 32-column panels, several
# 64-row and 512-deep blocks, K = 0; the small shapes check the fallback keeps the same contract. A transposed A is
# packed from 4 panels of B (257 x 256 x 513; 270 x 130 x 600: a last 14-row block of one whole tile and a 6-row one).
SHAPES = [(256, 1, 1), (263, 33, 5), (264, 32, 512), (300, 45, 1000), (257, 256, 513), (270, 31, 0), (0, 5, 3),
          (300, 0, 4), (1, 1, 1), (13, 45, 1000), (270, 130, 600)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("b_t", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_mm_f32_parity(M, N, K, a_t, b_t, bias):
    a = torch.randn(K, M).t() if a_t else torch.randn(M, K)
    b = torch.randn(N, K).t() if b_t else torch.randn(K, N)
    c = torch.randn(N) if bias else None
    out = _C.mm_f32(a, b, c)
    ref = a.double() @ b.double() + (c.double() if bias else 0)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4 * max(1, K) ** 0.5)


def test_mm_f32_strided_rows():
    # row strides larger than the row (a slice of a wider matrix), as the RNN layers pass
    big_a, big_b = torch.randn(300, 50), torch.randn(40, 90)
    a, b = big_a[2:290, 5:40], big_b[3:38, 7:80]
    torch.testing.assert_close(_C.mm_f32(a, b, None), a @ b, rtol=1e-5, atol=1e-4)


def test_mm_f32_other_dtypes_fall_back():
    a, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    torch.testing.assert_close(_C.mm_f32(a, b, None), a @ b)


def test_mm_f32_shape_error():
    with pytest.raises(RuntimeError, match="mm_f32"):
        _C.mm_f32(torch.randn(3, 4), torch.randn(5, 6), None)
