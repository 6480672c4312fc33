"""The fused AVX2 LSTM step (csrc/rnn/rnn_sequence_lstm_step_avx2.cpp) against torch.nn.LSTM in float64.

On a CPU with AVX2 + FMA and no AVX-512 kernels, float32 LSTM layers above the GEMV range (3+ rows) run their time
loop on it. Its two forms are both reached here: the input product inside the step while the thread's packed W_ih and
W_hh fit half its L2 (small hidden sizes; from two steps on), or the step starting from one GEMM's input
pre-activations (hidden 300: over half a megabyte per thread; from 128 rows on, so those cases run 130+ rows). The shapes put partial 8-unit blocks at the end of a thread's units, row
counts that leave 1- and 2-row tiles after the 3-row ones, and packed batches that shrink step by step; training
mode compares the saved-gate backward (in the pre-activation form the gates overwrite the pre-activations in place).
"""
import pytest
import torch

import seqfast
from conftest import compare_inference_with_torch, compare_rnn_with_torch, float32_and_float64, cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(
    _C is None or not _C.has_avx2() or _C.own_gemm_available(),
    reason="the AVX2 LSTM step runs on CPUs with AVX2 + FMA and without the AVX-512 kernels")

TOL = dict(rtol=2e-5, atol=2e-5)


def _lstm(input_size, hidden, **kwargs):
    return float32_and_float64("LSTM", input_size, hidden, **kwargs)


@pytest.fixture
def step_off():
    """The fused loop's GEMM + pointwise pass instead of the step (config avx2_lstm_step=False)."""
    with cpp_config(avx2_lstm_step=False):
        yield


@pytest.mark.parametrize("T,batch,input_size,hidden", [
    (5, 3, 7, 13),      # in-step form, one partial block per thread
    (4, 8, 16, 24),     # tiles of 3 + 3 + 2 rows
    (3, 17, 33, 70),    # 5 x 3 + 2 rows, partial blocks
    (6, 4, 9, 8),       # 3 + 1 rows, one block
    (3, 29, 150, 40),   # two row groups (24 + 5 rows), k chunks of 128 + 22 inputs
    (26, 5, 200, 300),  # pre-activation form (packed weights above half of L2; 130 rows)
])
def test_training_matches_torch(threads, T, batch, input_size, hidden):
    ours, ref = _lstm(input_size, hidden)
    compare_rnn_with_torch(ours, ref, torch.randn(T, batch, input_size), **TOL)


@pytest.mark.parametrize("T,batch,input_size,hidden", [(4, 8, 16, 24), (26, 5, 200, 300)])
def test_the_path_without_the_step_matches_torch(step_off, threads, T, batch, input_size, hidden):
    ours, ref = _lstm(input_size, hidden)
    compare_rnn_with_torch(ours, ref, torch.randn(T, batch, input_size), **TOL)


@pytest.mark.parametrize("hidden,lengths", [(24, [7, 3, 5, 1, 6, 2, 4]), (300, [37, 13, 25, 1, 31, 7, 19])])
def test_packed_batches_shrinking_to_one_row(threads, hidden, lengths):
    # 7 sequences of distinct lengths: the step's rows run 7, 6, ..., 1, so every tile shape meets every block
    ours, ref = _lstm(20, hidden)
    compare_rnn_with_torch(ours, ref, torch.randn(max(lengths), 7, 20), torch.tensor(lengths), **TOL)


def test_layers_directions_and_no_bias(threads):
    ours, ref = _lstm(12, 40, num_layers=2, bidirectional=True, bias=False, batch_first=True)
    compare_rnn_with_torch(ours, ref, torch.randn(6, 5, 12), **TOL)


@pytest.mark.parametrize("hidden,T", [(24, 5), (300, 22)])
def test_inference_matches_torch(threads, hidden, T):
    ours, ref = _lstm(10, hidden)
    compare_inference_with_torch(ours, ref, torch.randn(T, 6, 10), **TOL)


@pytest.mark.parametrize("hidden,T", [(24, 4), (300, 26)])
def test_saturated_gates_and_nan(hidden, T):
    # pre-activations in the hundreds: sigmoid and tanh saturate to exactly 0 / +-1 as torch's do; a NaN in one
    # sequence's input stays in that sequence's rows, as in torch
    ours, ref = _lstm(6, hidden)
    x = torch.randn(T, 5, 6) * 300
    x[2, 1, 3] = float("nan")
    with torch.no_grad(), seqfast.use_backend("cpp"):
        out = ours(x)[0]
    with torch.no_grad():
        want = ref(x.double())[0]
    torch.testing.assert_close(out.double(), want, **TOL, equal_nan=True)
    assert torch.equal(out.isnan(), want.isnan())
