"""Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): seqfast's kernels carry no tangents, so inside a dual
level every seqfast op runs torch's own op (seqfast._backend.forced_backend() is "torch" there). The outputs and their
tangents are torch's, or the call raises torch's own error where torch's op has no forward derivative; none drops a
tangent. Outside the level the fast paths serve again."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import seqfast

MODULES = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}),
           ("LSTM", {}), ("GRU", {"num_layers": 2}), ("RNN", {"bidirectional": True})]


def _pair(kind, kw):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, 7, **kw)
    mod = getattr(seqfast.nn, kind)(5, 7, **kw)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _inputs(kind):
    if kind.endswith("Cell"):
        h = torch.randn(3, 7)
        return torch.randn(3, 5), ((h, torch.randn(3, 7)) if kind == "LSTMCell" else h)
    return torch.randn(4, 3, 5), None


def _primal_and_tangent(fn, x):
    """fn's first output and its tangent for x's tangent of ones, or the exception it raised."""
    try:
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(x, torch.ones_like(x)))
            out = out[0] if isinstance(out, tuple) else out
            primal, tangent = fwAD.unpack_dual(out)
            return primal.detach().clone(), None if tangent is None else tangent.clone()
    except Exception as e:  # noqa: BLE001 - compared with torch's below
        return e


def _same(got, want):
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want)
        return
    assert not isinstance(got, Exception), got
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,kw", MODULES)
@pytest.mark.parametrize("grad", [False, True])
def test_modules_carry_torchs_tangents(kind, kw, grad):
    ref, mod = _pair(kind, kw)
    x, hx = _inputs(kind)
    with torch.set_grad_enabled(grad):
        _same(_primal_and_tangent(lambda t: mod(t, hx), x), _primal_and_tangent(lambda t: ref(t, hx), x))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_and_multihead_attention_as_torch(grad, causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    with torch.set_grad_enabled(grad):
        _same(_primal_and_tangent(lambda t: seqfast.functional.scaled_dot_product_attention(t, k, v, is_causal=causal),
                                  q),
              _primal_and_tangent(lambda t: F.scaled_dot_product_attention(t, k, v, is_causal=causal), q))
        torch.manual_seed(1)
        ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        mod = seqfast.nn.MultiheadAttention(8, 2, batch_first=True)
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(2, 4, 8)
        _same(_primal_and_tangent(lambda t: mod(t, t, t), x), _primal_and_tangent(lambda t: ref(t, t, t), x))


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_func_jvp(kind):
    ref, mod = _pair(kind, {})
    x, hx = _inputs(kind)
    tangent = torch.randn_like(x)

    def first(m):
        return lambda t: (lambda out: out[0] if isinstance(out, tuple) else out)(m(t, hx))
    got = torch.func.jvp(first(mod), (x,), (tangent,))
    want = torch.func.jvp(first(ref), (x,), (tangent,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_fast_paths_serve_again_after_a_dual_level(no_grad_kernel_calls):
    ref, mod = _pair("LSTMCell", {})
    x, hx = _inputs("LSTMCell")
    with torch.no_grad():
        with fwAD.dual_level():
            mod(fwAD.make_dual(x, torch.ones_like(x)), hx)
            mod(x, hx)  # no tangent anywhere, inside the level: torch's op still
        assert no_grad_kernel_calls == []
        got = mod(x, hx)
        assert no_grad_kernel_calls == ["lstm_cell"]  # the module's C++ step, not one built for torch's op
        for g, w in zip(got, ref(x, hx)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["lstm_cell", "gru_cell", "rnn_cell"])
def test_forced_torch_backend_runs_torchs_cell_op_without_grad(family):
    """use_backend("torch") runs torch's op, no-grad steps included (they ran seqfast's kernel before)."""
    torch.manual_seed(0)
    gates = {"lstm_cell": 4, "gru_cell": 3, "rnn_cell": 1}[family]
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    weights = (torch.randn(gates * 7, 5), torch.randn(gates * 7, 7), torch.randn(gates * 7), torch.randn(gates * 7))
    hx = (h, torch.randn(3, 7)) if family == "lstm_cell" else h
    want = getattr(torch._VF, family if family != "rnn_cell" else "rnn_tanh_cell")(x, hx, *weights)
    with seqfast.use_backend("torch"), torch.no_grad():
        got = getattr(seqfast.functional, family)(x, hx, *weights)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
