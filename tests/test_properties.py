"""Property-based parity with torch (hypothesis): drawn ops x shapes (0, 1 and odd sizes) x module options x memory
layouts (strided, expanded, transposed, offset views) x dtypes x backends, each compared with torch.nn on the same
tensors: outputs and gradients, or, for bad input, the same exception type.

The draws are derandomized (the same cases every run, so CI is reproducible); set SEQFAST_HYPOTHESIS=random to
explore new ones. Inputs that could crash a process (inconsistent PackedSequence batch_sizes, NaN placement, wrong
mask shapes) run in tests/test_adversarial.py, in a child process.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from conftest import HAVE_TRITON

_RANDOM = os.environ.get("SEQFAST_HYPOTHESIS") == "random"


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=not _RANDOM, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# tolerance against float64 torch on the same rounded values
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _backends(dtype, small):
    out = ["cpp", "reference", "torch", None]  # None: chosen by device, as a user gets it
    if HAVE_TRITON and dtype == torch.float32 and small:
        out.append("triton")
    return out


# ---------------------------------------------------------------------------------------------------- layouts
LAYOUTS = ["contiguous", "strided", "transposed", "offset"]


def _relayout(t, how):
    """The same values in another memory layout: every element equal, strides or storage offset different."""
    if how == "strided" and t.dim() >= 1 and t.numel() > 0:
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "offset":
        flat = torch.zeros(t.numel() + 3, dtype=t.dtype)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    return t


def _params(draw, module, dtype):
    """The module's parameters in float64 (torch's side) and in ``dtype`` with drawn layouts (seqfast's side);
    biases may be expanded from one value (stride 0), as torch.func.functional_call can pass them."""
    ref, ours = {}, {}
    for name, p in module.named_parameters():
        value = p.detach().to(dtype)
        if name.startswith("bias") and draw(st.booleans()):
            value = value[:1].expand(value.shape)  # stride 0
        else:
            value = _relayout(value, draw(st.sampled_from(LAYOUTS)))
        ours[name] = value
        ref[name] = value.double()
    return ref, ours


def _grad_leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _compare(got, want, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=what)


def _run_both(make_torch, make_ours, backend, inputs_ref, inputs_ours, params_ref, params_ours, dtype, grad):
    """Calls torch (float64) and seqfast (``dtype`` on ``backend``) and compares outputs and, with ``grad``, the
    gradients of every input and parameter."""
    def flat(out):
        if isinstance(out, torch.nn.utils.rnn.PackedSequence):
            return [out.data]
        if isinstance(out, (tuple, list)):
            return [t for o in out for t in flat(o)]
        return [out] if isinstance(out, torch.Tensor) else []

    leaves_ref = _grad_leaves(list(params_ref.values()) + inputs_ref) if grad else None
    leaves_ours = _grad_leaves(list(params_ours.values()) + inputs_ours) if grad else None
    n = len(params_ref)
    if grad:
        params_ref = dict(zip(params_ref, leaves_ref[:n]))
        params_ours = dict(zip(params_ours, leaves_ours[:n]))
        inputs_ref, inputs_ours = leaves_ref[n:], leaves_ours[n:]
    want = flat(make_torch(params_ref, inputs_ref))
    with seqfast.use_backend(backend):
        got = flat(make_ours(params_ours, inputs_ours))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, dtype, f"output {i}")
        if grad:
            weights = [torch.randn_like(w) for w in want]
            gw = torch.autograd.grad(want, leaves_ref, weights, allow_unused=True)
            gg = torch.autograd.grad(got, leaves_ours, [w.to(dtype) for w in weights], allow_unused=True)
            for i, (g, w) in enumerate(zip(gg, gw)):
                if w is None:
                    assert g is None or not g.any(), f"gradient {i}"
                else:
                    _compare(g, w, dtype, f"gradient {i}")


# ---------------------------------------------------------------------------------------------------- cells
CELLS = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell"}


@_settings(200)
@given(data=st.data())
def test_cells_match_torch(data):
    draw = data.draw
    kind = draw(st.sampled_from(list(CELLS)))
    B, I, H = draw(st.integers(0, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    backend = draw(st.sampled_from(_backends(dtype, small=True)))
    kw = {"bias": draw(st.booleans())}
    if kind.startswith("rnn"):
        kw["nonlinearity"] = kind[4:]
    torch_cell = getattr(torch.nn, CELLS[kind])(I, H, **kw).double()
    our_cell = getattr(seqfast.nn, CELLS[kind])(I, H, **kw).to(dtype)
    params_ref, params_ours = _params(draw, torch_cell, dtype)
    unbatched = B == 1 and draw(st.booleans())
    shape = lambda *s: s[1:] if unbatched else s  # noqa: E731
    x = torch.randn(*shape(B, I), dtype=dtype)
    states = [] if draw(st.booleans()) else [torch.randn(*shape(B, H), dtype=dtype)
                                             for _ in range(2 if kind == "lstm" else 1)]
    inputs = [_relayout(t, draw(st.sampled_from(LAYOUTS))) for t in [x] + states]

    def call(module):
        def run(p, ins):
            hx = None if len(ins) == 1 else (tuple(ins[1:]) if kind == "lstm" else ins[1])
            return functional_call(module, p, (ins[0], hx))
        return run

    _run_both(call(torch_cell), call(our_cell), backend, [t.double() for t in inputs], inputs,
              params_ref, params_ours, dtype, grad=B > 0 and draw(st.booleans()))


# ---------------------------------------------------------------------------------------------------- sequences
SEQS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


@_settings(150)
@given(data=st.data())
def test_sequences_match_torch(data):
    draw = data.draw
    kind = draw(st.sampled_from(list(SEQS)))
    T, B, I, H = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kw = {"num_layers": draw(st.integers(1, 2)), "bidirectional": draw(st.booleans()),
          "batch_first": draw(st.booleans()), "bias": draw(st.booleans())}
    if kind.startswith("rnn"):
        kw["nonlinearity"] = kind[4:]
    if kind == "lstm" and H > 1 and draw(st.booleans()):
        kw["proj_size"] = draw(st.integers(1, H - 1))
    small = H <= 3 and T <= 2 and kw["num_layers"] == 1  # the Triton interpreter's time
    backend = draw(st.sampled_from(_backends(dtype, small)))
    torch_rnn = getattr(torch.nn, SEQS[kind])(I, H, **kw).double()
    our_rnn = getattr(seqfast.nn, SEQS[kind])(I, H, **kw).to(dtype)
    params_ref, params_ours = _params(draw, torch_rnn, dtype)
    form = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    x = torch.randn((B, T, I) if kw["batch_first"] else (T, B, I), dtype=dtype)
    lengths = None
    if form == "unbatched":
        x = x[0] if kw["batch_first"] else x[:, 0]
        B = None
    elif form == "packed":
        lengths = torch.tensor([draw(st.integers(1, T)) for _ in range(B)])
    dirs = 2 if kw["bidirectional"] else 1
    states = []
    if draw(st.booleans()):
        out_size = kw.get("proj_size") or H
        sizes = [out_size] + ([H] if kind == "lstm" else [])
        states = [torch.randn(*((kw["num_layers"] * dirs,) + (() if B is None else (B,)) + (s,)), dtype=dtype)
                  for s in sizes]
    inputs = [_relayout(t, draw(st.sampled_from(LAYOUTS))) for t in [x] + states]

    def call(module):
        def run(p, ins):
            inp = ins[0]
            if lengths is not None:
                inp = pack_padded_sequence(inp, lengths, batch_first=kw["batch_first"], enforce_sorted=False)
            hx = None if len(ins) == 1 else (tuple(ins[1:]) if kind == "lstm" else ins[1])
            return functional_call(module, p, (inp, hx))
        return run

    _run_both(call(torch_rnn), call(our_rnn), backend, [t.double() for t in inputs], inputs, params_ref, params_ours,
              dtype, grad=draw(st.booleans()))


# ---------------------------------------------------------------------------------------------------- attention
@_settings(150)
@given(data=st.data())
def test_sdpa_matches_torch(data):
    draw = data.draw
    N, Hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hk * draw(st.sampled_from([1, 2]))
    L, S = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    D, Dv = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    backend = draw(st.sampled_from(_backends(dtype, small=True)))
    q, k, v = torch.randn(N, Hq, L, D, dtype=dtype), torch.randn(N, Hk, S, D, dtype=dtype), \
        torch.randn(N, Hk, S, Dv, dtype=dtype)
    causal = draw(st.booleans())
    # torch's SDPA rejects an explicit mask together with is_causal on some of its paths: one or the other
    mask_kind = None if causal else draw(st.sampled_from([None, "bool", "float"]))
    mask = None
    if mask_kind is not None:
        shape = draw(st.sampled_from([(L, S), (N, 1, 1, S), (N, Hq, L, S), (1, S)]))
        mask = torch.rand(shape) > 0.3 if mask_kind == "bool" else torch.randn(shape, dtype=dtype)
    inputs = [_relayout(t, draw(st.sampled_from(LAYOUTS))) for t in (q, k, v)]
    kw = {"is_causal": causal, "enable_gqa": Hq != Hk}
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.1, 2.0))
    wide_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())

    def ref(p, ins):
        return torch.nn.functional.scaled_dot_product_attention(*ins, attn_mask=wide_mask, **kw)

    def ours(p, ins):
        return seqfast.functional.scaled_dot_product_attention(*ins, attn_mask=mask, **kw)

    # a row with every key masked: torch's math gives NaN there, seqfast 0 (its documented contract); not compared
    if mask is not None or causal:
        keep = torch.ones(L, S, dtype=torch.bool).tril() if causal else torch.ones(L, S, dtype=torch.bool)
        if mask is not None:
            allowed = (mask if mask.dtype == torch.bool else mask > float("-inf"))
            keep = keep & allowed
        if not keep.reshape(-1, L, S).any(-1).all():
            return
    _run_both(ref, ours, backend, [t.double() for t in inputs], inputs, {}, {}, dtype, grad=draw(st.booleans()))


# ---------------------------------------------------------------------------------------------------- bad input
BAD_CASES = ["cell_input_size", "cell_hidden_batch", "cell_w_hh_rows", "cell_bias_length", "seq_input_size",
             "seq_zero_length", "seq_state_dtype", "sdpa_mask_dtype", "sdpa_head_dims", "sdpa_mask_shape"]


def _bad_call(lib, case, n):
    """One bad call through ``lib`` (torch or seqfast), sizes from ``n``."""
    nn, F = (torch.nn, torch.nn.functional) if lib == "torch" else (seqfast.nn, seqfast.functional)
    B, I, H = n, n + 1, n + 2
    if case.startswith("cell"):
        torch.manual_seed(n)
        cell = torch.nn.LSTMCell(I, H)
        w_ih, w_hh, b_ih, b_hh = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
        x, h = torch.randn(B, I), torch.randn(B, H)
        cell_fn = torch._VF.lstm_cell if lib == "torch" else seqfast.functional.lstm_cell
        if case == "cell_input_size":
            return cell_fn(torch.randn(B, I + 1), (h, h), w_ih, w_hh, b_ih, b_hh)
        if case == "cell_hidden_batch":
            return cell_fn(x, (h[:B - 1], h[:B - 1]), w_ih, w_hh, b_ih, b_hh)
        if case == "cell_w_hh_rows":
            return cell_fn(x, (h, h), w_ih, w_hh[:-1], b_ih, b_hh)
        return cell_fn(x, (h, h), w_ih, w_hh, b_ih[:-1], b_hh)
    if case.startswith("seq"):
        rnn = nn.GRU(I, H)
        if case == "seq_input_size":
            return rnn(torch.randn(3, B, I + 1))
        if case == "seq_zero_length":
            return rnn(torch.randn(0, B, I))
        rnn = rnn.to(torch.bfloat16)
        return rnn(torch.randn(3, B, I, dtype=torch.bfloat16), torch.zeros(1, B, H))
    q = torch.randn(1, 2, n + 1, 4)
    if case == "sdpa_mask_dtype":
        return F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(n + 1, n + 1, dtype=torch.float64))
    if case == "sdpa_head_dims":
        return F.scaled_dot_product_attention(q, torch.randn(1, 2, n + 1, 5), q)
    return F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(n + 2, n + 1, dtype=torch.bool))


@_settings(40)
@given(case=st.sampled_from(BAD_CASES), n=st.integers(2, 5))
def test_bad_input_raises_like_torch(case, n):
    with pytest.raises(Exception) as expected:
        _bad_call("torch", case, n)
    with pytest.raises(expected.type):
        _bad_call("seqfast", case, n)
