"""A multi-layer (bidirectional) LSTM / GRU / RNN as one cell call per step, layer and direction: for the calls too
short for the sequence kernels' per-call setup (their packed or transposed weight copies, paid once per call).

* bfloat16 over at most seqfast._rules.BF16_IN_PLACE_MAX_ROWS rows (steps x batch) on a CPU without native
  bfloat16 (_rnn_sequence.bf16_in_steps): each step reads its bfloat16 weights in place
  (seqfast._rules.bf16_weights_in_place), states kept in float32. The sequence kernels would run their bfloat16 GEMMs
  emulated there (measured on the Zen 3 against torch's op: LSTM T1 B1 H512 0.76x in inference and 0.12x in
  training), and the float32 upcast path copies every weight per call, which costs more than a call this short. A
  seq2seq decoder that feeds nn.LSTM one token per call runs exactly this (without gradients, through the module's
  C++ twin, rnn_module_inference's cell_steps).
* float32 / float64 single-step calls with gradients (_rnn_sequence.recurrent): the functional cells, with their
  checks and rules (one_step for padded input: the same steps with less Python around them).

Packed input, several layers, both directions and dropout between layers follow torch's semantics; autograd records
the cell steps.
"""
import torch

from . import _rnn_cell, _rnn_sequence
from ..ops import rnn_cell as _ops


def recurrent_in_steps(kind, input, h0, c0, weights, batch_sizes, num_layers, bidirectional, dropout, training,
                       nonlinearity):
    """seqfast.functional.recurrent's result (output, h_n, c_n or None) from one cell call per step, layer and
    direction. input: padded [T, B, I] (batch_sizes None) or packed [N, I]. bfloat16: the activations and states stay
    float32 from the first step to the last (the float32 C++ cell kernels take them so, with the bfloat16 weights and
    biases as they are), and the results are rounded to bfloat16 once, as the upcast path rounds them."""
    dtype = input.dtype
    work = torch.float32 if dtype is torch.bfloat16 else dtype
    padded = batch_sizes is None
    if padded:
        T, B = input.shape[0], input.shape[1]
        sizes, x = [B] * T, input.reshape(T * B, input.shape[2]).to(work)
    else:
        sizes, x = batch_sizes.tolist(), input.to(work)
    lstm = kind == "lstm"
    h0, c0 = h0.to(work), (c0.to(work) if lstm else None)
    step = _kernel_step if work is not dtype else _functional_step

    def layer_direction(x, idx, reverse):
        return _layer(kind, nonlinearity == "relu", step, x, sizes, h0[idx], c0[idx] if lstm else None, weights[idx],
                      reverse)

    x, h_out, c_out = _rnn_sequence.over_layers(x, num_layers, 2 if bidirectional else 1, dropout, training,
                                                layer_direction)
    output = (x.view(T, B, x.shape[1]) if padded else x).to(dtype)
    stack = _rnn_sequence.stack_states
    return output, stack(h_out).to(dtype), (stack(c_out).to(dtype) if lstm else None)


def one_step(kind, input, h0, c0, weights, num_layers, bidirectional, dropout, training, nonlinearity):
    """recurrent_in_steps for a padded float32 / float64 input of one step ([1, B, I]), with less Python: a decoder
    that feeds the layer one token per call spends a good part of such a call (tens of microseconds at batch 1) on
    the general walk's slicing and concatenation. The same steps and results."""
    relu, lstm = nonlinearity == "relu", kind == "lstm"

    def layer_direction(x, i, reverse):  # one step: either direction runs the same cell call
        w = weights[i]
        h, c = _functional_step(kind, relu, x, h0[i], c0[i] if lstm else None, w[0], w[1],
                                *(w[2:4] if len(w) >= 4 else (None, None)))
        return h, h, c

    x, h_out, c_out = _rnn_sequence.over_layers(input[0], num_layers, 2 if bidirectional else 1, dropout, training,
                                                layer_direction)
    # h_n is stacked (a copy even of one state): the output must not alias it, as torch's does not
    return x.unsqueeze(0), torch.stack(h_out), (_rnn_sequence.stack_states(c_out) if lstm else None)


def _kernel_step(kind, relu, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step on the C++ cell kernels with bfloat16 weights under float32 activations (shapes checked by the
    caller). -> (h', c' or None)"""
    if kind == "lstm":
        hy, cy, _ = _ops.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
        return hy, cy
    if kind == "gru":
        return _ops.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)[0], None
    return _ops.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, relu), None


def _functional_step(kind, relu, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step through seqfast.functional's cells (their checks, rules and backends). -> (h', c' or None)"""
    if kind == "lstm":
        return _rnn_cell.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    if kind == "gru":
        return _rnn_cell.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), None
    return _rnn_cell.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, "relu" if relu else "tanh"), None


def _layer(kind, relu, step, x, sizes, h0, c0, w, reverse):
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
        h, c = step(kind, relu, x[offsets[t]:offsets[t + 1]], h, c, w_ih, w_hh, b_ih, b_hh)
        outs[t] = h
    hn = torch.cat([h] + ended_h[::-1]) if ended_h else h
    cn = (torch.cat([c] + ended_c[::-1]) if ended_c else c) if lstm else None
    return torch.cat(outs), hn, cn  # a copy even of one step: the output must not alias h_n, as torch's does not
