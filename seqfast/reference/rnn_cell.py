"""Plain PyTorch LSTM / GRU / Elman RNN cells: the readable math of seqfast's fused cell kernels and their oracle.

Each op is a (forward, backward) pair with the same signature on every backend (seqfast._C, seqfast.kernels.rnn_cell,
this module): the forward returns its outputs plus the workspace its backward needs; the backward takes the output
gradients (always defined) and returns every input gradient. Gate order as torch.nn: LSTM (i, f, g, o), GRU (r, z, n).
"""
import torch
import torch.nn.functional as F


def _w(w, like):
    """A weight or bias (or None) in ``like``'s dtype: a bfloat16 step of batch 1-16 hands the kernels bfloat16
    weights and biases under float32 activations (seqfast._rules.bf16_weights_in_place); the math here runs in the
    activations' dtype."""
    return w if w is None or w.dtype == like.dtype else w.to(like.dtype)


def lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh):
    pre = F.linear(x, _w(w_ih, x), _w(b_ih, x)) + F.linear(hx, _w(w_hh, x), _w(b_hh, x))
    i, f, g, o = pre.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy, torch.cat([i, f, g, o], 1)


def lstm_gate_grads(grad_hy, grad_cy, cx, gates, cy):
    """Pre-activation gate gradients [B, 4H] and the gradient of the previous cell state."""
    i, f, g, o = gates.chunk(4, 1)
    tc = cy.tanh()
    dc = grad_cy + grad_hy * o * (1 - tc * tc)
    dgates = torch.cat([dc * g * i * (1 - i), dc * cx * f * (1 - f), dc * i * (1 - g * g),
                        grad_hy * tc * o * (1 - o)], 1)
    return dgates, dc * f


def lstm_cell_backward(grad_hy, grad_cy, x, hx, cx, w_ih, w_hh, gates, cy):
    dgates, dcx = lstm_gate_grads(grad_hy, grad_cy, cx, gates, cy)
    return (dgates @ _w(w_ih, x), dgates @ _w(w_hh, x), dcx, (dgates.t() @ x).to(w_ih.dtype),
            (dgates.t() @ hx).to(w_hh.dtype), dgates.sum(0))


def gru_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh):
    xr, xz, xn = F.linear(x, _w(w_ih, x), _w(b_ih, x)).chunk(3, 1)
    hr, hz, hn = F.linear(hx, _w(w_hh, x), _w(b_hh, x)).chunk(3, 1)
    r = (xr + hr).sigmoid()
    z = (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    hy = (1 - z) * n + z * hx
    return hy, torch.cat([r, z, n, hn], 1)


def gru_gate_grads(grad_hy, hx, ws):
    """Gradients of the input-side [B, 3H] and hidden-side [B, 3H] gate pre-activations."""
    r, z, n, hn = ws.chunk(4, 1)
    dn = grad_hy * (1 - z) * (1 - n * n)
    dr = dn * hn * r * (1 - r)
    dz = grad_hy * (hx - n) * z * (1 - z)
    return torch.cat([dr, dz, dn], 1), torch.cat([dr, dz, dn * r], 1)


def gru_cell_backward(grad_hy, x, hx, w_ih, w_hh, ws):
    dx_gates, dh_gates = gru_gate_grads(grad_hy, hx, ws)
    z = ws.chunk(4, 1)[1]
    return (dx_gates @ _w(w_ih, x), dh_gates @ _w(w_hh, x) + grad_hy * z, (dx_gates.t() @ x).to(w_ih.dtype),
            (dh_gates.t() @ hx).to(w_hh.dtype), dx_gates.sum(0), dh_gates.sum(0))


def rnn_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh, relu):
    pre = F.linear(x, _w(w_ih, x), _w(b_ih, x)) + F.linear(hx, _w(w_hh, x), _w(b_hh, x))
    return pre.relu() if relu else pre.tanh()


def rnn_pre_grad(grad_hy, hy, relu):
    return grad_hy * (hy > 0).to(hy.dtype) if relu else grad_hy * (1 - hy * hy)


def rnn_cell_backward(grad_hy, x, hx, w_ih, w_hh, hy, relu):
    dpre = rnn_pre_grad(grad_hy, hy, relu)
    return (dpre @ _w(w_ih, x), dpre @ _w(w_hh, x), (dpre.t() @ x).to(w_ih.dtype), (dpre.t() @ hx).to(w_hh.dtype),
            dpre.sum(0))


# ----------------------------------------------------------------------------------------------------------------
