"""The time loops that split the batch rows between the threads (csrc/rnn/rnn_sequence.cpp: rows_split for the
backward loops and the GRU / RNN forward, rows_split_fits for the LSTM's fused AVX-512 step; config rows_split):
LSTM, GRU and Elman RNN layers on two threads, with W_hh inside half a core's L2 and 16+ rows per thread, against
float64 torch (outputs, final states, input and parameter gradients), with the split on and off: padded batches of 37
rows (shares of 16 and 21) and packed batches whose later steps leave the second thread's rows empty; bidirectional
and two layers."""
import pytest
import torch

import seqfast
from seqfast import _ext

from conftest import compare_rnn_with_torch, cpp_config

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")

MODULES = {"LSTM": {}, "GRU": {}, "RNN": {"nonlinearity": "tanh"}, "RNN_relu": {"nonlinearity": "relu"}}


def _pair(kind, input_size, hidden, **kw):
    name = kind.split("_")[0]
    ref = getattr(torch.nn, name)(input_size, hidden, **MODULES[kind], **kw).double()
    ours = getattr(seqfast.nn, name)(input_size, hidden, **MODULES[kind], **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("rows_split", [True, False], ids=["rows", "units"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_backward_rows_split(kind, rows_split, packed, two_threads):
    torch.manual_seed(7)
    batch = 40 if packed else 37
    ours, ref = _pair(kind, 24, 64)
    x = torch.randn(9, batch, 24)
    # lengths 9 down to 1: from the fourth step on fewer than 16 rows remain, all in the first thread's share
    lengths = torch.tensor([9 - (i * 9) // batch for i in range(batch)]) if packed else None
    with cpp_config(rows_split=rows_split):
        compare_rnn_with_torch(ours, ref, x, lengths, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_rows_split_layers(kind, packed, two_threads):
    """Two bidirectional layers; packed, the reverse direction's batch grows step by step (rows from h0 join)."""
    torch.manual_seed(8)
    ours, ref = _pair(kind, 20, 64, num_layers=2, bidirectional=True)
    x = torch.randn(6, 35, 20)
    lengths = torch.tensor([6 - (i * 6) // 35 for i in range(35)]) if packed else None
    with cpp_config(rows_split=True):
        compare_rnn_with_torch(ours, ref, x, lengths, rtol=1e-4, atol=1e-4)
