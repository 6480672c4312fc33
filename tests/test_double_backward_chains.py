"""Gradients taken with create_graph=True (a gradient penalty, a Hessian-vector product) through graphs where one
input of a seqfast op depends on another: an unrolled cell (h_t depends on x and the weights), a decoder that calls
nn.GRU one token per step, attention whose keys come from the query. A differentiable backward must return partial
derivatives; one that differentiated a recomputed forward with respect to the saved inputs themselves returned total
ones (0.3-10 off torch here, with gradgradcheck still passing: it is consistent with itself). Compared with torch.nn."""
import pytest
import torch

import seqfast

from conftest import CELL_KINDS, cell_pair, cell_states, flat_outputs

TOL = dict(rtol=1e-4, atol=1e-5)
PATHS = [None, "cpp", "reference"]  # the C++ node (module call), the Python autograd op, the reference


def _context(path):
    return seqfast.use_backend(path) if path else torch.enable_grad()


def _unrolled(module, kind, x, state, steps=3):
    """steps calls of a cell on the same x, each on the state the previous returned; the sum of every output."""
    total = 0
    for _ in range(steps):
        state = module(x, state)
        total = total + sum(o.sum() for o in flat_outputs(state))
    return total


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,kw", CELL_KINDS)
def test_unrolled_cell_first_and_second_order(kind, kw, dtype, path):
    ref, mod = cell_pair(kind, kw, dtype=dtype)
    x = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    state = cell_states(kind, 4, dtype=dtype)
    results = []
    for module in (ref, mod):
        with _context(path if module is mod else None):
            params = [x, *module.parameters()]
            grads = torch.autograd.grad(_unrolled(module, kind, x, state), params, create_graph=True)
            # a Hessian-vector product: d/d(params) of <grads, v>
            v = [torch.ones_like(g) for g in grads]
            hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params, allow_unused=True)
        results.append([g.detach() for g in grads] + [h for h in hvp if h is not None])
    assert len(results[0]) == len(results[1])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **TOL)


def test_one_token_gru_decoder_penalty():
    """nn.GRU called one token per step in training (recorded as C++ cell steps), a gradient penalty on the input."""
    ref = torch.nn.GRU(4, 6)
    mod = seqfast.nn.GRU(4, 6)
    mod.load_state_dict(ref.state_dict())
    xs = torch.randn(3, 1, 2, 4, requires_grad=True)
    out = []
    for module in (ref, mod):
        h, total = None, 0
        for t in range(3):
            y, h = module(xs[t], h)
            total = total + y.square().sum()
        (gx,) = torch.autograd.grad(total, xs, create_graph=True)
        out.append([gx.detach()] + list(torch.autograd.grad(gx.square().sum(), list(module.parameters()))))
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, **TOL)


def _math_attention(q, k, v):
    """torch's math formula (its CPU flash kernel has no double backward)."""
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("path", PATHS)
def test_attention_keys_from_the_query(path):
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    v = torch.randn(2, 3, 5, 8, requires_grad=True)
    out = []
    for fn, ctx in ((_math_attention, None),
                    (seqfast.functional.scaled_dot_product_attention, path)):
        with _context(ctx):
            y = fn(q, q * 0.5 + 1, v)
            gq, gv = torch.autograd.grad(y.square().sum(), (q, v), create_graph=True)
            out.append([gq.detach(), gv.detach(), *torch.autograd.grad((gq.sum() + gv.square().sum()), (q, v))])
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("path", PATHS)
def test_fully_masked_row_second_order_is_finite(path):
    """A query row that sees no key (output 0): the create_graph backward differentiates the reference, whose
    logsumexp over an all -inf row had a NaN gradient that reached dq and dk."""
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (3, 4, 4))
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    with _context(path):
        y = seqfast.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        first = torch.autograd.grad(y.square().sum(), (q, k, v), create_graph=True)
        plain = torch.autograd.grad(seqfast.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                                    .square().sum(), (q, k, v))
        second = torch.autograd.grad(sum(g.square().sum() for g in first), (q, k, v))
    for got, want in zip(first, plain):
        torch.testing.assert_close(got.detach(), want, **TOL)
    assert all(torch.isfinite(g).all() for g in second)


def test_multihead_attention_padding_sample_penalty_is_finite():
    mha = seqfast.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8, requires_grad=True)
    pad = torch.tensor([[False, False, False], [True, True, True]])  # the second sample is all padding
    out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    grads = torch.autograd.grad(gx.square().sum(), [x, mha.in_proj_weight])
    assert torch.isfinite(gx).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", [None, "reference"])
def test_input_changed_in_place_raises_before_a_create_graph_backward(path):
    """The create_graph backward recomputes from the inputs' values: one changed in place since the forward raises
    torch's error (torch raises for this call too) instead of giving wrong gradients."""
    m = seqfast.nn.LSTM(4, 5)
    x = torch.randn(3, 2, 4, requires_grad=True)
    h0, c0 = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    with _context(path):
        out, (h, c) = m(x, (h0, c0))
    h0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum() + h.sum(), x, create_graph=True)
