"""Plain PyTorch versions of every seqfast kernel: the readable math, the fallback for devices and dtypes no kernel
covers, and what the kernels are tested against (besides torch.nn itself).

Each fused op is a (forward, backward) pair with the same signature on every backend (seqfast._C, seqfast.kernels,
this module): the forward returns its outputs plus the workspace its backward needs; the backward takes the output
gradients (always defined) and returns every input gradient.
"""
import torch
import torch.nn.functional as F


def _linear(x, w, b):
    return F.linear(x, w, b)


# ----------------------------------------------------------------------------------------------------------------
# Cells. Gate order as torch.nn: LSTM (i, f, g, o), GRU (r, z, n).
# ----------------------------------------------------------------------------------------------------------------
def lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh):
    pre = _linear(x, w_ih, b_ih) + _linear(hx, w_hh, b_hh)
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
    return dgates @ w_ih, dgates @ w_hh, dcx, dgates.t() @ x, dgates.t() @ hx, dgates.sum(0)


def gru_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh):
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, 1)
    hr, hz, hn = _linear(hx, w_hh, b_hh).chunk(3, 1)
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
    return (dx_gates @ w_ih, dh_gates @ w_hh + grad_hy * z, dx_gates.t() @ x, dh_gates.t() @ hx,
            dx_gates.sum(0), dh_gates.sum(0))


def rnn_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh, relu):
    pre = _linear(x, w_ih, b_ih) + _linear(hx, w_hh, b_hh)
    return pre.relu() if relu else pre.tanh()


def rnn_pre_grad(grad_hy, hy, relu):
    return grad_hy * (hy > 0).to(hy.dtype) if relu else grad_hy * (1 - hy * hy)


def rnn_cell_backward(grad_hy, x, hx, w_ih, w_hh, hy, relu):
    dpre = rnn_pre_grad(grad_hy, hy, relu)
    return dpre @ w_ih, dpre @ w_hh, dpre.t() @ x, dpre.t() @ hx, dpre.sum(0)


# ----------------------------------------------------------------------------------------------------------------
# One layer, one direction, over a whole sequence. Time-major packed layout (PackedSequence's): x [N, I] holds step t
# in rows [off_t, off_t + bs_t) with bs = batch_sizes (non-increasing); only rows b < bs_t run at step t, the others
# keep their state, so the state at the end is each row's final state. Padded input is bs_t = B for every t.
# reverse walks t from T-1 down to 0 (a row then starts from h0 at its own last step).
# ----------------------------------------------------------------------------------------------------------------
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
        pre = px + _linear(h, w_hh, b_hh)
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        if w_hr is not None:
            h = h @ w_hr.t()
        return [h, c], [torch.cat([i, f, g, o], 1)]

    pieces, (hn, cn) = _run_layer(_linear(x, w_ih, b_ih), batch_sizes, [h0, c0], step, reverse)
    return (_cat(pieces, 0, 0, h0), hn, cn, _cat(pieces, 1, 0, x, 4 * c0.shape[1]), _cat(pieces, 0, 1, c0))


def gru_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    """Returns (out [N, H], hn, ws [N, 4H] = [r, z, n, hn])."""
    def step(px, state):
        h, = state
        xr, xz, xn = px.chunk(3, 1)
        hr, hz, hn = _linear(h, w_hh, b_hh).chunk(3, 1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        return [(1 - z) * n + z * h], [torch.cat([r, z, n, hn], 1)]

    pieces, (hn,) = _run_layer(_linear(x, w_ih, b_ih), batch_sizes, [h0], step, reverse)
    return _cat(pieces, 0, 0, h0), hn, _cat(pieces, 1, 0, x, 4 * h0.shape[1])


def rnn_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, relu, reverse):
    """Returns (out [N, H], hn)."""
    def step(px, state):
        pre = px + _linear(state[0], w_hh, b_hh)
        return [pre.relu() if relu else pre.tanh()], []

    pieces, (hn,) = _run_layer(_linear(x, w_ih, b_ih), batch_sizes, [h0], step, reverse)
    return _cat(pieces, 0, 0, h0), hn


def _cat(pieces, kind, index, like, width=None):
    """Concatenates piece ``index`` of the states (kind 0) or extras (kind 1) of every step, in time order."""
    if not pieces:
        return like.new_empty((0, like.shape[1] if width is None else width))
    return torch.cat([p[kind][index] for p in pieces])


