"""A team's shared work (csrc/cpu/block_share.h): the fused LSTM time loop's step blocks (csrc/rnn/rnn_sequence.cpp),
the pieces of the own GEMMs' team splits and of a cell step's units, and the SDPA forward's tasks
(cpu::parallel_for_shared in cpu/team.h).

With two threads a thread done with its own blocks takes a teammate's from the back (in the LSTM loop, with that
teammate's packed weights). The test hook share_test_delay_us holds the second thread back at every step or region,
so the first runs all of its blocks (the path a slow or preempted teammate causes); the outputs must equal the fixed
split's bit for bit (each output is computed by the same code on the same operands, whichever thread runs it) and
torch's within float32 tolerance, in inference and in training (gates saved for the backward).
"""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from conftest import compare_rnn_with_torch, team_config
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


def _pair(input_size, hidden):
    ref = torch.nn.LSTM(input_size, hidden).double()
    ours = seqfast.nn.LSTM(input_size, hidden)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _stealing():
    # the second thread sleeps at each step's start, so the first takes its blocks
    return team_config(block_share=True, share_test_delay_us=2000)


@pytest.mark.parametrize("T,batch,input_size,hidden,lengths", SHAPES)
def test_stolen_blocks_equal_the_fixed_split_and_torch(two_threads, T, batch, input_size, hidden, lengths):
    ours, ref = _pair(input_size, hidden)
    x = torch.randn(T, batch, input_size)
    packed = (lambda t: pack_padded_sequence(t, torch.tensor(lengths), enforce_sorted=False)) if lengths else None
    inp = packed(x) if packed else x
    with torch.no_grad(), seqfast.use_backend("cpp"):
        with team_config(block_share=False):
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


# ---- the shared pieces of the own GEMMs' team splits and of a cell step's units (cpu::parallel_for_shared) ----

GEMMS = [("gemm_nt_f32", 64, 522, 300), ("gemm_ntp_f32", 70, 530, 260), ("gemm_nn_f32", 40, 530, 300),
         ("gemm_nnp_f32", 40, 530, 300), ("gemm_nn_f32", 500, 20, 300)]  # the last: split by rows


