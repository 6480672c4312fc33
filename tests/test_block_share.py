"""The fused LSTM time loop's shared step blocks (csrc/cpu/block_share.h, used in csrc/rnn/rnn_sequence.cpp).

With two threads each step's unit blocks are shared: a thread done with its own blocks takes a teammate's from the
back, with that teammate's packed weights. The test hook share_test_delay_us holds the second thread back at every
step, so the first runs all of its blocks (the path a slow or preempted teammate causes); the outputs must equal the
fixed split's bit for bit (each block is computed by the same code on the same operands, whichever thread runs it)
and torch's within float32 tolerance, in inference and in training (gates saved for the backward).
"""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from conftest import compare_rnn_with_torch, cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(
    _C is None or not (_C.has_avx2() or _C.own_gemm_available()) or _C.usable_cpus() < 2,
    reason="the fused LSTM step loop runs on CPUs with AVX2 + FMA or AVX-512, and sharing needs two threads")

TOL = dict(rtol=2e-5, atol=2e-5)
SHAPES = [
    # T, batch, input, hidden, lengths
    (5, 8, 16, 37, None),                      # input product inside the step (AVX2), a partial last block
    (26, 5, 200, 300, None),                   # step from the input pre-activations (AVX2: weights over half of L2)
    (9, 7, 20, 40, [9, 3, 5, 1, 6, 2, 4]),     # packed: the step's rows shrink from 7 to 1
]


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _pair(input_size, hidden):
    ref = torch.nn.LSTM(input_size, hidden).double()
    ours = seqfast.nn.LSTM(input_size, hidden)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _team(**fields):
    # a team of two for every step however small (par_min_work), and no back-off to one thread
    return cpp_config(par_min_work=1, contention_backoff=False, **fields)


def _stealing():
    # the second thread sleeps at each step's start, so the first takes its blocks
    return _team(block_share=True, share_test_delay_us=2000)


@pytest.mark.parametrize("T,batch,input_size,hidden,lengths", SHAPES)
def test_stolen_blocks_equal_the_fixed_split_and_torch(two_threads, T, batch, input_size, hidden, lengths):
    ours, ref = _pair(input_size, hidden)
    x = torch.randn(T, batch, input_size)
    packed = (lambda t: pack_padded_sequence(t, torch.tensor(lengths), enforce_sorted=False)) if lengths else None
    inp = packed(x) if packed else x
    with torch.no_grad(), seqfast.use_backend("cpp"):
        with _team(block_share=False):
            fixed = ours(inp)
        with _stealing():
            shared = ours(inp)
        want = ref(packed(x.double()) if packed else x.double())
    data = (lambda o: o.data) if packed else (lambda o: o)
    got_all = (data(shared[0]), *shared[1])
    for got, base, ref_t in zip(got_all, (data(fixed[0]), *fixed[1]), (data(want[0]), *want[1])):
        assert torch.equal(got, base)
        torch.testing.assert_close(got.double(), ref_t, **TOL)


@pytest.mark.parametrize("T,batch,input_size,hidden,lengths", SHAPES)
def test_training_with_stolen_blocks_matches_torch(two_threads, T, batch, input_size, hidden, lengths):
    ours, ref = _pair(input_size, hidden)
    with _stealing():
        compare_rnn_with_torch(ours, ref, torch.randn(T, batch, input_size),
                               torch.tensor(lengths) if lengths else None, **TOL)


def test_sharing_is_on_by_default_and_the_environment_switches_it_off(monkeypatch):
    saved = _C.get_config()
    try:
        monkeypatch.delenv("SEQFAST_CPU_NO_BLOCK_SHARE", raising=False)
        cfg = _C.reload_config()
        assert cfg["block_share"] is True and cfg["share_test_delay_us"] == 0
        monkeypatch.setenv("SEQFAST_CPU_NO_BLOCK_SHARE", "1")
        assert _C.reload_config()["block_share"] is False
    finally:
        monkeypatch.delenv("SEQFAST_CPU_NO_BLOCK_SHARE", raising=False)
        _C.reload_config()
        _C.set_config(**saved)