def lstm_layer_backward(grad_out, grad_hn, grad_cn, x, batch_sizes, h0, c0, w_ih, w_hh, out, gates, cs, reverse):
    dh, dc = grad_hn.clone(), grad_cn.clone()
    dgates = torch.empty_like(gates)
    c_prev = _prev_states(cs, c0, batch_sizes, reverse)
    for t, off, bs in reversed(_steps(batch_sizes, reverse)):
        rows = slice(off, off + bs)
        dg, dc[:bs] = lstm_gate_grads(dh[:bs] + grad_out[rows], dc[:bs], c_prev[rows], gates[rows], cs[rows])
        dh[:bs] = dg @ w_hh
        dgates[rows] = dg
    h_prev = _prev_states(out, h0, batch_sizes, reverse)
    return dgates @ w_ih, dh, dc, dgates.t() @ x, dgates.t() @ h_prev, dgates.sum(0)


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
# Scaled-dot-product attention. q [N, Hq, L, D], k [N, Hk, S, D], v [N, Hk, S, Dv] with Hq % Hk == 0 (query head h
# reads kv head h // (Hq // Hk)); bias: additive float mask broadcastable to [N, Hq, L, S] or None; is_causal:
# query i sees keys j <= i (top-left aligned, as torch). A row with every key masked gives output 0 and gradient 0
# (torch's behaviour); its lse is -inf.
# ----------------------------------------------------------------------------------------------------------------
def _expand_kv(t, hq):
    return t.repeat_interleave(hq // t.shape[1], dim=1) if t.shape[1] != hq else t


def _acc(t):
    """Accumulation dtype: float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q, k, bias, is_causal, scale):
    acc = _acc(q)
    s = (q.to(acc) @ _expand_kv(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s


def _probs(s, lse):
    # fully masked rows: lse = -inf; exp(-inf - 0) = 0 instead of NaN
    return torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])


def sdpa_forward(q, k, v, bias, is_causal, scale):
    s = _scores(q, k, bias, is_causal, scale)
    lse = torch.logsumexp(s, -1)
    acc = _acc(q)
    out = _probs(s, lse) @ _expand_kv(v, q.shape[1]).to(acc)
    return out.to(q.dtype), lse


def _sum_groups(t, hk):
    n, hq = t.shape[:2]
    return t.view(n, hk, hq // hk, *t.shape[2:]).sum(2) if hq != hk else t


def sdpa_backward(grad_out, q, k, v, out, lse, bias, is_causal, scale):
    acc = _acc(q)
    p = _probs(_scores(q, k, bias, is_causal, scale), lse)
    g = grad_out.to(acc)
    dv = p.transpose(-1, -2) @ g
    dp = g @ _expand_kv(v, q.shape[1]).to(acc).transpose(-1, -2)
    ds = p * (dp - (g * out.to(acc)).sum(-1, keepdim=True))
    dq = (ds @ _expand_kv(k, q.shape[1]).to(acc)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(acc)) * scale
    hk = k.shape[1]
    return dq.to(q.dtype), _sum_groups(dk, hk).to(k.dtype), _sum_groups(dv, hk).to(v.dtype)


def sdpa_dropout(q, k, v, bias, is_causal, scale, dropout_p):
    """Attention with dropout on the weights (differentiated by autograd, so backward reuses the forward's mask)."""
    s = _scores(q, k, bias, is_causal, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.nn.functional.dropout(_probs(s, lse), dropout_p, True)
    acc = _acc(q)
    return (p @ _expand_kv(v, q.shape[1]).to(acc)).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Additive (Bahdanau) attention for one decoder step: score_s = v . tanh(qp + kp_s), softmax over the unmasked s
# (mask True = keep; a fully masked row gives zero weights and context), context = sum_s w_s values_s.
# ----------------------------------------------------------------------------------------------------------------
def _additive_weights(qp, kp, v, mask):
    scores = torch.tanh(qp[:, None, :] + kp) @ v
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    return torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))


def additive_attention_forward(qp, kp, v, values, mask):
    w = _additive_weights(qp, kp, v, mask)
    return (w[:, None, :] @ values)[:, 0], w


def additive_attention_backward(grad_context, grad_weights, qp, kp, v, values, mask, weights):
    t = torch.tanh(qp[:, None, :] + kp)                                   # [N, S, A]
    dvalues = weights[:, :, None] * grad_context[:, None, :]
    dw = (values @ grad_context[:, :, None])[..., 0] + grad_weights      # [N, S]
    dscore = weights * (dw - (weights * dw).sum(-1, keepdim=True))
    dpre = dscore[:, :, None] * v * (1 - t * t)                          # [N, S, A]
    return dpre.sum(1), dpre, (dscore[:, :, None] * t).sum((0, 1)), dvalues