@pytest.mark.skipif(_C is None or not _C.nt_gemm_available(), reason="the own AVX2 GEMMs do not run on this CPU")
@pytest.mark.parametrize("name,M,N,K", GEMMS)
def test_stolen_gemm_pieces_equal_the_fixed_split(two_threads, name, M, N, K):
    a = torch.randn(M, K)
    b = torch.randn(N, K) if "nt" in name else torch.randn(K, N)
    fn = getattr(_C, name)
    with team_config(block_share=False):
        fixed = fn(a, b)
    with _stealing():
        shared = fn(a, b)
    assert torch.equal(shared, fixed)
    want = a.double() @ (b.double().t() if "nt" in name else b.double())
    torch.testing.assert_close(shared.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batch,input_size,hidden", [(16, 200, 256), (70, 100, 90)])
def test_cell_steps_with_stolen_units_match_torch(two_threads, kind, batch, input_size, hidden):
    # batch 16, hidden 256: the step's units split over the team (rnn_pointwise.h par_units), in pieces; batch 70:
    # both gate products in one region of the packing GEMM (gemm.h linear2_out), its 16-column panels in pieces
    ref = getattr(torch.nn, kind)(input_size, hidden).double()
    ours = getattr(seqfast.nn, kind)(input_size, hidden)
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(batch, input_size), torch.randn(batch, hidden)
    state = (h, torch.randn(batch, hidden)) if kind == "LSTMCell" else h
    state_r = tuple(s.double() for s in state) if kind == "LSTMCell" else h.double()
    with torch.no_grad(), seqfast.use_backend("cpp"):
        with team_config(block_share=False):
            fixed = ours(x, state)
        with _stealing():
            shared = ours(x, state)
        want = ref(x.double(), state_r)
    pairs = zip(shared, fixed, want) if kind == "LSTMCell" else [(shared, fixed, want)]
    for got, base, ref_t in pairs:
        assert torch.equal(got, base)
        torch.testing.assert_close(got.double(), ref_t, **TOL)


# ---- the generic forward time loop (GRU, and LSTM off the fused step): each thread's slice in pieces, each with its
# own recurrent product, shared per step. RNN layers and two-row batches take the per-step path, whose products and
# cell units are shared pieces too (cpu::parallel_for_shared)

LOOP_SHAPES = [
    # T, batch, input, hidden, lengths
    (6, 24, 30, 256, None),                   # several pieces per thread
    (4, 24, 10, 96, None),                    # 3 blocks of 16 units per thread: one piece each
    (9, 7, 20, 256, [9, 3, 5, 1, 6, 2, 4]),   # packed: the step's rows shrink from 7 to 1
    (5, 2, 12, 96, None),                     # two rows: the per-step GEMV
]


def _loop_pair(kind, input_size, hidden):
    ref = getattr(torch.nn, kind)(input_size, hidden).double()
    ours = getattr(seqfast.nn, kind)(input_size, hidden)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("kind", ["GRU", "RNN", "LSTM"])
@pytest.mark.parametrize("T,batch,input_size,hidden,lengths", LOOP_SHAPES)
def test_time_loop_pieces_stolen_equal_the_fixed_split_and_torch(two_threads, kind, T, batch, input_size, hidden,
                                                                 lengths):
    # LSTM with the fused step off: its GEMM + pointwise loop
    extra = {"avx2_lstm_step": False} if kind == "LSTM" else {}
    ours, ref = _loop_pair(kind, input_size, hidden)
    x = torch.randn(T, batch, input_size)
    packed = (lambda t: pack_padded_sequence(t, torch.tensor(lengths), enforce_sorted=False)) if lengths else None
    inp = packed(x) if packed else x
    with torch.no_grad(), seqfast.use_backend("cpp"):
        with team_config(block_share=False, **extra):
            fixed = ours(inp)
        with team_config(block_share=True, share_test_delay_us=2000, **extra):
            shared = ours(inp)
        want = ref(packed(x.double()) if packed else x.double())
    data = (lambda o: o.data) if packed else (lambda o: o)
    states = (lambda o: o[1]) if kind == "LSTM" else (lambda o: (o[1],))
    for got, base, ref_t in zip((data(shared[0]), *states(shared)), (data(fixed[0]), *states(fixed)),
                                (data(want[0]), *states(want))):
        assert torch.equal(got, base)
        torch.testing.assert_close(got.double(), ref_t, **TOL)
    with team_config(block_share=True, share_test_delay_us=2000, **extra):
        compare_rnn_with_torch(ours, ref, x, torch.tensor(lengths) if lengths else None, **TOL)


# ---- the SDPA forward's tasks (one per batch, head and query block of 64 rows: csrc/attention/attention.cpp
# fwd_blocks), shared pieces of each thread's run of tasks

SDPA_SHAPES = [
    # batch, heads, query length, key length, head dim, causal
    (1, 3, 130, 130, 24, False),   # 3 heads x 3 query blocks (the last of 2 rows): an odd split of 9 tasks
    (2, 2, 200, 200, 16, True),    # causal: the task order interleaves early and late query blocks
    (1, 4, 96, 150, 40, False),    # more keys than queries, over the 64-row blocks' edges
]


@pytest.mark.skipif(_C is None or not _C.has_avx2(), reason="the AVX2 attention blocks need AVX2 + FMA")
@pytest.mark.parametrize("N,Hh,Lq,Lk,D,causal", SDPA_SHAPES)
def test_sdpa_tasks_stolen_equal_the_fixed_split_and_torch(two_threads, N, Hh, Lq, Lk, D, causal):
    q = torch.randn(N, Hh, Lq, D)
    k, v = torch.randn(N, Hh, Lk, D), torch.randn(N, Hh, Lk, D)
    fn = seqfast.functional.scaled_dot_product_attention
    with torch.no_grad(), seqfast.use_backend("cpp"):
        with team_config(block_share=False):
            fixed = fn(q, k, v, is_causal=causal)
        with _stealing():
            shared = fn(q, k, v, is_causal=causal)
    assert torch.equal(shared, fixed)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    torch.testing.assert_close(shared.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,Hq,Hk,Lk,D", [(4, 8, 8, 100, 64), (3, 4, 2, 37, 40)])
def test_decoder_step_heads_stolen_equal_the_fixed_split_and_torch(two_threads, dtype, N, Hq, Hk, Lk, D):
    # the decoder step (one query row) shares its heads in pieces: the first thread takes the delayed one's heads,
    # bit for bit the fixed split's results (grouped-query heads included)
    torch.manual_seed(N * Lk)
    q = torch.randn(N, Hq, 1, D).to(dtype)
    k, v = torch.randn(N, Hk, Lk, D).to(dtype), torch.randn(N, Hk, Lk, D).to(dtype)
    fn = seqfast.functional.scaled_dot_product_attention
    kw = {"enable_gqa": True} if Hq != Hk else {}
    with torch.no_grad(), seqfast.use_backend("cpp"):
        with team_config(block_share=False):
            fixed = fn(q, k, v, **kw)
        with _stealing():
            shared = fn(q, k, v, **kw)
    assert torch.equal(shared, fixed)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared.double(), want, **tol)
