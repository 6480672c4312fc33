"""Functional multi-layer (bidirectional) LSTM / GRU / RNN over a whole sequence, as torch._VF.lstm / gru / rnn_*."""
import functools
import itertools

import torch

from .. import _rules
from . import _cell_steps, _rnn_cell
from ..ops import rnn_sequence as _ops

_NATIVE = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "tanh": torch._VF.rnn_tanh, "relu": torch._VF.rnn_relu}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _uniform_steps(T, B):
    """batch_sizes of a padded [T, B] sequence: one shared tensor per shape in eager mode (the kernels only read it)."""
    if torch.compiler.is_compiling():
        return torch.full((T,), B, dtype=torch.int64)
    return _shared_uniform_steps(T, B)


@functools.lru_cache(maxsize=64)
def _shared_uniform_steps(T, B):
    with torch.inference_mode(False):  # a normal tensor even if made under inference_mode: training saves it
        return torch.full((T,), B, dtype=torch.int64)


def _check_steps(input, batch_sizes, h0):
    """A sequence the kernels can walk: at least one step; for packed input, batch_sizes as a PackedSequence has them
    (1-D int64, every size >= 1, non-increasing, summing to the packed rows, the first matching the states' batch).
    A hand-built PackedSequence that breaks these would make a kernel read or write past its buffers."""
    if batch_sizes is None:
        if input.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        return
    if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64:
        raise RuntimeError(f"batch_sizes must be a 1-D int64 tensor (a PackedSequence's), got a "
                           f"{batch_sizes.dim()}-D {batch_sizes.dtype} tensor")
    sizes = batch_sizes.tolist()
    if not sizes:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if any(later > earlier for earlier, later in zip(sizes, sizes[1:])):
        raise RuntimeError(f"batch_sizes must be non-increasing (a PackedSequence's), got {sizes}")
    if sizes[-1] < 1:
        raise RuntimeError(f"batch_sizes must be positive, got {sizes}")
    if sum(sizes) != input.shape[0]:
        raise RuntimeError(f"batch_sizes sum to {sum(sizes)} rows, but the packed input has {input.shape[0]} rows")
    if h0.shape[1] != sizes[0]:
        raise RuntimeError(f"Expected hidden size {(h0.shape[0], sizes[0], h0.shape[2])}, got {list(h0.shape)}")


