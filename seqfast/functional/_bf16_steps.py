"""bfloat16 LSTM / GRU / RNN layers over fewer than 8 rows (steps x batch) on a CPU without native bfloat16: one
cell step at a time, each reading its bfloat16 weights in place (seqfast._rules.bf16_weights_in_place). A seq2seq
decoder that feeds nn.LSTM one token per call runs exactly this: one step of batch 1.

Why: the sequence kernels would run their bfloat16 GEMMs emulated there (measured on the Zen 3 against torch's op:
LSTM T1 B1 H512 0.76x in inference and 0.12x in training), and the float32 upcast path copies every weight per call,
which costs more than a step this short (seqfast._rules.UPCAST_BF16_MIN_ROWS). Packed input, several layers, both
directions and dropout between layers follow torch's semantics; autograd records the cell steps (seqfast.ops).
"""
import torch

from . import _rnn_sequence
from ..ops import rnn_cell as _ops


def recurrent_in_steps(kind, input, h0, c0, weights, batch_sizes, num_layers, bidirectional, dropout, training,
                       nonlinearity):
    """seqfast.functional.recurrent's result (output, h_n, c_n or None) from one cell call per step, layer and
    direction. input: padded [T, B, I] (batch_sizes None) or packed [N, I]. The activations and states stay float32
    from the first step to the last (the float32 C++ cell kernels take them so, with the bfloat16 weights and biases
    as they are); the results are rounded to bfloat16 once, as the upcast path rounds them."""
    padded = batch_sizes is None
    if padded:
        T, B = input.shape[0], input.shape[1]
        sizes, x = [B] * T, input.reshape(T * B, input.shape[2]).float()
    else:
        sizes, x = batch_sizes.tolist(), input.float()
    lstm = kind == "lstm"
    h0, c0 = h0.float(), (c0.float() if lstm else None)

    def layer_direction(x, idx, reverse):
        return _layer(kind, nonlinearity == "relu", x, sizes, h0[idx], c0[idx] if lstm else None, weights[idx],
                      reverse)

    x, h_out, c_out = _rnn_sequence.over_layers(x, num_layers, 2 if bidirectional else 1, dropout, training,
                                                layer_direction)
    bf16 = torch.bfloat16
    output = (x.view(T, B, x.shape[1]) if padded else x).to(bf16)
    return output, torch.stack(h_out).to(bf16), (torch.stack(c_out).to(bf16) if lstm else None)


def _layer(kind, relu, x, sizes, h0, c0, w, reverse):
    """One layer and direction over the time-major rows x (step t: the next sizes[t] rows). -> (output rows, h_n, c_n
    or None); a packed sequence's states end at its own last step, as torch's. The caller checked every shape."""
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if len(w) >= 4 else (None, None)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    T, lstm = len(sizes), c0 is not None
    outs = [None] * T
    h = c = None
    ended_h, ended_c = [], []  # forward: the rows whose sequences ended, highest rows first
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        n = sizes[t]
        if h is None:
            h, c = h0[:n], (c0[:n] if lstm else None)
        elif h.shape[0] < n:  # reverse over a packed input: longer sequences join with their initial states
            h = torch.cat([h, h0[h.shape[0]:n]])
            c = torch.cat([c, c0[c.shape[0]:n]]) if lstm else None
        elif h.shape[0] > n:  # forward: shorter sequences end here
            ended_h.append(h[n:])
            h = h[:n]
            if lstm:
                ended_c.append(c[n:])
                c = c[:n]
        xt = x[offsets[t]:offsets[t + 1]]
        if lstm:
            h, c, _ = _ops.lstm_cell(xt, h, c, w_ih, w_hh, b_ih, b_hh)
        elif kind == "gru":
            h = _ops.gru_cell(xt, h, w_ih, w_hh, b_ih, b_hh)[0]
        else:
            h = _ops.rnn_cell(xt, h, w_ih, w_hh, b_ih, b_hh, relu)
        outs[t] = h
    hn = torch.cat([h] + ended_h[::-1]) if ended_h else h
    cn = (torch.cat([c] + ended_c[::-1]) if ended_c else c) if lstm else None
    return torch.cat(outs), hn, cn
