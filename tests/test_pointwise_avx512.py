"""The float32 Elman RNN, LSTM and GRU rows' updates on AVX-512 (csrc/cpu/pointwise_avx512.h: tanh / relu of the
pre-activations plus biases; the LSTM and GRU cell updates) against float64 torch, with the AVX2 forms (config avx512_pointwise
off) beside them: cells and layers, tanh and relu, hidden sizes off the 16-lane vector (tail masks), NaN and infinities
as torch propagates them."""
import pytest
import torch

import seqfast
from conftest import cpp_config
from seqfast import _ext

C = _ext.module()
pytestmark = [pytest.mark.skipif(C is None or not C.has_avx512(), reason="the AVX-512 form runs on CPUs with AVX-512"),
              pytest.mark.usefixtures("no_rules")]


def _pair(cls, *args, **kw):
    ours = getattr(seqfast.nn, cls)(*args, **kw)
    ref = getattr(torch.nn, cls)(*args, **kw).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


KINDS = [("tanh", {"nonlinearity": "tanh"}), ("relu", {"nonlinearity": "relu"}), ("GRU", {})]


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("batch,hidden", [(1, 37), (5, 16), (64, 64), (3, 130)])
def test_cell_against_float64_torch(on, kind, kw, batch, hidden):
    torch.manual_seed(batch * hidden)
    ours, ref = _pair("GRUCell" if kind == "GRU" else "RNNCell", 11, hidden, **kw)
    x, h = torch.randn(batch, 11, requires_grad=True), torch.randn(batch, hidden, requires_grad=True)
    with cpp_config(avx512_pointwise=on):
        with torch.no_grad():
            got_nograd = ours(x, h)
        got = ours(x, h)
        got.sum().backward()
    x64, h64 = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    want = ref(x64, h64)
    want.sum().backward()
    torch.testing.assert_close(got_nograd.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("batch,hidden", [(1, 37), (8, 64), (20, 100)])
def test_layer_both_forms_agree(kind, kw, batch, hidden):
    torch.manual_seed(hidden)
    ours, ref = _pair("GRU" if kind == "GRU" else "RNN", 7, hidden, num_layers=2, **kw)
    x = torch.randn(5, batch, 7)
    with torch.no_grad():
        outs = []
        for on in (True, False):
            with cpp_config(avx512_pointwise=on):
                outs.append(ours(x))
    want = ref(x.double())
    if kind != "relu":  # two exp polynomials: some last bits differ, so each form ran
        assert not torch.equal(outs[0][0], outs[1][0])
    for out, hn in outs:
        torch.testing.assert_close(out.double(), want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hn.double(), want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nan_and_infinities(nonlinearity):
    torch.manual_seed(0)
    ours, ref = _pair("RNNCell", 4, 19, nonlinearity=nonlinearity)
    with torch.no_grad():
        ours.bias_ih[3] = float("nan")
        ours.bias_ih[5] = float("inf")
        ours.bias_ih[17] = -float("inf")
        ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
        x, h = torch.randn(3, 4), torch.randn(3, 19)
        with cpp_config(avx512_pointwise=True):
            got = ours(x, h)
    want = ref(x.double(), h.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[:, 3].isnan().all() and (got[:, 5] == (1 if nonlinearity == "tanh" else float("inf"))).all()
    assert (got[:, 17] == (-1 if nonlinearity == "tanh" else 0)).all()


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("batch,hidden", [(1, 37), (5, 16), (64, 64), (3, 130)])
def test_lstm_cell_against_float64_torch(on, batch, hidden):
    torch.manual_seed(batch + hidden)
    ours, ref = _pair("LSTMCell", 11, hidden)
    x = torch.randn(batch, 11, requires_grad=True)
    h, c = torch.randn(batch, hidden, requires_grad=True), torch.randn(batch, hidden, requires_grad=True)
    with cpp_config(avx512_pointwise=on):
        with torch.no_grad():
            got_nograd = ours(x, (h, c))
        got = ours(x, (h, c))
        (got[0].sum() + 2 * got[1].sum()).backward()
    x64, h64, c64 = (t.detach().double().requires_grad_() for t in (x, h, c))
    want = ref(x64, (h64, c64))
    (want[0].sum() + 2 * want[1].sum()).backward()
    for g, n, w in zip(got, got_nograd, want):
        torch.testing.assert_close(n.double(), w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    for a, b in ((x, x64), (h, h64), (c, c64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-4)


def test_lstm_nan_and_infinities():
    torch.manual_seed(1)
    ours, ref = _pair("LSTMCell", 4, 19)
    with torch.no_grad():
        ours.bias_ih[3] = float("nan")  # gate i of unit 3
        ours.bias_ih[19 + 5] = float("inf")  # gate f of unit 5: saturates to 1
        ours.bias_ih[2 * 19 + 17] = -float("inf")  # gate g of unit 17: -1
        ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
        x, h, c = torch.randn(3, 4), torch.randn(3, 19), torch.randn(3, 19)
        with cpp_config(avx512_pointwise=True):
            got = ours(x, (h, c))
    want = ref(x.double(), (h.double(), c.double()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[1][:, 3].isnan().all()