def _check_states(input, states):
    if torch._C._is_any_autocast_enabled():  # the op casts its arguments itself
        return
    for name, t in states:
        if t.dtype != input.dtype:
            raise RuntimeError(f"Expected {name} to have dtype {input.dtype} (the input's), got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"Expected {name} on device {input.device} (the input's), got {t.device}")


def _kernel_layout(kind, weights, input_size, num_layers, dirs, proj_size):
    """Whether every layer's weights have the shapes the kernels read (torch's op raises or copes otherwise)."""
    if len(weights) != num_layers * dirs:
        return False
    hidden = weights[0][-1].shape[1] if proj_size else weights[0][1].shape[1]
    rows, out_size = _GATES[kind] * hidden, proj_size or hidden
    for i, w in enumerate(weights):
        layer_input = input_size if i < dirs else dirs * out_size
        if w[0].shape != (rows, layer_input) or w[1].shape != (rows, out_size):
            return False
        if len(w) >= 4 and (w[2].shape != (rows,) or w[3].shape != (rows,)):
            return False
    return True


# Without gradients, layers with fewer weights than this (w_ih and w_hh of the first layer) keep the sequence
# kernels' bfloat16 path on seqfast.functional.recurrent (packed input, direct calls): its emulated GEMMs on so few
# weights cost less than the Python of the cell steps. Same process, Zen 3, torch / seqfast, that path against the
# Python cell steps: GRU T1 B1 H64 1.41x / 0.74x, RNN T2 B2 H64 1.30x / 0.79x, LSTM T1 B4 H128 (131072 weights)
# 1.13x / 1.14x, GRU T1 B4 H256 1.05x / 1.59x, LSTM T1 B1 H512 0.76x / 1.47x. In training the cell steps won at every
# size tried (RNN T1 B1 H128 0.72x / 0.89x, GRU T1 B1 H64 0.96x / 1.10x, LSTM T1 B1 H512 0.12x / 1.93x). A module's
# padded no-grad call runs the steps in C++ (rnn_module_inference's cell_steps), which won at every size: GRU T1 B1
# H64 1.85x / 3.08x, RNN T2 B2 H64 1.75x / 2.46x, LSTM T1 B4 H128 1.47x / 4.07x, LSTM T1 B1 H512 0.72x / 2.88x.
BF16_STEPS_MIN_WEIGHTS_NO_GRAD = 131072


def bf16_in_steps(tensors, rows, kind, steps, batch, hidden, weights=None, grad=True):
    """Whether a bfloat16 ``kind`` layer call over ``rows`` rows (``steps`` steps of up to ``batch`` rows, at
    ``hidden``) runs as cell steps that read the bfloat16 weights in place (_cell_steps): up to
    seqfast._rules.BF16_IN_PLACE_MAX_ROWS rows (from there the upcast path's copies pay), where the cell kernels
    qualify and the rules' float32 bounds hold; without gradients only from BF16_STEPS_MIN_WEIGHTS_NO_GRAD ``weights``
    (None: any size, for the module's C++ call), and on a CPU with native bfloat16 for one step only (the fused
    bfloat16 steps beat them from two: seqfast._rules.float32_bfloat16_max_batch). ``grad``: autograd records the
    call."""
    return (rows <= _rules.BF16_IN_PLACE_MAX_ROWS
            and (grad or weights is None or weights >= BF16_STEPS_MIN_WEIGHTS_NO_GRAD)
            and (grad or steps == 1 or _rules.float32_sequences())
            and _rnn_cell.bf16_weight_kernels()
            and _rules.bf16_weights_in_place(tensors, rows, kind, batch, hidden, steps))


# A float32 / float64 call of one step in grad mode runs the cell kernels (_cell_steps): the sequence kernels' per-call
# weight copies (W_hh transposed for the backward's GEMV, packed slices) are paid for one step only, and cost more than
# it. Same process, Zen 3, 2 threads, torch / seqfast, sequence kernels against cell steps, training: GRU T1 B1 H512
# 0.31x / 1.05x, GRU T1 B1 H1024 0.14x / 0.45x (1.00x for the GRUCell step alone in another run: the 12 MB weight
# gradients' writes dominate both), LSTM T1 B1 H512 1.84x / 4.52x, LSTM T1 B8 H512 1.00x / 0.97x, GRU T1 B64 H256
# 0.85x / 0.91x, LSTM T1 B1 H64 1.47x / 1.30x, RNN T1 B1 H64 0.87x / 0.80x (overhead-bound: ~300 us either way).
SINGLE_STEP_AS_CELL = True


def recurrent(kind, input, h0, c0, weights, *, batch_sizes=None, num_layers=1, bidirectional=False, dropout=0.0,
              training=False, nonlinearity="tanh", proj_size=0):
    """A multi-layer (bi)directional LSTM / GRU / RNN over a whole sequence, as torch._VF.lstm/gru/rnn_*.

    input: time-major [T, B, I] (padded), or packed data [N, I] with ``batch_sizes`` (PackedSequence's).
    h0 / c0: [layers * directions, B, H] (c0 for LSTM only). weights: per layer and direction, torch's parameter
    list [w_ih, w_hh, (b_ih, b_hh), (w_hr)]. Returns (output, h_n, c_n or None), output in input's layout.

    LSTM proj_size runs seqfast's projected layer (C++, float32 / float64 on CPU; torch's own op elsewhere), and any
    case no seqfast kernel covers runs torch's own op (see seqfast._backend).
    """
    lstm = kind == "lstm"
    _check_steps(input, batch_sizes, h0)
    _check_states(input, [("hx", h0)] + ([("cx", c0)] if lstm else []))
    rows = input.shape[0] * (input.shape[1] if batch_sizes is None else 1)
    if input.dtype is torch.bfloat16:  # the bounds of seqfast._rules' float32 paths for bfloat16
        steps = input.shape[0] if batch_sizes is None else batch_sizes.shape[0]
        batch, hidden = h0.shape[1], (c0 if lstm else h0).shape[-1]
    if (input.dtype is torch.bfloat16 and not proj_size
            and bf16_in_steps(itertools.chain((input, h0, c0), *weights), rows, kind, steps, batch, hidden,
                              weights[0][0].numel() + weights[0][1].numel(),
                              torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in itertools.chain(
                                  (input, h0, c0), *weights)))
            and _kernel_layout(kind, weights, input.shape[-1], num_layers, 2 if bidirectional else 1, 0)):
        # so few rows that the bfloat16 cell steps, their weights read in place, beat both other paths (_cell_steps)
        return _cell_steps.recurrent_in_steps(kind, input, h0, c0, weights, batch_sizes, num_layers, bidirectional,
                                              dropout, training, nonlinearity)
    if input.dtype is torch.bfloat16 and not proj_size and _rules.upcast_bfloat16(
            itertools.chain((input, h0, c0), *weights), rows, kind, batch, hidden, steps):
        # no native bfloat16 on this CPU, or a call too small for it to pay (seqfast._rules.float32_bfloat16_max_batch):
        # float32 kernels on upcast copies, the results rounded once
        up = [[w.float() for w in layer] for layer in weights]
        out, hn, cn = recurrent(kind, input.float(), h0.float(), None if c0 is None else c0.float(), up,
                                batch_sizes=batch_sizes, num_layers=num_layers, bidirectional=bidirectional,
                                dropout=dropout, training=training, nonlinearity=nonlinearity, proj_size=proj_size)
        bf16 = torch.bfloat16
        return out.to(bf16), hn.to(bf16), (None if cn is None else cn.to(bf16))
    projected = lstm and proj_size > 0
    op = (_ops.lstm_proj_layer if projected else _ops.lstm_layer) if lstm else (
        _ops.gru_layer if kind == "gru" else _ops.rnn_layer)
    usual = _kernel_layout(kind, weights, input.shape[-1], num_layers, 2 if bidirectional else 1, proj_size)
    # (the rule table's measurements are of torch's oneDNN layers, which take no projection: torch's projected LSTM
    # runs its generic per-step ops, slower than seqfast's layer at every size measured)
    if (not usual or op.runs_torch_op(input)
            or (not projected and _torch_faster(kind, input, h0, c0, weights, batch_sizes))):
        return _torch_recurrent(kind, input, h0, c0, weights, batch_sizes, num_layers, bidirectional, dropout,
                                training, nonlinearity)
    if (SINGLE_STEP_AS_CELL and not projected and torch.is_grad_enabled() and input.is_cpu
            and (input.shape[0] if batch_sizes is None else batch_sizes.shape[0]) == 1
            and not torch.compiler.is_compiling() and op.runs_cpp(input)):
        # one step with gradients: the cell kernels, without the sequence kernels' per-call weight copies
        if batch_sizes is None:
            return _cell_steps.one_step(kind, input, h0, c0, weights, num_layers, bidirectional, dropout, training,
                                        nonlinearity)
        return _cell_steps.recurrent_in_steps(kind, input, h0, c0, weights, batch_sizes, num_layers, bidirectional,
                                              dropout, training, nonlinearity)
    padded = batch_sizes is None
    if padded:
        T, B = input.shape[0], input.shape[1]
        x = input.reshape(T * B, input.shape[2])
        batch_sizes = _uniform_steps(T, B)
    else:
        x = input
        batch_sizes = batch_sizes.cpu()
    bias = len(weights[0]) >= 4

    def layer_direction(x, idx, reverse):
        w = weights[idx]
        w_ih, w_hh = w[0].contiguous(), w[1].contiguous()
        # biases can arrive strided or expanded (stride 0), e.g. through torch.func.functional_call
        b_ih, b_hh = (w[2].contiguous(), w[3].contiguous()) if bias else (None, None)
        x_c, h = x.contiguous(), h0[idx].contiguous()
        if projected:
            out, hn, cn, _, _, _ = _ops.lstm_proj_layer(x_c, batch_sizes, h, c0[idx].contiguous(), w_ih, w_hh, b_ih,
                                                        b_hh, w[-1].contiguous(), reverse)
        elif lstm:
            out, hn, cn, _, _ = _ops.lstm_layer(x_c, batch_sizes, h, c0[idx].contiguous(), w_ih, w_hh, b_ih, b_hh,
                                                reverse)
        elif kind == "gru":
            (out, hn, _), cn = _ops.gru_layer(x_c, batch_sizes, h, w_ih, w_hh, b_ih, b_hh, reverse), None
        else:
            (out, hn), cn = _ops.rnn_layer(x_c, batch_sizes, h, w_ih, w_hh, b_ih, b_hh, nonlinearity == "relu",
                                           reverse), None
        return out, hn, cn

    x, h_out, c_out = over_layers(x, num_layers, 2 if bidirectional else 1, dropout, training, layer_direction)
    output = x.view(T, B, x.shape[1]) if padded else x
    return output, stack_states(h_out), (stack_states(c_out) if lstm else None)


def stack_states(states):
    """The final states of every layer and direction as one [layers * directions, B, H] tensor (one: a view)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


def over_layers(x, num_layers, dirs, dropout, training, layer_direction):
    """x (time-major rows) through every layer and direction, layer_direction(x, index, reverse) -> (output rows, h_n,
    c_n or None); the directions' outputs side by side, dropout between layers in training. -> (the last layer's
    output rows, [h_n], [c_n]) in torch's layer-major order."""
    h_out, c_out = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            out, hn, cn = layer_direction(x, layer * dirs + d, d == 1)
            outs.append(out)
            h_out.append(hn)
            c_out.append(cn)
        x = outs[0] if dirs == 1 else torch.cat(outs, 1)
        if dropout and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, True)
    return x, h_out, c_out


