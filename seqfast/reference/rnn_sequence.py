"""Plain PyTorch recurrences of one layer in one direction over a whole sequence (the math of seqfast's fused
sequence kernels, and their oracle).

Time-major packed layout (PackedSequence's): x [N, I] holds step t in rows [off_t, off_t + bs_t) with
bs = batch_sizes (non-increasing); only rows b < bs_t run at step t, the others keep their state, so the state at
the end is each row's final state. Padded input is bs_t = B for every t. reverse walks t from T-1 down to 0 (a row
then starts from h0 at its own last step).
"""
import torch
import torch.nn.functional as F

from .rnn_cell import gru_gate_grads, lstm_gate_grads, rnn_pre_grad


def _steps(batch_sizes, reverse):
    """(t, first row, batch size) in processing order."""
    sizes = [int(b) for b in batch_sizes]
    offsets = [0]
    for b in sizes[:-1]:
        offsets.append(offsets[-1] + b)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    return [(t, offsets[t], sizes[t]) for t in order]


def _prev_states(out, h0, batch_sizes, reverse):
    """The state each packed row started its step from: [N, H] (previous step's output, or h0)."""
    prev = torch.empty_like(out)
    last = None  # (first row, size) of the previously processed step
    for t, off, bs in _steps(batch_sizes, reverse):
        if last is None:
            prev[off:off + bs] = h0[:bs]
        else:
            carried = min(bs, last[1])
            prev[off:off + carried] = out[last[0]:last[0] + carried]
            prev[off + carried:off + bs] = h0[carried:bs]
        last = (off, bs)
    return prev


def _run_layer(x_proj, batch_sizes, states, step, reverse):
    """Drives ``step(pre_x_rows, [state[:bs] ...]) -> (new states, extras)`` over time; returns per-step pieces in
    time order plus the final states. No in-place writes, so autograd can differentiate it."""
    T = len(batch_sizes)
    pieces = [None] * T
    for t, off, bs in _steps(batch_sizes, reverse):
        new, extras = step(x_proj[off:off + bs], [s[:bs] for s in states])
        states = [torch.cat([n, s[bs:]]) for n, s in zip(new, states)]
        pieces[t] = (new, extras)
    return pieces, states


def lstm_layer_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, w_hr=None):
    """Returns (out [N, H_out], hn, cn, gates [N, 4H], cs [N, H]); w_hr: the LSTM projection (proj_size)."""
    def step(px, state):
        h, c = state
        pre = px + F.linear(h, w_hh, b_hh)
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        if w_hr is not None:
            h = h @ w_hr.t()
        return [h, c], [torch.cat([i, f, g, o], 1)]

    pieces, (hn, cn) = _run_layer(F.linear(x, w_ih, b_ih), batch_sizes, [h0, c0], step, reverse)
    return (_cat(pieces, 0, 0, h0), hn, cn, _cat(pieces, 1, 0, x, 4 * c0.shape[1]), _cat(pieces, 0, 1, c0))


def lstm_proj_layer_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """The LSTM layer with a projection (proj_size): returns (out [N, P], hn [B, P], cn [B, H], gates [N, 4H],
    cs [N, H], hs [N, H] = o tanh(c), the unprojected h each step's projection reads)."""
    out, hn, cn, gates, cs = lstm_layer_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, w_hr=w_hr)
    return out, hn, cn, gates, cs, gates[:, 3 * cs.shape[1]:] * cs.tanh()


def lstm_proj_layer_backward(grad_out, grad_hn, grad_cn, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cs,
                             hs, reverse):
    """lstm_proj_layer_forward's gradients: (dx, dh0, dc0, dw_ih, dw_hh, db [4H], dw_hr); db is the gradient of b_ih
    and of b_hh alike."""
    return lstm_layer_backward(grad_out, grad_hn, grad_cn, x, batch_sizes, h0, c0, w_ih, w_hh, out, gates, cs, reverse,
                               w_hr=w_hr, hs=hs)


