"""Parity of seqfast's LSTMCell / GRUCell / RNNCell with torch.nn on every backend and dtype: outputs and the
gradients of the input, the states and all four parameter tensors."""
import pytest
import torch

import seqfast
from conftest import BACKEND_DTYPES, TOL, backend_device

CELLS = {
    "lstm": (seqfast.nn.LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (seqfast.nn.GRUCell, torch.nn.GRUCell, {}),
    "rnn_tanh": (seqfast.nn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (seqfast.nn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
}
# (batch, input_size, hidden_size): odd sizes, hidden 1/3/129, input != hidden, batch 1 and 0
SHAPES = [(1, 3, 1), (3, 5, 3), (2, 17, 129), (4, 16, 16), (0, 4, 5)]


def make_pair(kind, input_size, hidden_size, dtype, device, bias=True):
    ours_cls, torch_cls, kw = CELLS[kind]
    ref = torch_cls(input_size, hidden_size, bias=bias, **kw).to(torch.float64)
    ours = ours_cls(input_size, hidden_size, bias=bias, **kw)
    # our parameters are the reference's rounded to dtype; the reference then takes the same rounded values
    ours.load_state_dict(ref.state_dict())
    ours.to(device=device, dtype=dtype)
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), ours.parameters()):
            p_ref.copy_(p.double().cpu())
    return ours, ref


def run(module, x, state):
    out = module(x) if state is None else module(x, state)
    return out if isinstance(out, tuple) else (out,)


def leaf(t, device=None, dtype=None):
    return t.detach().to(device=device, dtype=dtype).requires_grad_(True)


def check_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_parity(kind, shape, backend, dtype, bias):
    batch, input_size, hidden_size = shape
    device = backend_device(backend)
    ours, ref = make_pair(kind, input_size, hidden_size, dtype, device, bias)
    x = torch.randn(batch, input_size, dtype=dtype, device=device)
    n_states = 2 if kind == "lstm" else 1
    states = [torch.randn(batch, hidden_size, dtype=dtype, device=device) for _ in range(n_states)]

    xs, ss = leaf(x), [leaf(s) for s in states]
    with seqfast.use_backend(backend):
        out = run(ours, xs, tuple(ss) if kind == "lstm" else ss[0])
    xr, sr = leaf(x, "cpu", torch.float64), [leaf(s, "cpu", torch.float64) for s in states]
    out_ref = run(ref, xr, tuple(sr) if kind == "lstm" else sr[0])

    for i, (a, b) in enumerate(zip(out, out_ref)):
        assert a.dtype == dtype and a.device.type == torch.device(device).type
        check_close(a, b.detach(), dtype, f"output {i}")
    # weight each output differently so every gradient path is distinguished
    grads = [torch.randn_like(o) for o in out_ref]
    torch.autograd.backward(out, [g.to(device=device, dtype=dtype) for g in grads])
    torch.autograd.backward(out_ref, grads)
    check_close(xs.grad, xr.grad, dtype, "grad input")
    for i, (s, r) in enumerate(zip(ss, sr)):
        check_close(s.grad, r.grad, dtype, f"grad state {i}")
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        check_close(p.grad, p_ref.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_only_one_output_used(kind, backend):
    """Backward with a gradient for h' only (c' unused / workspace ignored) matches torch."""
    device = backend_device(backend)
    ours, ref = make_pair(kind, 4, 6, torch.float32, device)
    x = torch.randn(3, 4, device=device)
    xs, xr = leaf(x), leaf(x, "cpu", torch.float64)
    with seqfast.use_backend(backend):
        out = run(ours, xs, None)[-1]
    run(ref, xr, None)[-1].sum().backward()
    out.sum().backward()
    check_close(xs.grad, xr.grad, torch.float32, "grad input")
