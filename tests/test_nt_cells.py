"""Cell steps whose two gate products run on the own kernels that read the weights in place, in one region
(csrc/rnn/rnn_cell.cpp: fused_nt; the dot-product kernel's gemm2, csrc/cpu/sgemm_nt.h, or on CPUs with AVX-512 from 16
rows the broadcast form, csrc/cpu/sgemm_wt.h: x W_ih^T and h W_hh^T summed in the same accumulators, the cell update
in the same region). Against float64 torch, forward and gradients, with the fused step on and off (config nt_cells), on
sizes that take every partial register tile (rows % 3, units % 4, k % 8), odd input / hidden sizes, no bias, and the
thread split (enough work for two threads, or one)."""
import os

import pytest
import torch

from seqfast import _ext

from conftest import cpp_config, team_config

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.nt_gemm_available(),
                                reason="seqfast._C not built, or the own AVX2 GEMM does not run on this CPU")

GATES = {"LSTMCell": 4, "GRUCell": 3, "RNNCell": 1}

# (batch, input, hidden): 6 rows (two whole 3-row tiles; 3-4 rows take the GEMV on CPUs with its AVX-512 form) with
# hidden 64 on one thread; 8 x 37 -> 45 and 5 x 130 -> 19 for the remainders (a 2-row tile, W tiles of 1-3 rows, k
# tails of 5 and 2); 24 x 200 -> 256 and 16 x 600 -> 420 split over two threads (k of 800 and 1020 in one pass).
SHAPES = [(6, 64, 64), (8, 37, 45), (5, 130, 19), (24, 200, 256), (16, 600, 420)]


