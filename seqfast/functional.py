"""The functional API: one function per fused op, with torch's argument checks and error messages.

Cells take batched 2-D input ([B, I]) and states ([B, H]); the nn modules add unbatched input and default states.
"""
import torch

from . import reference as _reference
from .ops import attention as _attn
from .ops import rnn_cell as _cells
from .ops import rnn_sequence as _seq


def _check_cell(name, input, states, w_ih, w_hh):
    """The checks (and messages) of torch's _VF.*_cell, plus the dtype/device mismatches its GEMM would reject.
    Kept lean: it runs on every step of a decoder loop."""
    batch, input_size = input.shape[0], input.shape[1]
    if input_size != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input_size} expected {w_ih.shape[1]}")
    hidden, dtype, device = w_hh.shape[1], input.dtype, input.device
    mismatch = w_ih.dtype != dtype or w_ih.device != device
    for i, h in enumerate(states):
        shape = h.shape
        if batch != shape[0]:
            raise RuntimeError(f"Input batch size {batch} doesn't match hidden{i} batch size {shape[0]}")
        if shape[1] != hidden:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {shape[1]}, expected {hidden}")
        if len(shape) != 2:
            raise RuntimeError(f"{name}: expected hidden{i} to be 2-D, got {len(shape)}-D")
        mismatch = mismatch or h.dtype != dtype or h.device != device
    if mismatch and not torch._C._is_any_autocast_enabled():  # under autocast the op casts its arguments itself
        for t, what in [(w_ih, "weight_ih")] + [(h, f"hidden{i}") for i, h in enumerate(states)]:
            if t.dtype != dtype:
                raise RuntimeError(f"{name}: expected {what} to have dtype {dtype} (the input's), got {t.dtype}")
            if t.device != device:
                raise RuntimeError(f"{name}: expected {what} on device {device} (the input's), got {t.device}")


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step, as torch._VF.lstm_cell: ``hx`` is ``(h, c)``; returns ``(h', c')``."""
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")
    h, c = hx
    _check_cell("lstm_cell", input, (h, c), w_ih, w_hh)
    hy, cy, _ = _cells.lstm_cell(input.contiguous(), h.contiguous(), c.contiguous(), w_ih.contiguous(),
                                 w_hh.contiguous(), b_ih, b_hh)
    return hy, cy


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step, as torch._VF.gru_cell; returns ``h'``."""
    _check_cell("gru_cell", input, (hx,), w_ih, w_hh)
    hy, _ = _cells.gru_cell(input.contiguous(), hx.contiguous(), w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh)
    return hy


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One Elman RNN step (``nonlinearity`` "tanh" or "relu"), as torch._VF.rnn_tanh_cell / rnn_relu_cell."""
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
    _check_cell("rnn_cell", input, (hx,), w_ih, w_hh)
    return _cells.rnn_cell(input.contiguous(), hx.contiguous(), w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh,
                           nonlinearity == "relu")


def recurrent(kind, input, h0, c0, weights, *, batch_sizes=None, num_layers=1, bidirectional=False, dropout=0.0,
              training=False, nonlinearity="tanh", proj_size=0):
    """A multi-layer (bi)directional LSTM / GRU / RNN over a whole sequence, as torch._VF.lstm/gru/rnn_*.

    input: time-major [T, B, I] (padded), or packed data [N, I] with ``batch_sizes`` (PackedSequence's).
    h0 / c0: [layers * directions, B, H] (c0 for LSTM only). weights: per layer and direction, torch's parameter
    list [w_ih, w_hh, (b_ih, b_hh), (w_hr)]. Returns (output, h_n, c_n or None), output in input's layout.
    """
    padded = batch_sizes is None
    if padded:
        T, B = input.shape[0], input.shape[1]
        x = input.reshape(T * B, input.shape[2])
        batch_sizes = torch.full((T,), B, dtype=torch.int64)
    else:
        x = input
        batch_sizes = batch_sizes.cpu()
    dirs = 2 if bidirectional else 1
    lstm = kind == "lstm"
    bias = len(weights[0]) >= 4
    h_out, c_out = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w = weights[idx]
            w_ih, w_hh = w[0].contiguous(), w[1].contiguous()
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            x_c, h = x.contiguous(), h0[idx].contiguous()
            reverse = d == 1
            if lstm and proj_size > 0:
                # no fused kernel for the projection yet: the plain PyTorch reference, differentiated by autograd
                out, hn, cn, _, _ = _reference.lstm_layer_forward(x_c, batch_sizes, h, c0[idx], w_ih, w_hh, b_ih,
                                                                  b_hh, reverse, w_hr=w[-1])
            elif lstm:
                out, hn, cn, _, _ = _seq.lstm_layer(x_c, batch_sizes, h, c0[idx].contiguous(), w_ih, w_hh, b_ih,
                                                    b_hh, reverse)
            elif kind == "gru":
                (out, hn, _), cn = _seq.gru_layer(x_c, batch_sizes, h, w_ih, w_hh, b_ih, b_hh, reverse), None
            else:
                (out, hn), cn = _seq.rnn_layer(x_c, batch_sizes, h, w_ih, w_hh, b_ih, b_hh,
                                               nonlinearity == "relu", reverse), None
            outs.append(out)
            h_out.append(hn)
            c_out.append(cn)
        x = outs[0] if dirs == 1 else torch.cat(outs, 1)
        if dropout and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, True)
    output = x.view(T, B, x.shape[1]) if padded else x
    stack = (lambda ts: ts[0].unsqueeze(0)) if len(h_out) == 1 else torch.stack  # noqa: E731 (one layer: a view)
    return output, stack(h_out), (stack(c_out) if lstm else None)


def _broadcast(*shapes):
    """torch.broadcast_shapes, without its ~30 us of Python when the shapes already agree (the common case)."""
    first = shapes[0]
    return first if all(s == first for s in shapes[1:]) else torch.broadcast_shapes(*shapes)


def _as_4d(t, batch, heads):
    """t [..., h, len, dim] broadcast to [*batch, heads, len, dim] and flattened to [N, heads, len, dim] (views
    unless batch dims must merge); a 4-D tensor already of that shape is returned as is."""
    shape = (*batch, heads, *t.shape[-2:])
    if t.dim() == 4 and tuple(t.shape) == shape:
        return t
    return t.expand(shape).reshape(-1, heads, *t.shape[-2:])


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, fused (same signature, semantics and errors).

    query [..., Hq, L, E], key [..., Hk, S, E], value [..., Hk, S, Ev] (leading dims broadcast; Hk may divide Hq with
    enable_gqa). attn_mask: bool (True = attend) or additive float, broadcastable to [..., Hq, L, S]; with is_causal
    too, both apply. dropout_p > 0 runs the reference (torch's random masks cannot be reproduced anyway).
    """
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"Expected query, key, and value to be on the same device, got {query.device}, "
                           f"{key.device} and {value.device}")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError("scaled_dot_product_attention: query, key and value must be at least 2-D")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"scaled_dot_product_attention: query and key must have the same embedding size, got "
                           f"query {tuple(query.shape)} and key {tuple(key.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: key and value must have the same sequence length, got "
                           f"key {tuple(key.shape)} and value {tuple(value.shape)}")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {attn_mask.dtype} and  query.dtype: {query.dtype} instead.")
    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    scale = E ** -0.5 if scale is None else float(scale)

    # to [N, H, len, dim]: broadcast leading dims (views), keep kv heads apart for GQA
    q4, k4, v4 = (t.reshape((1,) * (4 - t.dim()) + t.shape) if t.dim() < 4 else t for t in (query, key, value))
    hq, hk = q4.shape[-3], k4.shape[-3]
    if enable_gqa and hq != hk:
        if hq % hk != 0 or v4.shape[-3] != hk:
            raise RuntimeError(f"scaled_dot_product_attention: with enable_gqa, the number of query heads ({hq}) "
                               f"must be a multiple of the number of key/value heads ({hk})")
    else:
        hk = hq = _broadcast(q4.shape[-3:-2], k4.shape[-3:-2], v4.shape[-3:-2])[0]
    batch = _broadcast(q4.shape[:-3], k4.shape[:-3], v4.shape[:-3])
    q4, k4, v4 = (_as_4d(t, batch, h) for t, h in ((q4, hq), (k4, hk), (v4, hk)))
    # torch's output has the rank of the highest-rank input
    out_shape = (tuple(batch) + (hq, L, Ev))[-max(query.dim(), key.dim(), value.dim()):]

    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(query.dtype)
        try:
            bias = bias.expand(*batch, hq, L, S).reshape(-1, hq, L, S)  # a view unless batch dims must merge
        except RuntimeError:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} does "
                               f"not broadcast to {tuple(batch) + (hq, L, S)}") from None

    if dropout_p > 0.0 or (bias is not None and bias.requires_grad):
        out = _reference.sdpa_dropout(q4, k4, v4, bias, is_causal, scale, dropout_p)
    else:
        out = _attn.sdpa(q4.contiguous(), k4.contiguous(), v4.contiguous(), bias, is_causal, scale)[0]
    return out.reshape(out_shape)
