"""The cells' backward products at a few rows in one pass over the weights (csrc/rnn/rnn_cell_products.h: dx, dh,
dW_ih, dW_hh and the bias gradients; the GRU's dh added onto its pointwise part) and the ATen / own-GEMM products past
its bound (B x G x (I + H) > 2^17 multiply-adds, or more than 8 rows), on the C++ backend, float32 and float64, against
float64 torch: every gradient, with every subset of the inputs requiring grad."""
import pytest
import torch

import seqfast
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")

CELLS = {"LSTMCell": 4, "GRUCell": 3, "RNNCell": 1}
# (batch, input, hidden): one pass for every cell (1 row; 8 rows), past the bound for LSTM / GRU only (8 x 40 x 60),
# past the rows (9)
SHAPES = [(1, 7, 33), (8, 20, 24), (8, 40, 60), (9, 5, 6)]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("needs", ["all", "input", "params"])
def test_cell_backward_products(cell, shape, dtype, needs):
    torch.manual_seed(sum(shape))
    B, I, H = shape
    ref = getattr(torch.nn, cell)(I, H).double()
    ours = getattr(seqfast.nn, cell)(I, H).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    xs, xr = x.to(dtype, copy=True).requires_grad_(needs != "params"), x.clone().requires_grad_(needs != "params")
    hs, hr = h.to(dtype, copy=True).requires_grad_(needs == "all"), h.clone().requires_grad_(needs == "all")
    state_s = (hs, h.flip(0).to(dtype)) if cell == "LSTMCell" else hs
    state_r = (hr, h.flip(0)) if cell == "LSTMCell" else hr
    for p in ours.parameters():
        p.requires_grad_(needs != "input")
    for p in ref.parameters():
        p.requires_grad_(needs != "input")
    with seqfast.use_backend("cpp"):
        out = ours(xs, state_s)
    out_r = ref(xr, state_r)
    out, out_r = (out, out_r) if cell == "LSTMCell" else ((out,), (out_r,))
    grads = [torch.randn_like(o) for o in out_r]
    torch.autograd.backward(out, [g.to(dtype) for g in grads])
    torch.autograd.backward(out_r, grads)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    pairs = [(xs, xr), (hs, hr)] + list(zip(ours.parameters(), ref.parameters()))
    for a, b in pairs:
        assert (a.grad is None) == (b.grad is None)
        if b.grad is not None:
            torch.testing.assert_close(a.grad.double(), b.grad, **tol)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_backward_products_gradcheck(cell):
    """float64 gradcheck of the C++ path at 3 rows (the one-pass products)."""
    torch.manual_seed(3)
    mod = getattr(seqfast.nn, cell)(4, 5).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, h, *params):
        names = [n for n, _ in mod.named_parameters()]
        state = (h, h * 0.5) if cell == "LSTMCell" else h
        with seqfast.use_backend("cpp"):
            out = torch.func.functional_call(mod, dict(zip(names, params)), (x, state))
        return out if cell != "LSTMCell" else out[0] + out[1]

    assert torch.autograd.gradcheck(f, (x, h, *[p.detach().requires_grad_() for p in mod.parameters()]))
