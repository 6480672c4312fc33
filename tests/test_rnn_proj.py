"""seqfast.nn.LSTM with proj_size on seqfast's projected layer (seqfast::lstm_proj_layer: csrc/rnn/rnn_sequence_proj.cpp
on CPU, float32 / float64) against torch.nn.LSTM: outputs, final states and every gradient for padded, packed
(sorted and unsorted, so reversed directions start rows late), batch_first, unbatched, bidirectional, two-layer,
bias-free and given-state calls; float64 gradcheck of the op itself; frozen parameters; create_graph gradients; and
the calls it leaves to torch's op (bfloat16, float16)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from seqfast.functional import _rnn_sequence
from seqfast.ops import rnn_sequence as ops

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}

CONFIGS = {
    "one_layer": dict(proj_size=3),
    "two_layers_bidirectional": dict(proj_size=3, num_layers=2, bidirectional=True),
    "no_bias_batch_first": dict(proj_size=2, bias=False, batch_first=True),
    "proj_1_hidden_17": dict(proj_size=1),
}


@pytest.fixture
def no_torch_lstm(monkeypatch):
    """torch's own LSTM op must not run: the call takes seqfast's layer."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch's LSTM op ran")
    monkeypatch.setitem(_rnn_sequence._NATIVE, "lstm", refuse)