def _torch_recurrent(kind, input, h0, c0, weights, batch_sizes, num_layers, bidirectional, dropout, training,
                     nonlinearity):
    """The same call on torch's own op (torch._VF.lstm / gru / rnn_tanh / rnn_relu: oneDNN / cuDNN / ATen)."""
    native = _NATIVE[nonlinearity if kind == "rnn" else kind]
    flat = [w for layer in weights for w in layer]
    has_biases = len(weights[0]) >= 4
    hx = (h0, c0) if kind == "lstm" else h0
    if batch_sizes is None:
        output, *states = native(input, hx, flat, has_biases, num_layers, dropout, training, bidirectional, False)
    else:
        output, *states = native(input, batch_sizes, hx, flat, has_biases, num_layers, dropout, training,
                                 bidirectional)
    return output, states[0], (states[1] if kind == "lstm" else None)


def _torch_faster(kind, input, h0, c0, weights, batch_sizes):
    """The performance floor (seqfast._rules): torch's own op where it beats seqfast's kernels on this CPU."""
    # a lazy chain: prefer_torch reads it only in grad mode, up to the first tensor that requires grad
    grad_tensors = itertools.chain((input, h0, c0), *weights)
    steps = input.shape[0] if batch_sizes is None else batch_sizes.shape[0]
    return _rules.prefer_torch(kind, input, h0.shape[1], weights[0][1].shape[1], grad_tensors, steps=steps)