def _step(module, x, state):
    """Outputs of one step and the gradients of x, the state and every parameter for fixed output gradients."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    state = tuple(s.clone().requires_grad_() for s in state)
    out = module(x, state if len(state) == 2 else state[0])
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [x.grad] + [s.grad for s in state] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("kind,nonlinearity", [("LSTMCell", None), ("GRUCell", None), ("RNNCell", "tanh"),
                                               ("RNNCell", "relu")])
@pytest.mark.parametrize("batch,input_size,hidden", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("avx512_nt,avx512_wt", [(False, False), (True, False), (True, True)],
                         ids=["avx2", "avx512_where_present", "broadcast_form_where_present"])
def test_fused_cell_step_matches_torch(kind, nonlinearity, batch, input_size, hidden, bias, avx512_nt, avx512_wt):
    import seqfast
    with cpp_config(avx512_wt=avx512_wt):
        assert _C.cell_step_fused(GATES[kind], batch, input_size, hidden), "this shape must take the fused step"
    kw = {"nonlinearity": nonlinearity} if nonlinearity else {}
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(input_size, hidden, bias=bias, **kw).double()
    mod = getattr(seqfast.nn, kind)(input_size, hidden, bias=bias, **kw)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(batch, input_size)
    state = tuple(torch.randn(batch, hidden) for _ in range(2 if kind == "LSTMCell" else 1))
    expected = _step(ref, x.double(), tuple(s.double() for s in state))
    for fused in (True, False):
        with cpp_config(nt_cells=fused, avx512_nt=avx512_nt, avx512_wt=avx512_wt):
            with torch.no_grad():
                out = mod(x, state if len(state) == 2 else state[0])
            got = _step(mod, x, state)
        outs = out if isinstance(out, tuple) else (out,)
        for o, want in zip(outs, expected):
            torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=2e-5)
        for g, want in zip(got, expected):
            torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-4)


# (batch, input, hidden) of fused steps whose weights fit half of any L2 of 64 KB and more: from 32 rows their batch
# rows are split over the team in 16-row blocks (rnn_cell.cpp: fused_split), below that their units, each thread
# packing all the rows itself. Chunks on two threads: 16 + 16 rows, 32 + 38 (the last block 6 rows), 16 + 21, 48 + 52;
# 20 rows: units 16 + 24.
ROW_SPLIT = [(32, 40, 48), (70, 33, 24), (37, 20, 30), (100, 17, 16), (20, 30, 40)]


@pytest.mark.parametrize("kind,nonlinearity", [("LSTMCell", None), ("GRUCell", None), ("RNNCell", "tanh")])
@pytest.mark.parametrize("batch,input_size,hidden", ROW_SPLIT)
def test_fused_step_with_rows_split_matches_torch(kind, nonlinearity, batch, input_size, hidden, two_threads):
    import seqfast
    # the broadcast form switched on (also where the environment switched it off for the run): these row counts take
    # the fused step on CPUs with the AVX-512 kernels
    with cpp_config(avx512_wt=True):
        assert _C.cell_step_fused(GATES[kind], batch, input_size, hidden) or not _C.own_gemm_available()
    kw = {"nonlinearity": nonlinearity} if nonlinearity else {}
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(input_size, hidden, **kw).double()
    mod = getattr(seqfast.nn, kind)(input_size, hidden, **kw)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(batch, input_size)
    state = tuple(torch.randn(batch, hidden) for _ in range(2 if kind == "LSTMCell" else 1))
    expected = _step(ref, x.double(), tuple(s.double() for s in state))
    # par_min_work 1: every step worth two chunks
    with team_config(avx512_wt=True):
        with torch.no_grad():
            out = mod(x, state if len(state) == 2 else state[0])
        got = _step(mod, x, state)
    for o, want in zip(out if isinstance(out, tuple) else (out,), expected):
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=2e-5)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-4)


def test_fused_range():
    # the GEMV rows (1-2; 3-4 too where the AVX-512 GEMV runs) keep the GEMV
    assert not _C.cell_step_fused(4, 2, 64, 64)
    assert _C.cell_step_fused(4, 4, 64, 64) == (not _C.gemv_avx512_available())
    # on CPUs with AVX-512 the broadcast form takes 13-128 rows of any length (and more where the weights are large),
    # also where the environment switched it off for the run (SEQFAST_CPU_NO_AVX512_WT) once the config turns it on
    if _C.own_gemm_available():
        with cpp_config(avx512_wt=True):
            assert _C.cell_step_fused(1, 48, 100, 300)
            assert _C.cell_step_fused(4, 64, 512, 512)
            assert _C.cell_step_fused(4, 16, 600, 600)
            assert not _C.cell_step_fused(4, 256, 128, 128)
            # and its narrow form 7-8 rows (k 1200 too) and 13-15, where the dot-product form kept 9-12
            assert _C.cell_step_fused(4, 8, 600, 600) and _C.cell_step_fused(3, 7, 64, 64)
            assert _C.cell_step_fused(1, 13, 100, 300) and not _C.cell_step_fused(4, 10, 600, 600)
    with cpp_config(avx512_wt=False):
        _dot_product_range()


def _dot_product_range():
    # without the broadcast form: the packing form's many-row products, and rows too long for one pass of the summed
    # products (k 1200 > 1024), keep linear_out; the configuration switch turns it off
    assert not _C.cell_step_fused(1, 48, 100, 300)
    assert not _C.cell_step_fused(4, 8, 600, 600)
    # 64 rows of k 1024 (hidden 512) keep linear_out where one pass takes fewer rows (an A block is 3/8 of this core's
    # L2, as csrc/cpu/isa.cpp reads it: 48 rows from a 512 KB L2) and on CPUs whose AVX-512 GEMM takes 64+ rows (and
    # 32+ of rows no longer than 4 x their count)
    l2 = os.sysconf("SC_LEVEL2_CACHE_SIZE") if "SC_LEVEL2_CACHE_SIZE" in os.sysconf_names else 0
    l2 = l2 if (64 << 10) <= l2 <= (64 << 20) else 256 << 10
    if _C.own_gemm_available() or l2 * 3 // 8 // (1024 * 4) // 3 * 3 < 64:
        assert not _C.cell_step_fused(4, 64, 512, 512)
    with cpp_config(nt_cells=False):
        assert not _C.cell_step_fused(4, 8, 128, 128)
    assert _C.cell_step_fused(4, 8, 128, 128)


# (batch, input, hidden) of one-step nn.LSTM / GRU / RNN calls without grad that run on the cell entries
# (one_step_as_cell): 8 x 128 (the fused dot-product step), 5 x 130 -> 96 (a 2-row tile, k tails), one row (the GEMV
# cell; 137 -> 129: tails), 4 x 64 (the fewest rows routed); the layers of a stack see input size hidden (or 2 x hidden,
# bidirectional). 3 x 40: three rows stay on the layer.
ONE_STEP = [(8, 128, 128), (5, 130, 96), (1, 128, 128), (1, 137, 129), (4, 64, 64), (3, 40, 40)]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch,input_size,hidden", ONE_STEP)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch_first,state", [(False, False), (True, True)])
def test_one_step_layer_as_cell_matches_torch(kind, batch, input_size, hidden, layers, bidirectional, batch_first,
                                              state):
    import seqfast
    dirs = 2 if bidirectional else 1
    assert _C.one_step_as_cell(batch) == (batch not in (2, 3))
    torch.manual_seed(0)
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    ref = getattr(torch.nn, kind)(input_size, hidden, **kw).double()
    mod = getattr(seqfast.nn, kind)(input_size, hidden, **kw).eval()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 1, input_size) if batch_first else torch.randn(1, batch, input_size)
    lstm = kind == "LSTM"
    hx = None
    if state:
        hx = tuple(torch.randn(layers * dirs, batch, hidden) for _ in range(2 if lstm else 1))
    with torch.no_grad():
        want = ref(x.double(), None if hx is None else tuple(s.double() for s in hx) if lstm else hx[0].double())
        want = (want[0], *want[1]) if lstm else want
        for on in (True, False):
            with cpp_config(nt_cells=on):
                got = mod(x, None if hx is None else hx if lstm else hx[0])
            got = (got[0], *got[1]) if lstm else got
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.dtype == torch.float32
                torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-5)
            # the output and the final states do not share memory (torch's do not)
            assert got[0].data_ptr() != got[1].data_ptr()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_one_step_unbatched_and_repeated_calls_match_torch(kind):
    # an unbatched step (one row), then calls of other batches, hidden sizes and lengths without a state: the
    # per-thread zero state of rnn_module_inference (one-step calls and sequences) is rebuilt for each shape and never
    # written
    import seqfast
    torch.manual_seed(0)
    for hidden, shapes in ((24, [(1, 10), (1, 1, 10), (6, 1, 10), (1, 6, 10), (4, 10), (1, 1, 10)]),
                           (40, [(1, 5, 10), (3, 5, 10), (1, 10)])):
        ref = getattr(torch.nn, kind)(10, hidden).double()
        mod = getattr(seqfast.nn, kind)(10, hidden).eval()
        mod.load_state_dict(ref.state_dict())
        for shape in shapes:
            x = torch.randn(*shape)
            with torch.no_grad():
                got, want = mod(x), ref(x.double())
            for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert g.shape == w.shape
                torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-5)
            # writing into the returned tensors leaves the next call's zero state alone
            for g in torch.utils._pytree.tree_leaves(got):
                g.fill_(7.0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_RELU"])
@pytest.mark.parametrize("layers", [1, 3])
def test_one_step_states_of_every_form_match_torch(kind, layers):
    # the one-step route of a unidirectional stack (rnn_module_inference: one_step_layers) takes given states as
    # [layers, B, H] (unbatched [layers, H]) and writes its results through aliases of the returned tensors, each
    # layer reading the h_n of the one below; a state of another form (here a non-contiguous one) takes the general
    # route. Each against torch in float64, the output apart from h_n, batch_first and unbatched alike.
    import seqfast
    torch.manual_seed(0)
    name, kw = ("RNN", {"nonlinearity": "relu"}) if kind == "RNN_RELU" else (kind, {})
    lstm = kind == "LSTM"
    for batch_first in (False, True):
        ref = getattr(torch.nn, name)(12, 20, num_layers=layers, batch_first=batch_first, **kw).double()
        mod = getattr(seqfast.nn, name)(12, 20, num_layers=layers, batch_first=batch_first, **kw).eval()
        mod.load_state_dict(ref.state_dict())
        five = (5, 1, 12) if batch_first else (1, 5, 12)
        for x, state_shape in ((torch.randn(1, 12), (layers, 20)), (torch.randn(*five), (layers, 5, 20)),
                               (torch.randn(1, 1, 12), (layers, 1, 20))):
            wide = [torch.randn(*state_shape[:-1], 40) for _ in range(2)]
            for states in (None, [torch.randn(*state_shape) for _ in range(2)], [w[..., ::2] for w in wide]):
                hx = None if states is None else tuple(states) if lstm else states[0]
                with torch.no_grad():
                    got = mod(x, hx)
                    want = ref(x.double(), None if states is None else
                               tuple(s.double() for s in states) if lstm else states[0].double())
                for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                    assert g.shape == w.shape
                    torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-5)
                out, h = got[0], got[1][0] if lstm else got[1]
                assert out.data_ptr() != h[-1].data_ptr()
                out.fill_(7.0)  # the output and h_n are apart: h_n keeps its values
                torch.testing.assert_close(h.double(), (want[1][0] if lstm else want[1]), rtol=1e-5, atol=2e-5)


def test_one_step_rows_routed():
    # two or three rows stay on the layer loop (its 1-2 row step kernels)
    assert _C.one_step_as_cell(1) and _C.one_step_as_cell(4) and _C.one_step_as_cell(256)
    assert not _C.one_step_as_cell(2) and not _C.one_step_as_cell(3)
