"""The fused AVX-512 LSTM step's two forms (csrc/rnn/rnn_sequence_lstm_step.h) against torch.nn.LSTM in float64.

On a CPU with the AVX-512 kernels, float32 LSTM layers of 3+ rows run their time loop on the step: with the input
product inside the step, or, for batches of up to 8 rows whose thread's packed W_ih and W_hh slices exceed half its
L2, starting from one GEMM's input pre-activations over all steps (input 600 + hidden 200: 1.4 MB per thread at two
threads, more than half of any L2 of up to 2 MB). The shapes put partial 16-unit blocks at the end of a thread's units and 1-5 row
tiles after the 6-row ones; packed batches shrink step by step; training compares the saved-gate backward (in the
pre-activation form the gates overwrite the pre-activations in place); one step keeps the in-step form. Batches of
9-32 rows start from the GEMM too where both packed weights together outgrow 3/4 of the L3 (the input size below is
sized from the L3 this machine reports).
"""
import contextlib

import pytest
import torch

from conftest import compare_inference_with_torch, compare_rnn_with_torch, float32_and_float64, team_config
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


def _past_l3_input_size(hidden):
    """An input size whose packed W_ih and W_hh (4 * hidden * (input + hidden) floats) outgrow 3/4 of the L3 here."""
    l3 = _C.cache_bytes()["l3"]
    return l3 * 3 // 4 // (16 * hidden) - hidden + 64


def test_gemm_first_rule_past_the_l3():
    H = 128
    I = _past_l3_input_size(H)
    assert _C.lstm_input_first(rows=32, input_size=I, hidden_size=H, units=H)
    assert _C.lstm_input_first(rows=9, input_size=I, hidden_size=H, units=H)
    assert not _C.lstm_input_first(rows=33, input_size=I, hidden_size=H, units=H)
    assert not _C.lstm_input_first(rows=32, input_size=64, hidden_size=H, units=H)  # 0.8 MB: in the step


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_rows_past_eight_with_weights_past_the_l3(threads, mode):
    # 17 rows (6 + 6 + 5 row tiles) on the GEMM-first form; small inputs keep the gates off saturation
    H, T, B = 128, 3, 17
    I = _past_l3_input_size(H)
    if I > 40000:
        pytest.skip(f"an L3 of {_C.cache_bytes()['l3']} bytes needs an input size of {I}")
    assert _C.lstm_input_first(rows=B, input_size=I, hidden_size=H, units=H)
    ours, ref = _lstm(I, H)
    x = 0.05 * torch.randn(T, B, I)
    if mode == "train":
        compare_rnn_with_torch(ours, ref, x, **TOL)
    else:
        compare_inference_with_torch(ours, ref, x, **TOL)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("hidden,team", [(160, False), (24, True)], ids=["default_rule", "par_min_work_1"])
def test_one_and_two_row_steps_on_a_team(batch, hidden, team, two_threads):
    # 1-2 row steps share W_hh over two threads from 3/4 of par_min_work weights (rnn_sequence.cpp: recurrent_team):
    # hidden 160 by the default rule (4 x 160^2 = 102K), hidden 24 with par_min_work 1
    with team_config() if team else contextlib.nullcontext():
        ours, ref = _lstm(48, hidden)
        compare_rnn_with_torch(ours, ref, torch.randn(5, batch, 48), **TOL)
        ours, ref = _lstm(48, hidden, num_layers=2)
        compare_inference_with_torch(ours, ref, torch.randn(5, batch, 48), **TOL)