def _pair(dtype, I=5, H=7, **kw):
    torch.manual_seed(0)
    if kw.get("proj_size") == 1:
        H = 17
    ref = torch.nn.LSTM(I, H, **kw).to(dtype)
    ours = seqfast.nn.LSTM(I, H, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _check(ref, ours, x, hx=None, lengths=None, dtype=torch.float64):
    """Outputs, final states and the gradients of x, of the given states and of every parameter."""
    batch_first = ref.batch_first
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    hr = ho = None
    if hx is not None:
        hr = tuple(t.clone().requires_grad_() for t in hx)
        ho = tuple(t.clone().requires_grad_() for t in hx)
    ir, io = xr, xo
    if lengths is not None:
        ir = pack_padded_sequence(xr, lengths, batch_first=batch_first, enforce_sorted=False)
        io = pack_padded_sequence(xo, lengths, batch_first=batch_first, enforce_sorted=False)
    out_r, (h_r, c_r) = ref(ir, hr)
    out_o, (h_o, c_o) = ours(io, ho)
    if lengths is not None:
        out_r, out_o = out_r.data, out_o.data
    for got, want in ((out_o, out_r), (h_o, h_r), (c_o, c_r)):
        torch.testing.assert_close(got, want, **TOL[dtype])
    torch.manual_seed(1)
    grads = [torch.randn_like(t) for t in (out_r, h_r, c_r)]
    torch.autograd.backward([out_r, h_r, c_r], grads)
    torch.autograd.backward([out_o, h_o, c_o], grads)
    torch.testing.assert_close(xo.grad, xr.grad, **TOL[dtype])
    if hx is not None:
        for a, b in zip(ho, hr):
            torch.testing.assert_close(a.grad, b.grad, **TOL[dtype])
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL[dtype], msg=name)
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torch(config, packed, dtype, no_torch_lstm):
    kw = CONFIGS[config]
    ref, ours = _pair(dtype, **kw)
    T, B = 6, 4
    x = torch.randn(B, T, 5, dtype=dtype) if kw.get("batch_first") else torch.randn(T, B, 5, dtype=dtype)
    _check(ref, ours, x, lengths=torch.tensor([6, 2, 5, 1]) if packed else None, dtype=dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_given_states_and_frozen_parameters(packed, no_torch_lstm):
    ref, ours = _pair(torch.float64, proj_size=3, num_layers=2, bidirectional=True)
    for m in (ref, ours):
        m.weight_ih_l0.requires_grad_(False)
        m.weight_hr_l1_reverse.requires_grad_(False)
        m.bias_hh_l1.requires_grad_(False)
    H = ref.hidden_size
    hx = (torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(4, 3, H, dtype=torch.float64))
    _check(ref, ours, torch.randn(5, 3, 5, dtype=torch.float64), hx=hx,
           lengths=torch.tensor([5, 3, 1]) if packed else None)


def test_unbatched_input(no_torch_lstm):
    ref, ours = _pair(torch.float64, proj_size=2)
    x = torch.randn(6, 5, dtype=torch.float64)
    (out_r, (h_r, c_r)), (out_o, (h_o, c_o)) = ref(x), ours(x)
    assert out_o.shape == out_r.shape == (6, 2) and h_o.shape == h_r.shape == (1, 2) and c_o.shape == (1, 7)
    for got, want in ((out_o, out_r), (h_o, h_r), (c_o, c_r)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_no_grad_matches_torch(no_torch_lstm):
    ref, ours = _pair(torch.float32, proj_size=3, num_layers=2)
    x = torch.randn(7, 3, 5)
    with torch.no_grad():
        (out_r, (h_r, c_r)), (out_o, (h_o, c_o)) = ref(x), ours(x)
    for got, want in ((out_o, out_r), (h_o, h_r), (c_o, c_r)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("batch_sizes", [[3, 3, 3], [3, 2, 2, 1], [2, 1]], ids=["padded", "packed", "short_first"])
def test_cpp_op_gradcheck_float64(batch_sizes, reverse):
    """The C++ op's backward against finite differences, every input (h0 of 3 rows where the first step has 2 leaves
    row 2 at its initial state)."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    bs = torch.tensor(batch_sizes)
    N, B, I, H, P = int(bs.sum()), 3, 4, 5, 2
    args = (torch.randn(N, I, **d), bs, torch.randn(B, P, **d), torch.randn(B, H, **d), torch.randn(4 * H, I, **d),
            torch.randn(4 * H, P, **d), torch.randn(4 * H, **d), torch.randn(4 * H, **d), torch.randn(P, H, **d),
            reverse)
    with seqfast.use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda *a: ops.lstm_proj_layer(*a)[:3], args)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_create_graph_gradients_match_torch(backend):
    """A gradient penalty through the projected layer: the first-order gradients (create_graph=True) and the
    penalty's gradients equal torch's."""
    ref, ours = _pair(torch.float64, proj_size=3)
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        with seqfast.use_backend(backend):
            out = m(xi)[0]
        g, = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        penalty = torch.autograd.grad(g.square().sum(), [xi, m.weight_hr_l0])
        results.append((g, *penalty))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_runs_torchs_op(dtype):
    """No projected kernel in half precision: torch's own op runs, so the results are torch's, bit for bit."""
    ref, ours = _pair(dtype, proj_size=3)
    x = torch.randn(5, 2, 5).to(dtype)
    (out_r, (h_r, c_r)), (out_o, (h_o, c_o)) = ref(x), ours(x)
    for got, want in ((out_o, out_r), (h_o, h_r), (c_o, c_r)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_reference_backend_matches_torch(packed):
    """The op's plain-PyTorch oracle (SEQFAST_BACKEND=reference), forward and backward, against torch.nn."""
    ref, ours = _pair(torch.float64, proj_size=3, bidirectional=True)
    with seqfast.use_backend("reference"):
        _check(ref, ours, torch.randn(6, 4, 5, dtype=torch.float64),
               lengths=torch.tensor([6, 2, 5, 1]) if packed else None)


@pytest.mark.parametrize("steps", [1, 2])
def test_saved_weight_hh_as_torch(steps):
    """W_hh changed in place after the forward: torch's per-step graph minds it only where a gradient goes through
    a state (a second step); at one step from a zero state both return the same gradients."""
    ref, ours = _pair(torch.float64, proj_size=2)
    outcomes = []
    for m in (ref, ours):
        x = torch.randn(steps, 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        loss = m(x)[0].sum()
        with torch.no_grad():
            m.weight_hh_l0.mul_(0.5)
        try:
            outcomes.append(torch.autograd.grad(loss, [x, m.weight_ih_l0, m.weight_hr_l0]))
        except RuntimeError as e:
            outcomes.append(type(e))
        with torch.no_grad():
            m.weight_hh_l0.mul_(2)
    if steps == 2:
        assert outcomes == [RuntimeError, RuntimeError]
    else:
        for got, want in zip(outcomes[1], outcomes[0]):
            torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_batch_rows_of_the_broadcast_products(bidirectional, no_torch_lstm):
    """float32 steps of 7-8 and 13-24 rows, where each step's products read the weights in place (gemm::wt_takes):
    a packed batch of 24 shrinking to 1, so the steps' row counts cross every range, in both directions."""
    ref, ours = _pair(torch.float32, I=9, H=40, proj_size=12, bidirectional=bidirectional)
    lengths = torch.tensor([9] * 8 + [8] * 5 + [6] * 6 + [3, 3, 2, 1, 1])
    x = torch.randn(9, 24, 9)
    _check(ref, ours, x, lengths=lengths, dtype=torch.float32)
    _check(ref, ours, x[:, :16], dtype=torch.float32)
