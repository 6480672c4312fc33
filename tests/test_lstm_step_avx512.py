"""The fused AVX-512 LSTM step's two forms (csrc/rnn/rnn_sequence_lstm_step.h) against torch.nn.LSTM in float64.

On a CPU with the AVX-512 kernels, float32 LSTM layers of 3+ rows run their time loop on the step: with the input
product inside the step, or, for batches of up to 8 rows whose thread's packed W_ih and W_hh slices exceed half its
L2, starting from one GEMM's input pre-activations over all steps (input 600 + hidden 200: 1.4 MB per thread at two
threads, more than half of any L2 of up to 2 MB). The shapes put partial 16-unit blocks at the end of a thread's units and 1-5 row
tiles after the 6-row ones; packed batches shrink step by step; training compares the saved-gate backward (in the
pre-activation form the gates overwrite the pre-activations in place); one step keeps the in-step form.
"""
import pytest
import torch

from conftest import compare_inference_with_torch, compare_rnn_with_torch, float32_and_float64
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.own_gemm_available(),
                                reason="the AVX-512 LSTM step runs on CPUs with the AVX-512 kernels")

TOL = dict(rtol=2e-5, atol=2e-5)


def _lstm(input_size, hidden, **kwargs):
    return float32_and_float64("LSTM", input_size, hidden, **kwargs)


@pytest.mark.parametrize("T,batch,input_size,hidden", [
    (5, 3, 7, 13),      # in-step form, one partial block
    (3, 17, 33, 70),    # 2 x 6 + 5 rows, partial blocks
    (4, 7, 600, 200),   # pre-activation form: 6 + 1 rows
    (1, 7, 600, 200),   # one step: in-step form
    (3, 9, 600, 200),   # 9 rows: in-step form
])
def test_training_matches_torch(threads, T, batch, input_size, hidden):
    ours, ref = _lstm(input_size, hidden)
    compare_rnn_with_torch(ours, ref, torch.randn(T, batch, input_size), **TOL)


@pytest.mark.parametrize("hidden,lengths", [(24, [7, 3, 5, 1, 6, 2, 4]), (200, [9, 3, 5, 1, 6, 2, 8])])
def test_packed_batches_shrinking_to_one_row(threads, hidden, lengths):
    # 7 sequences of distinct lengths: the step's rows run 7, 6, ..., 1 (the last steps on the 1-2 row path)
    ours, ref = _lstm(600, hidden)
    compare_rnn_with_torch(ours, ref, torch.randn(max(lengths), 7, 600), torch.tensor(lengths), **TOL)


@pytest.mark.parametrize("hidden,T", [(24, 5), (200, 6)])
def test_inference_matches_torch(threads, hidden, T):
    ours, ref = _lstm(600, hidden, num_layers=2, bidirectional=True)
    compare_inference_with_torch(ours, ref, torch.randn(T, 8, 600), **TOL)