def gru_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    """Returns (out [N, H], hn, ws [N, 4H] = [r, z, n, hn])."""
    def step(px, state):
        h, = state
        xr, xz, xn = px.chunk(3, 1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, 1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        return [(1 - z) * n + z * h], [torch.cat([r, z, n, hn], 1)]

    pieces, (hn,) = _run_layer(F.linear(x, w_ih, b_ih), batch_sizes, [h0], step, reverse)
    return _cat(pieces, 0, 0, h0), hn, _cat(pieces, 1, 0, x, 4 * h0.shape[1])


def rnn_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, relu, reverse):
    """Returns (out [N, H], hn)."""
    def step(px, state):
        pre = px + F.linear(state[0], w_hh, b_hh)
        return [pre.relu() if relu else pre.tanh()], []

    pieces, (hn,) = _run_layer(F.linear(x, w_ih, b_ih), batch_sizes, [h0], step, reverse)
    return _cat(pieces, 0, 0, h0), hn


def _cat(pieces, kind, index, like, width=None):
    """Concatenates piece ``index`` of the states (kind 0) or extras (kind 1) of every step, in time order."""
    if not pieces:
        return like.new_empty((0, like.shape[1] if width is None else width))
    return torch.cat([p[kind][index] for p in pieces])


def lstm_layer_backward(grad_out, grad_hn, grad_cn, x, batch_sizes, h0, c0, w_ih, w_hh, out, gates, cs, reverse,
                        w_hr=None, hs=None):
    """(dx, dh0, dc0, dw_ih, dw_hh, db); with the projection w_hr (and the unprojected h of each step, hs), each step's
    output gradient goes through it to the cell, and dw_hr comes last."""
    dh, dc = grad_hn.clone(), grad_cn.clone()
    dgates, dout = torch.empty_like(gates), torch.empty_like(out)
    c_prev = _prev_states(cs, c0, batch_sizes, reverse)
    for t, off, bs in reversed(_steps(batch_sizes, reverse)):
        rows = slice(off, off + bs)
        dout[rows] = dh[:bs] + grad_out[rows]
        dg, dc[:bs] = lstm_gate_grads(dout[rows] if w_hr is None else dout[rows] @ w_hr, dc[:bs], c_prev[rows],
                                      gates[rows], cs[rows])
        dh[:bs] = dg @ w_hh
        dgates[rows] = dg
    h_prev = _prev_states(out, h0, batch_sizes, reverse)
    grads = dgates @ w_ih, dh, dc, dgates.t() @ x, dgates.t() @ h_prev, dgates.sum(0)
    return grads if w_hr is None else grads + (dout.t() @ hs,)


def gru_layer_backward(grad_out, grad_hn, x, batch_sizes, h0, w_ih, w_hh, out, ws, reverse):
    dh = grad_hn.clone()
    h_prev = _prev_states(out, h0, batch_sizes, reverse)
    dxg, dhg = ws.new_empty(ws.shape[0], w_ih.shape[0]), ws.new_empty(ws.shape[0], w_hh.shape[0])
    for t, off, bs in reversed(_steps(batch_sizes, reverse)):
        rows = slice(off, off + bs)
        g = dh[:bs] + grad_out[rows]
        dxg[rows], dhg[rows] = gru_gate_grads(g, h_prev[rows], ws[rows])
        dh[:bs] = dhg[rows] @ w_hh + g * ws[rows].chunk(4, 1)[1]
    return dxg @ w_ih, dh, dxg.t() @ x, dhg.t() @ h_prev, dxg.sum(0), dhg.sum(0)


def rnn_layer_backward(grad_out, grad_hn, x, batch_sizes, h0, w_ih, w_hh, out, relu, reverse):
    dh = grad_hn.clone()
    dpre = torch.empty_like(out)
    for t, off, bs in reversed(_steps(batch_sizes, reverse)):
        rows = slice(off, off + bs)
        dpre[rows] = rnn_pre_grad(dh[:bs] + grad_out[rows], out[rows], relu)
        dh[:bs] = dpre[rows] @ w_hh
    h_prev = _prev_states(out, h0, batch_sizes, reverse)
    return dpre @ w_ih, dh, dpre.t() @ x, dpre.t() @ h_prev, dpre.sum(0)


# ----------------------------------------------------------------------------------------------------------------
