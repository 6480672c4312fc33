"""The recurrent products of the fused time loops on weights packed for the own AVX2 outer-product kernel
(csrc/cpu/sgemm_nn.cpp gemm_packed, through gemm::PackedWeight) against torch.nn in float64.

On a CPU with AVX2 + FMA and no AVX-512 kernels, a GRU, an Elman RNN's forward (and an LSTM without the fused AVX2
step) above the GEMV range (9+ rows) packs each thread's W_hh slices once per call when the call has 2+ steps and the
slice fits a quarter of L2 or the call runs 512+ rows over its steps (config avx2_pack); with avx2_pack=False the
dot-product kernel reads them in place. Both are compared.
The shapes leave partial 16-unit panels at the end of a thread's units and row counts that end in 1-5 row tiles;
packed batches shrink step by step, so later steps multiply fewer rows than the weights were packed for.
"""
import pytest
import torch

import seqfast
from conftest import compare_rnn_with_torch, cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(
    _C is None or not _C.has_avx2() or _C.own_gemm_available(),
    reason="the packed AVX2 recurrent products run on CPUs with AVX2 + FMA and without the AVX-512 kernels")

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(params=[True, False], ids=["packed", "in_place"])
def packing(request):
    # avx2_lstm_step off: the LSTM cases take the time loop's GEMMs, not the fused AVX2 step
    with cpp_config(avx2_pack=request.param, avx2_lstm_step=False):
        yield request.param


def _pair(cls, input_size, hidden, **kwargs):
    ref = getattr(torch.nn, cls)(input_size, hidden, **kwargs).double()
    ours = getattr(seqfast.nn, cls)(input_size, hidden, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("cls,T,batch,input_size,hidden,kwargs", [
    ("GRU", 5, 13, 7, 40, {}),                        # 20 units a thread at 2 threads: one 16-unit panel + 4
    ("GRU", 2, 22, 30, 70, {}),                       # two steps; 6 + 6 + 6 + 4 row tiles
    ("GRU", 3, 11, 9, 35, {}),                        # odd units; 6 + 5 rows
    ("LSTM", 4, 16, 12, 33, {}),                      # 6 + 6 + 4 rows
    ("LSTM", 4, 10, 5, 24, {}),                       # 6 + 4 rows
    ("GRU", 3, 9, 6, 20, {"num_layers": 2, "bidirectional": True}),
    ("RNN", 4, 13, 7, 40, {}),                        # the Elman forward on the fused loop too: 6 + 6 + 1 rows
    ("GRU", 4, 130, 5, 200, {}),                      # slices above a quarter of a 512 KB L2: packed for 520 rows
    ("RNN", 3, 11, 9, 35, {"nonlinearity": "relu", "num_layers": 2, "bidirectional": True}),
])
def test_matches_torch(packing, threads, cls, T, batch, input_size, hidden, kwargs):
    ours, ref = _pair(cls, input_size, hidden, **kwargs)
    compare_rnn_with_torch(ours, ref, torch.randn(T, batch, input_size), **TOL)


@pytest.mark.parametrize("cls", ["GRU", "LSTM", "RNN"])
def test_shrinking_packed_batches_match_torch(packing, threads, cls):
    # 14 sequences of lengths 1..14: the steps run 14, 13, ..., 1 rows against weights packed for 14
    ours, ref = _pair(cls, 8, 36)
    lengths = torch.randperm(14) + 1
    compare_rnn_with_torch(ours, ref, torch.randn(14, 14, 8), lengths, **TOL)


@pytest.mark.parametrize("cls", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("batch", [1, 2, 13])
def test_one_region_per_call_matches_torch(threads, cls, batch):
    # par_min_work lowered so that these small layers run the fused loop on every thread of the team (one region, a
    # barrier per step): GEMV-sized batches (1-2 rows) from half of it, larger ones packed; packed input whose batch
    # shrinks from `batch` rows to 1.
    with cpp_config(par_min_work=256):
        ours, ref = _pair(cls, 6, 40)
        lengths = torch.arange(batch, 0, -1) + 2
        compare_rnn_with_torch(ours, ref, torch.randn(batch + 2, batch, 6), lengths, **TOL)
        compare_rnn_with_torch(ours, ref, torch.randn(5, batch, 6), **TOL)
