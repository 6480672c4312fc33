"""The BLAS-native choices (csrc/cpu/gemm.cpp: blas_native, rnn_sequence.cpp: lstm_step_yields) on any CPU: where MKL
runs its own AVX-512 kernels (Intel CPUs) the BLAS takes the products with a row-major B and those of 129+ rows, and
the LSTM layer's fused step yields to the per-step path from 8 to 64 rows when a thread's packed weights outgrow twice
its L2. The config field blas_native forces either answer, so both routes are checked here against float64 whatever
the machine's vendor."""
import pytest
import torch

from conftest import compare_inference_with_torch, compare_rnn_with_torch, cpp_config, float32_and_float64
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.own_gemm_available(),
                                reason="the choice is between the own AVX-512 GEMM and the BLAS")

BOTH = pytest.mark.parametrize("native", [0, 1])


def test_config_forces_the_answer():
    for forced in (0, 1):
        with cpp_config(blas_native=forced):
            assert _C.blas_native() is bool(forced)


def _ref(a, b):
    return a.double() @ b.double()


@BOTH
@pytest.mark.parametrize("M,K,N,form", [
    (8, 512, 128, "row_major"),     # dx = dgates @ W of a cell step
    (37, 300, 70, "row_major"),
    (300, 8, 96, "transposed_a"),   # dW = dgates^T @ x over a batch of 8
    (200, 1, 64, "transposed_a"),   # over a batch of 1 (an outer product)
    (600, 96, 136, "weight"),       # A @ W^T of 129+ rows
    (200, 512, 2048, "weight"),     # 129-256 rows with K N >= 2^20 (the broadcast form where blas_native is false)
    (8, 256, 100, "weight"),        # A @ W^T of 8 rows (the broadcast form)
])
def test_products_match_float64(native, M, K, N, form):
    torch.manual_seed(M + K + N)
    if form == "transposed_a":
        a = torch.randn(K, M).t()
        b = torch.randn(K, N)
    elif form == "weight":
        a = torch.randn(M, K)
        b = torch.randn(N, K).t()
    else:
        a, b = torch.randn(M, K), torch.randn(K, N)
    bias = torch.randn(N)
    with cpp_config(blas_native=native):
        got = _C.mm_f32(a, b, bias)
    torch.testing.assert_close(got.double(), _ref(a, b) + bias.double(), rtol=1e-5, atol=1e-5 * K ** 0.5)


@BOTH
def test_cell_training_step_matches_float64(native):
    # the step's backward products (dx, dW_ih, dW_hh) on the BLAS or the own kernels
    torch.manual_seed(0)
    ours, ref = float32_and_float64("LSTMCell", 96, 80)
    x = torch.randn(8, 96)
    h, c = torch.randn(8, 80), torch.randn(8, 80)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    with cpp_config(blas_native=native):
        hy, cy = ours(x32, (h, c))
        (hy.sum() + 2 * cy.sum()).backward()
    hy_r, cy_r = ref(x64, (h.double(), c.double()))
    (hy_r.sum() + 2 * cy_r.sum()).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-5, atol=1e-5)


def _yielding_input_size(hidden, rows):
    """An input size whose packed W_ih and W_hh slices per thread (two threads) outgrow twice this machine's L2."""
    l2 = _C.cache_bytes()["l2"]
    units = (hidden + 1) // 2
    size = 2 * l2 // (4 * 4 * units) - hidden + 64
    with cpp_config(blas_native=1):
        assert _C.lstm_step_yields(rows=rows, input_size=size, hidden_size=hidden, units=units)
    return size


def test_yield_rule():
    H = 64
    I = _yielding_input_size(H, 8)
    with cpp_config(blas_native=1):
        assert _C.lstm_step_yields(rows=64, input_size=I, hidden_size=H, units=32)
        assert not _C.lstm_step_yields(rows=7, input_size=I, hidden_size=H, units=32)
        assert not _C.lstm_step_yields(rows=65, input_size=I, hidden_size=H, units=32)
        assert not _C.lstm_step_yields(rows=8, input_size=64, hidden_size=H, units=32)
    with cpp_config(blas_native=0):
        assert not _C.lstm_step_yields(rows=8, input_size=I, hidden_size=H, units=32)


@BOTH
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_lstm_layer_where_the_step_yields(native, mode):
    # 9 rows, 3 steps; with native on, two threads run the per-step path (the step yields), else the fused step
    H, T, B = 64, 3, 9
    I = _yielding_input_size(H, B)
    if I > 200000:
        pytest.skip(f"an L2 of {_C.cache_bytes()['l2']} bytes needs an input size of {I}")
    torch.manual_seed(1)
    ours, ref = float32_and_float64("LSTM", I, H)
    x = 0.05 * torch.randn(T, B, I)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpp_config(blas_native=native):
            if mode == "infer":
                compare_inference_with_torch(ours, ref, x, rtol=2e-5, atol=2e-5)
            else:
                compare_rnn_with_torch(ours, ref, x, rtol=2e-5, atol=2e-5)
    finally:
        torch.set_num_threads(saved)
