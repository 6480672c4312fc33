"""The AVX-512 small-batch GEMV of CPUs with AVX-512 (csrc/cpu/gemv_avx512.h: 16 accumulators per tile of 16 / nb'
weight rows, one reduction tree), through its test binding seqfast._C.gemv_f32 and the entries that take it (float32
cell steps at small batch, their backward's transposed product, 1-2 row time loops): parity with float64 on every
partial tile (weight rows % 16, % 8, % 4), every batch group (1, 2, 3 and 4 rows, and 5-16 in groups of 4), k of 1,
odd and past one vector, two products summed, accumulation onto y; and torch's results with the form switched off
(config avx512_gemv)."""
import pytest
import torch

from seqfast import _ext

from conftest import cpp_config, team_config

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.gemv_avx512_available(),
                                reason="seqfast._C not built, or the AVX-512 GEMV does not run on this CPU")

# (B, N, K1, K2): every batch group; N with each remainder of the 16-, 8- and 4-row tiles; K of 1, below one vector,
# odd, exact vectors and past them; K2 0 = one product.
SHAPES = [(1, 1, 1, 0), (1, 15, 7, 0), (1, 16, 16, 16), (1, 33, 100, 3), (2, 7, 17, 0), (2, 9, 64, 31),
          (3, 5, 5, 5), (3, 13, 48, 0), (4, 4, 129, 0), (4, 21, 33, 65), (5, 17, 19, 0), (7, 31, 64, 64),
          (8, 40, 257, 0), (13, 6, 16, 3), (16, 50, 300, 17)]


@pytest.mark.parametrize("B,N,K1,K2", SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemv_parity(B, N, K1, K2, accumulate):
    torch.manual_seed(B * 100 + N)
    x1, w1 = torch.randn(B, K1), torch.randn(N, K1)
    x2, w2 = (torch.randn(B, K2), torch.randn(N, K2)) if K2 else (None, None)
    ref = x1.double() @ w1.double().t()
    if K2:
        ref += x2.double() @ w2.double().t()
    y = torch.randn(B, N) if accumulate else None
    if accumulate:
        ref += y.double()
    out = _C.gemv_f32(x1, w1, x2, w2, y)
    assert out.shape == (B, N) and out.dtype == torch.float32
    if accumulate:
        assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * max(1, K1 + K2) ** 0.5)


def test_gemv_errors():
    with pytest.raises(RuntimeError, match="gemv_f32"):
        _C.gemv_f32(torch.randn(2, 4), torch.randn(5, 6))
    with pytest.raises(RuntimeError, match="gemv_f32"):
        _C.gemv_f32(torch.randn(2, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x2 and w2"):
        _C.gemv_f32(torch.randn(2, 4), torch.randn(5, 4), torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="y must be"):
        _C.gemv_f32(torch.randn(2, 4), torch.randn(5, 4), None, None, torch.randn(5, 2))
    with cpp_config(avx512_gemv=False):
        assert not _C.gemv_avx512_available()
        with pytest.raises(RuntimeError, match="switched off"):
            _C.gemv_f32(torch.randn(2, 4), torch.randn(5, 4))


_CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}


@pytest.mark.parametrize("kind", sorted(_CELLS))
@pytest.mark.parametrize("batch,input_size,hidden", [(1, 5, 17), (2, 33, 16), (3, 16, 40), (4, 64, 64),
                                                     (7, 9, 130)])
@pytest.mark.parametrize("on", [True, False], ids=["avx512_gemv", "avx2_gemv"])
def test_cell_steps_match_torch(kind, batch, input_size, hidden, on, no_rules):
    # the cells' small-batch products (forward x W_ih^T + h W_hh^T, backward dg W) on either form: float64 torch's
    # outputs and gradients (no rule table: seqfast's own op records the training step)
    _check_cell(kind, batch, input_size, hidden, avx512_gemv=on)


@pytest.mark.parametrize("kind", sorted(_CELLS))
@pytest.mark.parametrize("batch,input_size,hidden", [(1, 5, 17), (3, 16, 40), (4, 64, 130)])
def test_cell_steps_on_a_team_match_torch(kind, batch, input_size, hidden, no_rules, two_threads):
    # on the AVX-512 GEMV a step takes a team only from 1.5 x par_min_work weights (rnn_cell.cpp: gemv_work); with
    # par_min_work 1, these small steps split their units over two threads
    _check_cell(kind, batch, input_size, hidden, team=True, avx512_gemv=True)


def _check_cell(kind, batch, input_size, hidden, team=False, **config):
    import seqfast
    torch.manual_seed(batch + hidden)
    ref = _CELLS[kind](input_size, hidden).double()
    ours = getattr(seqfast.nn, type(ref).__name__)(input_size, hidden)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, input_size, dtype=torch.float64, requires_grad=True)
    h = torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True)
    state = (h, torch.randn(batch, hidden, dtype=torch.float64)) if kind == "lstm" else h
    state32 = tuple(s.detach().float() for s in state) if kind == "lstm" else h.detach().float()
    with (team_config if team else cpp_config)(**config), seqfast.use_backend("cpp"):
        with torch.no_grad():
            got = ours(x.detach().float(), state32)
        x32 = x.detach().float().requires_grad_()
        h32 = (state32[0] if kind == "lstm" else state32).clone().requires_grad_()
        out = ours(x32, (h32, state32[1]) if kind == "lstm" else h32)
        (out[0] if kind == "lstm" else out).sum().backward()
    want = ref(x, state)
    first = (lambda o: o[0]) if kind == "lstm" else (lambda o: o)
    torch.testing.assert_close(first(got).double(), first(want), rtol=1e-5, atol=1e-5)
    first(want).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h32.grad.double(), h.grad, rtol=1e-5, atol=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad.double(), getattr(ref, name).grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch", [1, 2])
def test_small_batch_layers_match_torch(kind, batch, no_rules):
    # 1-2 row time loops (the GRU / RNN steps' GEMV, the backward's transposed products) on either form
    import seqfast
    torch.manual_seed(batch)
    ref = getattr(torch.nn, kind)(24, 40).double()
    ours = getattr(seqfast.nn, kind)(24, 40)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, batch, 24, dtype=torch.float64)
    want = ref(x)[0]
    for on in (True, False):
        with cpp_config(avx512_gemv=on), seqfast.use_backend("cpp"):
            x32 = x.float().requires_grad_()
            out = ours(x32)[0]
            out.sum().backward()
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        ours.zero_grad()
